"""Helpers for the metric tests: random-weight networks saved to files, real test images.

Pretrained weights cannot be downloaded here, so every network is initialised randomly, saved to
a temporary file and given to *both* raebench and the reference implementation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A torch-fidelity Inception state dict with kaiming-normal convolutions (PyTorch's default
    init makes pool3 features nearly vanish, and FID ~1e-15), saved to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}):
        net = FeatureExtractorInceptionV3("init", ["2048"], feature_extractor_weights_path="unused")
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    return path


def photo_crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 random crops of scikit-image's bundled photographs."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.hubble_deep_field()]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        s = int(rng.integers(size, min(im.shape[:2])))
        y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
        crop = Image.fromarray(im[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(crop))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def blurred(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian-blurred copies of uint8 (n, 3, H, W) images (PIL), like detail-losing reconstructions."""
    from PIL import ImageFilter

    out = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius))) for x in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class TensorDataset(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity wants its inputs (a Dataset of (3, H, W) uint8 tensors)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Projection:
    """Stand-in extractor: fixed random projections of 8x8-pooled pixels (cheap, deterministic).
    ``calls`` counts the images it saw, per extractor name."""

    variant = ""
    calls: dict[str, int] = {}  # noqa: RUF012  (a class-wide counter, reset by the fixture)

    def __init__(self, spec, device, outputs=(), **_):
        self.spec, self.outputs = spec, outputs
        g = torch.Generator().manual_seed(len(spec.name))
        self.w = {o: torch.randn(3 * 8 * 8, 20 if o == "spatial" else 24, generator=g, dtype=torch.float64)
                  for o in spec.outputs}
        self.identity = f"test-{spec.name}"

    def __call__(self, x):
        Projection.calls[self.spec.name] = Projection.calls.get(self.spec.name, 0) + x.shape[0]
        small = torch.nn.functional.adaptive_avg_pool2d(x.double(), 8).flatten(1) / 255
        return {o: (small @ self.w[o]).relu().float() for o in self.outputs}


@pytest.fixture
def stand_in_extractors(monkeypatch, tmp_path):
    """Replace the inception, dinov2 and clip extractors with :class:`Projection` for one test
    (and keep the feature cache in the test's folder)."""
    from raebench.metrics import EXTRACTORS

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "feature-cache"))
    def builder(spec):
        return lambda device, outputs=(), **options: Projection(spec, device, outputs)

    Projection.calls = {}
    for name in ("inception", "clip-l14-336", "dinov2-l14"):
        spec = EXTRACTORS.get(name)
        dims = tuple((o, 20 if o == "spatial" else 24) for o in spec.outputs)  # Projection's widths
        monkeypatch.setitem(EXTRACTORS._specs, name, replace(spec, builder=builder(spec), dims=dims, weights_path=None))
    return Projection


def save_pngs(images: torch.Tensor, folder: Path, ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"img_{i:03d}{ext}")
    return folder
