"""Shared test setup: offline hubs, deterministic CPU, small synthetic images."""

import os
import signal

# Hub loaders retry for ~50 s before failing without a network; tests never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# caches (features, weight digests) of the test run stay out of the user's home
if "RAEBENCH_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["RAEBENCH_CACHE"] = tempfile.mkdtemp(prefix="raebench-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RAEBENCH_CACHE"], True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ORACLE = Path(__file__).resolve().parents[2] / "shared" / "oracle" / "rae-official-tiny"


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A synthetic photo-like image: low-frequency colour fields plus edges and mild noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        f = rng.uniform(1, 6, size=2)
        ph = rng.uniform(0, 2 * np.pi, size=2)
        img[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * f[0] * xx + ph[0]) * np.cos(2 * np.pi * f[1] * yy + ph[1])
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] *= rng.uniform(0.3, 0.9, size=3)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(autouse=True)
def _sigterm_restored():
    """The CLI's exit together (torchrun ranks leaving with one error) ignores SIGTERM in its process, which in
    tests is pytest's own: restored after every test, or later tests inherit it (a multiprocessing pool's
    workers then ignore the SIGTERM of Pool.terminate and its exit waits forever)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads cost 5-30x.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Eight synthetic 80x96 RGB PNG/JPEG images in two class subfolders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(8):
        d = root / ("cls_a" if i % 2 == 0 else "cls_b")
        d.mkdir(parents=True, exist_ok=True)
        arr = _smooth_image(rng, 80, 96)
        ext = ".png" if i < 6 else ".JPG"
        Image.fromarray(arr).save(d / f"img_{i}{ext}", quality=95)
    return root


@pytest.fixture
def make_images():
    """Factory: make_images(n, h, w, seed) -> uint8 (n, 3, h, w) tensor of synthetic images."""

    def make(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.stack([_smooth_image(rng, h, w) for _ in range(n)])).permute(0, 3, 1, 2).contiguous()

    return make
