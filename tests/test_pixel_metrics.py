"""PSNR and SSIM equal scikit-image on real and distorted images."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from raebench.images import adm_center_crop
from raebench.metrics import METRICS, MetricBatch
from raebench.metrics.pixel import psnr_per_image, ssim_per_image


def _real_pairs():
    """(original, distorted) uint8 HWC pairs from real photographs, several distortions."""
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        im = getattr(skdata, name)()
        im = np.stack([im] * 3, -1) if im.ndim == 2 else im
        a = adm_center_crop(Image.fromarray(im), 96)
        noisy = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).round().astype(np.uint8)
        blur = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.5)))
        import io

        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=20)
        jpeg = np.asarray(Image.open(buf).convert("RGB"))
        pairs += [(a, noisy), (a, blur), (a, jpeg)]
    return pairs


PAIRS = _real_pairs()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255.0


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_psnr_ssim_equal_skimage(i):
    a, b = PAIRS[i]
    ref_psnr = peak_signal_noise_ratio(a / 255.0, b / 255.0, data_range=1.0)
    ref_ssim = structural_similarity(
        a / 255.0, b / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2
    )
    assert psnr_per_image(_t(a), _t(b)).item() == pytest.approx(ref_psnr, rel=1e-12)  # float64 on both sides
    # our torch implementation (the GPU path) against scikit-image, and the CPU dispatch
    assert ssim_per_image(_t(a), _t(b), backend="torch").item() == pytest.approx(ref_ssim, rel=1e-5)
    assert ssim_per_image(_t(a), _t(b)).item() == pytest.approx(ref_ssim, rel=1e-12)


def test_metric_classes_mean_over_images_and_batch_independence():
    refs = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a, _ in PAIRS])
    cands = torch.stack([torch.from_numpy(b).permute(2, 0, 1) for _, b in PAIRS])
    expected_psnr = np.mean([peak_signal_noise_ratio(a / 255.0, b / 255.0, data_range=1.0) for a, b in PAIRS])
    expected_ssim = np.mean([
        structural_similarity(a / 255.0, b / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=1.0, channel_axis=2)
        for a, b in PAIRS
    ])
    for bs in (1, 5, len(PAIRS)):
        for name, expected in (("psnr", expected_psnr), ("ssim", expected_ssim)):
            m = METRICS.get(name).build()
            for s in range(0, len(PAIRS), bs):
                m.update(MetricBatch(refs[s : s + bs], cands[s : s + bs]))
            assert m.compute()[name] == pytest.approx(expected, rel=1e-6)


def test_psnr_identical_is_capped_not_infinite():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert psnr_per_image(x, x).tolist() == [100.0, 100.0]


def test_ssim_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_per_image(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), backend="torch")
    with pytest.raises(ValueError):
        ssim_per_image(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    # the evaluator's own size check (min_image_side) is scikit-image's window: 2 * int(3.5 * 1.5 + 0.5) + 1 = 11
    # taps for sigma 1.5; a 10 px image passes neither, an 11 px one both
    assert METRICS.get("ssim").min_image_side == 11
    structural_similarity(np.zeros((11, 11)), np.zeros((11, 11)), gaussian_weights=True, sigma=1.5, data_range=1.0)
    with pytest.raises(ValueError):
        structural_similarity(np.zeros((10, 10)), np.zeros((10, 10)), gaussian_weights=True, sigma=1.5, data_range=1.0)


def test_state_merge_reproduces_single_pass():
    refs = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a, _ in PAIRS])
    cands = torch.stack([torch.from_numpy(b).permute(2, 0, 1) for _, b in PAIRS])
    for name in ("psnr", "ssim"):
        whole = METRICS.get(name).build()
        whole.update(MetricBatch(refs, cands))
        a, b = METRICS.get(name).build(), METRICS.get(name).build()
        a.update(MetricBatch(refs[:5], cands[:5]))
        b.update(MetricBatch(refs[5:], cands[5:]))
        merged = METRICS.get(name).build()
        merged.merge(a.state())
        merged.merge(b.state())
        assert merged.compute()[name] == pytest.approx(whole.compute()[name], rel=1e-12)


def test_paired_means_are_the_same_bits_for_any_split_and_merge_order():
    """A running float sum made 2 torchrun ranks differ from 1 process in PSNR's last digit; the
    per-image scores are now summed exactly rounded (math.fsum), so every split into batches or
    shards, merged in any order, gives the identical value: the single-process one."""
    import math

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(257, generator=g, dtype=torch.float64) * 40 + 10  # PSNR-like, a sum that rounds
    spec = METRICS.get("psnr")

    def metric_with(chunks):
        m = spec.build()
        m.values = [c.clone() for c in chunks]
        return m

    whole = metric_with([scores]).compute()["psnr"]
    assert whole == math.fsum(scores.tolist()) / 257
    old = {sum(float(c.sum()) for c in order) for parts in ((1, 256), (128, 129), (3, 100, 154), (200, 57))
           for cs in [list(torch.split(scores, list(parts)))] for order in (cs, cs[::-1])}
    assert len(old) > 1  # the running sum of shard sums, as before, does depend on the split and order here
    for parts in ((1, 256), (128, 129), (3, 100, 154), (200, 57)):
        chunks = list(torch.split(scores, list(parts)))
        shards = [metric_with([c]) for c in chunks]
        for order in (shards, shards[::-1]):
            merged = spec.build()
            for sh in order:
                merged.merge(sh.state())
            assert merged.compute()["psnr"] == whole


def test_float64_paired_metrics_are_the_same_bits_at_any_batch_size_and_shard_split():
    """Through update(): PSNR, SSIM and MS-SSIM per image in float64, summed exactly rounded, give the
    identical mean for batch sizes 1, 4 and all, and for shards merged in either order."""
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 256, (7, 3, 176, 176), generator=g, dtype=torch.uint8)
    c = (r.int() + torch.randint(-20, 21, r.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    for name in ("psnr", "ssim", "ms-ssim"):
        vals = set()
        for bs in (1, 4, 7):
            m = METRICS.get(name).build()
            for s in range(0, 7, bs):
                m.update(MetricBatch(r[s:s + bs], c[s:s + bs]))
            vals.add(m.compute()[name])
        shards = []
        for lo, hi in ((0, 3), (3, 7)):
            sh = METRICS.get(name).build()
            sh.update(MetricBatch(r[lo:hi], c[lo:hi]))
            shards.append(sh.state())
        for order in (shards, shards[::-1]):
            merged = METRICS.get(name).build()
            for st in order:
                merged.merge(st)
            vals.add(merged.compute()[name])
        assert len(vals) == 1, (name, vals)
