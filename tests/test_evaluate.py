"""The one-pass evaluator: NaN handling, batch-size independence, provenance of rows."""

from pathlib import Path

import pytest
import torch

from raebench.errors import RaebenchError
from raebench.eval_config import EvalConfig
from raebench.evaluate import evaluate
from raebench.tokenizers.reference import BicubicTokenizer


class _NaNOnBright(BicubicTokenizer):
    """Returns NaN reconstructions for images brighter than a threshold."""

    def decode(self, z):
        x = super().decode(z)
        bright = x.flatten(1).mean(1) > self.threshold
        x[bright] = float("nan")
        return x


def _cfg(folder: Path, tmp: Path, **kw) -> EvalConfig:
    return EvalConfig(**{"tokenizer": "bicubic-f8", "data": str(folder), "resolution": 32, "device": "cpu",
                         "results_dir": str(tmp), **kw})


def test_nonfinite_images_are_excluded_and_counted(image_folder: Path, tmp_path: Path):
    tok = _NaNOnBright(8)
    tok.name, tok.threshold = "nan-tok", -1.0  # every image NaN
    with pytest.raises(RaebenchError, match="NaN/Inf"):
        evaluate(_cfg(image_folder, tmp_path), tokenizer=tok)
    clean = evaluate(_cfg(image_folder, tmp_path / "clean"))
    # threshold at the median brightness: about half the images are NaN
    means = sorted(clean_means(image_folder))
    tok.threshold = means[len(means) // 2] - 1e-9
    out = evaluate(_cfg(image_folder, tmp_path / "half"), tokenizer=tok)
    assert 0 < len(out.nonfinite) < 8 and out.n_images == 8 - len(out.nonfinite)
    assert all(r.nonfinite == len(out.nonfinite) for r in out.rows)
    assert all(torch.isfinite(torch.tensor(r.value)) for r in out.rows)
    assert clean.n_images == 8


def clean_means(folder: Path):
    from raebench.folders import scan_folder
    from raebench.images import to_float
    from raebench.loaders import ImageDataset

    ds = ImageDataset(scan_folder(folder), 32)
    tok = BicubicTokenizer(8)
    return [float(tok.reconstruct(to_float(ds[i]["image"][None])).mean()) for i in range(len(ds))]


def test_batch_size_does_not_change_numbers(image_folder: Path, tmp_path: Path):
    a = evaluate(_cfg(image_folder, tmp_path / "a", batch_size=1))
    b = evaluate(_cfg(image_folder, tmp_path / "b", batch_size=16))
    assert {r.metric: r.value for r in a.rows} == pytest.approx({r.metric: r.value for r in b.rows}, rel=1e-12)


def test_rows_carry_provenance(image_folder: Path, tmp_path: Path):
    out = evaluate(_cfg(image_folder, tmp_path, limit=5, seed=3))
    r = out.rows[0]
    assert (r.tokenizer, r.dataset, r.resolution, r.n_images, r.seed) == ("bicubic-f8", "images", 32, 5, 3)
    assert r.data_fingerprint and r.metric_version and r.run_id and r.device == "cpu"
    assert r.extra["limit"] == 5


def test_bf16_runs_and_stays_close(image_folder: Path, tmp_path: Path):
    a = evaluate(_cfg(image_folder, tmp_path / "a"))
    b = evaluate(_cfg(image_folder, tmp_path / "b", precision="bf16"))
    va, vb = ({r.metric: r.value for r in o.rows} for o in (a, b))
    assert vb["psnr"] == pytest.approx(va["psnr"], abs=0.5)


class _InfLatentOnFirst(BicubicTokenizer):
    """An Inf in the first image's latent that the decoder hides (nan_to_num): only the latent shows it."""

    name = "inf-latent"

    def encode(self, x):
        z = super().encode(x)
        if self.first:
            z[0, 0, 0, 0] = float("inf")
            self.first = False
        return z

    def decode(self, z):
        return super().decode(torch.nan_to_num(z, posinf=0.5, neginf=0.5)).clamp(0, 1)


def test_nonfinite_latents_are_excluded_even_when_the_decoder_hides_them(image_folder: Path, tmp_path: Path):
    tok = _InfLatentOnFirst(8)
    tok.first = True
    out = evaluate(_cfg(image_folder, tmp_path, batch_size=8), tokenizer=tok)
    assert len(out.nonfinite) == 1 and out.n_images == 7
    assert all(r.nonfinite == 1 for r in out.rows)


def test_rows_equal_scikit_image_on_the_saved_8bit_reconstructions(image_folder: Path, tmp_path: Path):
    """PSNR and SSIM rows against scikit-image on what a PNG of the reconstruction holds:
    clamp, x * 255 + 0.5 floored (not truncated), computed independently image by image."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from raebench.folders import scan_folder
    from raebench.images import to_float
    from raebench.loaders import ImageDataset

    out = evaluate(_cfg(image_folder, tmp_path, metrics=("psnr", "ssim")))
    ds, tok = ImageDataset(scan_folder(image_folder), 32), BicubicTokenizer(8)
    psnrs, ssims = [], []
    for i in range(len(ds)):
        img = ds[i]["image"]  # (3, R, R) uint8
        rec = tok.reconstruct(to_float(img[None]))[0].numpy()  # float32, as torchvision's save_image rounds
        rec8 = np.floor(np.clip(rec, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.float64).transpose(1, 2, 0) / 255
        a = img.numpy().transpose(1, 2, 0) / 255
        psnrs.append(peak_signal_noise_ratio(a, rec8, data_range=1.0))
        ssims.append(structural_similarity(a, rec8, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=2))
    got = {r.metric: r.value for r in out.rows}
    assert got["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert got["ssim"] == pytest.approx(np.mean(ssims), rel=1e-9)
