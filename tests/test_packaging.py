"""A source checkout imports its own raebench.metrics and raebench.baselines (pyproject maps the
top-level metrics/ and baselines/ folders into the package), whatever is installed."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import raebench.metrics.pixel as p, raebench.baselines as b; print(p.__file__); print(b.__file__)"


def _copy_checkout(dest: Path) -> Path:
    for name in ("raebench", "metrics", "baselines"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_a_checkout_without_an_install_finds_its_metrics(tmp_path):
    """`python -m raebench` from a checkout's root after a non-editable install (or none): the
    checkout's raebench/ shadows the installed one and had no raebench.metrics (H100, 2026-11-26).
    -S: no site processing, so no editable-install finder; site-packages only for torch & co."""
    src = _copy_checkout(tmp_path / "checkout")
    boot = f"import sys; sys.path[:0] = [{str(src)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
    out = subprocess.run([sys.executable, "-S", "-c", boot + PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(src / "metrics" / "pixel.py"), str(src / "baselines" / "__init__.py")]


def test_a_second_checkout_does_not_take_the_installed_checkouts_metrics(tmp_path):
    """With this checkout installed editable, a copy run from its own root used to import the
    *installed* checkout's metrics beside its own raebench/."""
    src = _copy_checkout(tmp_path / "second")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=src)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(src / "metrics" / "pixel.py"), str(src / "baselines" / "__init__.py")]


def test_an_installed_package_keeps_its_own_folders(tmp_path):
    """In an installed (non-checkout) layout metrics/ sits inside raebench/: the finder stays out."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "raebench", site / "raebench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "metrics", site / "raebench" / "metrics", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "baselines", site / "raebench" / "baselines", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"import sys; sys.path.insert(0, {str(site)!r}); " + PROBE + \
        "; import raebench; print(any(type(f).__name__ == '_CheckoutFolders' for f in sys.meta_path))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(site / "raebench" / "metrics" / "pixel.py"),
                                  str(site / "raebench" / "baselines" / "__init__.py"), "False"]


def test_the_package_version_has_one_source():
    """Rows record raebench.__version__; the distribution's version comes from it (a second literal
    in pyproject.toml could drift, and a wheel's rows would then cite another version than pip shows)."""
    import pytest

    import raebench

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "raebench.__version__"}
    assert raebench.__version__.count(".") >= 2
