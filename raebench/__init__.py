"""raebench: Representation Autoencoders and a benchmark for image tokenizers."""

__version__ = "0.1.0"

import sys as _sys
from pathlib import Path as _Path


class _CheckoutFolders:
    """Import finder: ``raebench.metrics`` and ``raebench.baselines`` from this checkout's top-level
    ``metrics/`` and ``baselines/`` folders, as pyproject's package-dir maps them when installing.

    Without it, ``python -m raebench`` or ``torchrun -m raebench`` run from a checkout's root (the
    checkout's ``raebench/`` shadows the installed one) found no ``raebench.metrics`` after a
    non-editable install (seen on a GPU machine, 2026-11-26), and a second checkout (a worktree,
    a clone under review) silently took the metrics of the checkout that was installed editable.
    """

    def __init__(self, root: _Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in ("raebench.metrics", "raebench.baselines"):
            return None
        import importlib.util

        folder = self.root / fullname.rpartition(".")[2]
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _map_checkout_folders() -> None:
    here = _Path(__file__).resolve().parent
    root = here.parent
    if (here / "metrics").exists() or not (root / "pyproject.toml").is_file() \
            or not (root / "metrics" / "__init__.py").is_file():
        return  # an installed package (the folders are inside it), or not a source checkout
    if not any(type(f).__name__ == "_CheckoutFolders" for f in _sys.meta_path):  # by name: reload() makes a new class
        _sys.meta_path.insert(0, _CheckoutFolders(root))  # ahead of an editable install's own finder


_map_checkout_folders()


def __getattr__(name: str):
    # lazy: importing raebench must not import torch/transformers
    if name == "from_official_config":
        from raebench.official import from_official_config

        return from_official_config
    raise AttributeError(f"module 'raebench' has no attribute {name!r}")
