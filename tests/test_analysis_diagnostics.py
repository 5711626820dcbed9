"""Latent diagnostics: spectrum statistics against closed forms and scipy, the decoder robustness of
``pixels`` against the analytic PSNR of additive noise, interpolation, the diffusability probe."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from raebench.analysis import diagnostics as dg
from raebench.analysis import spectrum as sp
from raebench.tokenizers import Tokenizer, build_tokenizer


def _tokens_with_covariance(eigvals, n=400, seed=0):
    """(n, d) tokens whose population covariance is exactly V diag(eigvals) Vᵀ for a random V."""
    d = len(eigvals)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x -= x.mean(0)
    q, _ = torch.linalg.qr(x)  # (n, d) orthonormal columns, each orthogonal to the ones vector
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return math.sqrt(n) * q @ torch.diag(torch.tensor(eigvals, dtype=torch.float64).sqrt()) @ v.T + 5.0


def _stats(tokens, batches=3):
    """Feed (T, C) tokens as NCHW latents (T = N·H·W with H = W = 1) in several batches."""
    st = sp.LatentStats()
    for chunk in tokens.float().chunk(batches):
        st.update(chunk.double()[:, :, None, None])
    return st.summary()


def test_effective_rank_of_known_spectra():
    # flat spectrum on r of d directions: erank = PR = r, top-r energy = 1
    s = _stats(_tokens_with_covariance([2.0] * 6 + [0.0] * 4))
    assert s.effective_rank == pytest.approx(6.0, rel=1e-6)
    assert s.participation_ratio == pytest.approx(6.0, rel=1e-6)
    # a power law: closed forms from the eigenvalues themselves
    lam = np.array([1.0 / (i + 1) ** 1.5 for i in range(12)])
    p = lam / lam.sum()
    s = _stats(_tokens_with_covariance(lam.tolist(), seed=1))
    assert s.eigvals.numpy() == pytest.approx(np.sort(lam)[::-1], rel=1e-6, abs=1e-9)
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert s.participation_ratio == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-6)
    assert s.topk_energy[1] == pytest.approx(p[0], rel=1e-6)
    assert s.topk_energy[8] == pytest.approx(p[:8].sum(), rel=1e-6)
    assert s.topk_energy[32] == pytest.approx(1.0)
    assert sp.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_streaming_moments_match_scipy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, 4, 4, generator=g) ** 3 + 2.0  # heavy tails, offset (N, C, H, W)
    st = sp.LatentStats()
    for chunk in z.chunk(3):
        st.update(chunk)
    s = st.summary()
    tok = z.permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    assert s.kurtosis.numpy() == pytest.approx(scipy.stats.kurtosis(tok, axis=0, fisher=True, bias=True), rel=1e-8)
    cov = np.cov(tok, rowvar=False, bias=True)
    assert s.eigvals.numpy() == pytest.approx(np.sort(np.linalg.eigvalsh(cov))[::-1], rel=1e-8)
    assert s.latent_std == pytest.approx(math.sqrt(np.diag(cov).mean()), rel=1e-10)
    norms = np.linalg.norm(tok, axis=1)
    assert s.token_norm_mean == pytest.approx(norms.mean(), rel=1e-10)
    assert s.token_norm_std == pytest.approx(norms.std(), rel=1e-6)
    hoyer = (math.sqrt(5) - np.abs(tok).sum(1) / norms) / (math.sqrt(5) - 1)
    assert s.hoyer_sparsity == pytest.approx(hoyer.mean(), rel=1e-10)
    rms = norms / math.sqrt(5)
    assert s.near_zero_frac == pytest.approx((np.abs(tok) < 0.05 * rms[:, None]).mean(), abs=1e-12)
    # batch-size independent: one batch gives the same numbers
    one = sp.LatentStats()
    one.update(z)
    assert one.summary().near_zero_frac == s.near_zero_frac
    assert one.summary().kurtosis.numpy() == pytest.approx(s.kurtosis.numpy(), rel=1e-9)


def test_hoyer_sparsity_extremes():
    one_hot = torch.eye(4)[:, :, None, None]  # 4 tokens, each one-hot over 4 channels
    st = sp.LatentStats()
    st.update(one_hot)
    assert st.summary().hoyer_sparsity == pytest.approx(1.0)
    st = sp.LatentStats()
    st.update(torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 2.0, -2.0, 2.0]])[:, :, None, None])
    assert st.summary().hoyer_sparsity == pytest.approx(0.0, abs=1e-12)


def _rounded_gaussian_mse(sigma_lsb: float) -> float:
    """E[round(n)²] for n ~ N(0, σ²), in squared 8-bit steps (exact, summed over the integers)."""
    ks = np.arange(-int(12 * sigma_lsb) - 3, int(12 * sigma_lsb) + 4)
    p = scipy.stats.norm.cdf((ks + 0.5) / sigma_lsb) - scipy.stats.norm.cdf((ks - 0.5) / sigma_lsb)
    return float((ks.astype(np.float64) ** 2 * p).sum())


def test_pixels_robustness_equals_analytic_psnr(make_images):
    """``pixels``: z = 2x - 1, so decode(z + σ·s·ε) = x + n with n ~ N(0, (σ·s/2)²). The original x is
    on the 8-bit grid, so the rounded noisy image differs from it by exactly round(n) steps of 1/255:
    the analytic 8-bit PSNR is 10·log10(255² / E[round(n)²]) (:func:`_rounded_gaussian_mse`; about
    σ² + 1/12 steps², Sheppard's correction). Images are kept inside [0.3, 0.7], 76 steps from the
    clamp bounds, more than 5 sd of the largest noise, so clamping never acts. Bound: each image has
    M = 3·48·48 noise samples, its MSE a relative sd of sqrt(2/M) = 1.7%, and the mean PSNR over 8
    images an sd of 0.026 dB; we allow 0.1 dB."""
    tok = build_tokenizer("pixels")
    x = make_images(8, 48, 48).float() / 255 * 0.4 + 0.3
    imgs = (x * 255).round().to(torch.uint8)
    z = tok.encode(imgs.float() / 255)
    sigmas = (0.1, 0.25, 0.5)
    s = float(z.std())
    curve = dg.decoder_robustness(tok, imgs, z, sigmas, s, seed=0)
    for sig, got_dec, got_img in zip(sigmas, curve.psnr_vs_decode, curve.psnr_vs_image):
        sigma_lsb = sig * s / 2 * 255
        assert 0.5 < sigma_lsb < 76 / 5
        expected = 10 * math.log10(255**2 / _rounded_gaussian_mse(sigma_lsb))
        assert got_dec == pytest.approx(expected, abs=0.1)
        assert got_img == pytest.approx(got_dec, abs=1e-9)  # pixels reconstructs exactly
    assert curve.psnr_clean == 100.0  # identical 8-bit images: PSNR capped at 100 dB
    assert curve.psnr_vs_decode == sorted(curve.psnr_vs_decode, reverse=True)


def test_robustness_with_a_perceptual_distance_and_examples(make_images):
    tok = build_tokenizer("bicubic-f8")
    imgs = make_images(4, 32, 32)
    z = tok.encode(imgs.float() / 255)
    curve = dg.decoder_robustness(tok, imgs, z, (0.5, 1.0), 0.3, distance=dg.rmse_distance, distance_name="rmse", keep=2)
    assert curve.dist_vs_decode[0] < curve.dist_vs_decode[1]
    assert set(curve.examples) == {"original", "reconstruction", "noise σ=0.5·std"}
    assert curve.examples["reconstruction"].shape == (2, 3, 32, 32) and curve.examples["original"].dtype == torch.uint8
    for bad in [(0.0,), (float("nan"),), (float("inf"),), (1e300,), (0.5, -1.0), ()]:
        with pytest.raises(ValueError, match=r"numbers in \(0, 100\]"):
            dg.decoder_robustness(tok, imgs, z, bad, 0.3)


def test_robustness_of_latents_that_do_not_vary_is_nan():
    """Constant latents (std 0): σ·std adds no noise, so "perfectly robust" (100 dB) would be a lie."""
    tok = build_tokenizer("pixels")
    imgs = torch.full((3, 3, 16, 16), 128, dtype=torch.uint8)
    z = tok.encode(imgs.float() / 255)
    curve = dg.decoder_robustness(tok, imgs, z, (0.5, 1.0), 0.0, distance=dg.rmse_distance, distance_name="rmse")
    assert all(math.isnan(v) for v in curve.psnr_vs_decode + curve.psnr_vs_image + curve.dist_vs_decode + curve.dist_vs_image)
    assert "do not vary" in curve.note
    # a std of float32 rounding relative to the latents counts as none; a real one does not
    assert math.isnan(dg.decoder_robustness(tok, imgs, z, (1.0,), 1e-9).psnr_vs_decode[0])
    ok = dg.decoder_robustness(tok, imgs, z, (1.0,), 0.05)
    assert not ok.note and 20 < ok.psnr_vs_decode[0] < 40  # noise std 0.05 of 1: about 26 dB before rounding


def test_pixels_interpolation_is_a_straight_path(make_images):
    """Linear interpolation in pixel space is a straight line in RMSE: every step has the same
    length (up to 8-bit rounding), the path ratio is 1."""
    tok = build_tokenizer("pixels")
    imgs = make_images(6, 32, 32)
    z = tok.encode(imgs.float() / 255)
    pairs = dg.interpolation_pairs(6, 3, seed=0)
    assert len(pairs) == 3 and len({i for p in pairs for i in p}) == 6
    res = dg.interpolation_smoothness(tok, z, pairs, steps=4)
    assert res.step_dist.shape == (3, 4)
    assert res.path_ratio == pytest.approx(1.0, abs=0.01)
    per_pair = res.speed / res.endpoint_dist[:, None]  # each step's speed equals the endpoint distance
    assert per_pair.numpy() == pytest.approx(np.ones((3, 4)), abs=0.02)
    assert res.step_mean == pytest.approx(float(res.endpoint_dist.mean()), rel=0.02)
    assert 0 <= res.step_relvar < 1e-3


class _SharpDecoder(Tokenizer):
    """decode(z) = (tanh(1000 z) + 1) / 2: nearly binary images, so interpolation jumps mid-way."""

    def encode(self, x):
        return x * 2 - 1

    def decode(self, z):
        return (torch.tanh(1000 * z) + 1) / 2


def test_uneven_interpolation_has_a_large_relative_variance():
    """Between flat images of 73/255 and 153/255 every pixel of the sharp decoder flips at t ≈ 0.68:
    one step carries the whole change, so Var/Mean² = S - 1 = 7; the identity decoder changes by
    exactly 10 steps of 1/255 per step."""
    imgs = torch.stack([torch.full((3, 8, 8), 73.0), torch.full((3, 8, 8), 153.0)])
    even = dg.interpolation_smoothness(build_tokenizer("pixels"), build_tokenizer("pixels").encode(imgs / 255), [(0, 1)], steps=8)
    sharp_tok = _SharpDecoder()
    sharp = dg.interpolation_smoothness(sharp_tok, sharp_tok.encode(imgs / 255), [(0, 1)], steps=8)
    assert even.step_relvar < 1e-3
    assert sharp.step_relvar == pytest.approx(7.0, rel=0.05)


def test_diffusability_probe_trains_with_the_stage2_trainer_and_resumes(make_images, tmp_path):
    from raebench.analysis.diffusability import ProbeConfig, diffusability_probe
    from raebench.analysis.references import build_reference

    tok = build_tokenizer("bicubic-f8")
    imgs = make_images(8, 64, 64)
    z = tok.encode(imgs.float() / 255)  # (8, 3, 8, 8)
    _, enc = build_reference("random-proj")
    cfg = ProbeConfig(preset="ditdh-tiny", steps=3, batch_size=4, n_samples=6, sample_steps=3)
    refs = {"random-proj": (enc, enc(imgs).double())}
    res = diffusability_probe(tok, z, cfg, tmp_path / "probe", refs)
    assert math.isfinite(res.latent_fd) and res.latent_fd >= 0 and math.isfinite(res.final_loss)
    assert math.isfinite(res.reference_fd["random-proj"])
    assert (tmp_path / "probe" / "checkpoints" / "last.pt").is_file()
    assert "ditdh-tiny-steps3" in cfg.version
    again = diffusability_probe(tok, z, cfg, tmp_path / "probe", refs)  # the finished run is reused, not retrained
    assert again.latent_fd == res.latent_fd and math.isnan(again.final_loss)
    with pytest.raises(ValueError, match="tokens"):
        diffusability_probe(tok, torch.zeros(8, 3, 80, 80), cfg, tmp_path / "big")


def test_diffusability_probe_time_shift_is_rae_s(monkeypatch, tmp_path):
    """The probe trains with RAE's time shift s = sqrt(C·H·W / 4096) (its configs: base 4096), and
    s = 1 for latents under 4096 dimensions (the transport needs s >= 1)."""
    import raebench.stage2.train as st
    from raebench.analysis.diffusability import ProbeConfig, train_and_sample
    from raebench.stage2.transport import shift_from_dims

    seen = []

    def fake_train(cfg, *args, **kwargs):
        seen.append(cfg)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(st, "train", fake_train)
    cfg = ProbeConfig(preset="ditdh-tiny", steps=1, batch_size=2)
    for shape, shift in (((2, 16, 32, 32), 2.0), ((2, 3, 8, 8), 1.0)):  # 16·32·32 = 4·4096; 3·8·8 = 192
        with pytest.raises(RuntimeError, match="stop"):
            train_and_sample(torch.zeros(shape), cfg, tmp_path)
        c, h = shape[1], shape[2]
        assert shift_from_dims(c * h * h, seen[-1].shift_base) == pytest.approx(shift)


def test_kept_latents_do_not_hold_their_batch(make_images):
    """The probe and diagnostic latents kept from a batch are their own tensors: a view would keep the
    whole batch's latents alive (on a GPU, ~16x the memory at batch 16)."""
    from raebench.analysis.stream import Accumulator, Keep
    from raebench.tokenizers.reference import PixelTokenizer

    acc = Accumulator(PixelTokenizer(), Keep(8, 2, 0), Keep(8, 3, 0))
    acc.update(make_images(8, 16, 16, seed=0), list(range(8)))
    kept = [p[1] for p in acc.diag.payloads()] + [p[0] for p in acc.probe.payloads()]
    assert len(kept) == 5
    for z in kept:
        assert z.untyped_storage().nbytes() == z.numel() * z.element_size()


def test_spectrum_zero_tokens_tight_norms_and_empty_batches():
    """All-zero tokens count as near zero and stay out of the Hoyer mean (they counted as dense with
    sparsity 0); the token-norm spread is accumulated about a shift (E[n²] - E[n]² gave 0 for norms
    1e5 ± 1e-4) and merges exactly across shards; an empty batch changes nothing (it set NaN)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, 4, 4, generator=g, dtype=torch.float64)
    z[:5] = 0
    st = sp.LatentStats()
    st.update(z)
    st.update(z[:0])
    s = st.summary()
    tok = z.permute(0, 2, 3, 1).reshape(-1, 4)
    live = tok[tok.norm(dim=1) > 0]
    hoyer = ((2 - live.abs().sum(1) / live.norm(dim=1)) / (2 - 1)).mean()
    assert s.hoyer_sparsity == pytest.approx(float(hoyer), rel=1e-12)
    assert s.near_zero_frac >= 0.5 and math.isfinite(s.latent_std)

    z = torch.randn(20, 16, 8, 8, generator=g, dtype=torch.float64) * 1e-4 + 1e5
    norms = z.permute(0, 2, 3, 1).reshape(-1, 16).norm(dim=1).numpy()
    one, parts = sp.LatentStats(), [sp.LatentStats(), sp.LatentStats()]
    one.update(z)
    parts[0].update(z[:7])
    parts[1].update(z[7:] + 0)  # another first-batch shift
    parts[0].merge(parts[1].state())
    for st in (one, parts[0]):
        s = st.summary()
        assert s.token_norm_mean == pytest.approx(float(norms.mean()), rel=1e-14)
        assert s.token_norm_std == pytest.approx(float(norms.std()), rel=1e-6)


def test_spectrum_refuses_non_finite_latents():
    """One NaN entry poisoned every sum and summary() failed in eigvalsh with a convergence error."""
    st = sp.LatentStats()
    z = torch.randn(2, 3, 2, 2)
    z[1, 2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        st.update(z)
    st.update(torch.randn(2, 3, 2, 2))  # nothing of the refused batch was added
    assert st.n == 8 and math.isfinite(st.summary().effective_rank)


def test_latent_fd_equals_scipy_on_tokens():
    """diffuse-latent-fd: the Fréchet distance of Gaussian fits (unbiased covariance) of the C-channel
    tokens, against scipy's sqrtm written here; N below and above the token dimension."""
    import scipy.linalg

    from raebench.analysis.diffusability import feature_fd

    g = torch.Generator().manual_seed(0)
    for n in (1, 6):  # 4 tokens per latent: 4 and 24 tokens of 6 channels
        a = torch.randn(n, 6, 2, 2, generator=g, dtype=torch.float64)
        b = 1.3 * torch.randn(n + 2, 6, 2, 2, generator=g, dtype=torch.float64) + 0.2
        x, y = sp.tokens_of(a).numpy(), sp.tokens_of(b).numpy()
        ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
        assert feature_fd(sp.tokens_of(a), sp.tokens_of(b)) == pytest.approx(ref, rel=1e-7)


def _u8(x: torch.Tensor) -> np.ndarray:
    """The documented 8-bit conversion, in numpy: clamp to [0, 1], x·255 + 0.5 floored."""
    return np.floor(np.clip(x.detach().float().numpy(), 0, 1) * np.float32(255) + np.float32(0.5))


class _CurvedDecoder(_SharpDecoder):
    def decode(self, z):
        return (torch.tanh(3 * z) + 1) / 2


def test_robustness_and_interpolation_equal_a_direct_computation(make_images):
    """Every row of both diagnostics against its definition computed here for a decoder that is not
    the identity (bicubic-f8): decodes, 8-bit rounding, PSNR and RMSE in numpy float64, the noise
    drawn by the documented recipe (one torch.randn of the latents' shape, CPU generator seeded with
    the seed). rel 1e-6: the library compares the 8-bit images after float32 division by 255."""
    tok = build_tokenizer("bicubic-f8")
    imgs = make_images(4, 32, 32)
    z = tok.encode(imgs.float() / 255)
    sigmas, std = (0.3, 2.0), 0.2
    curve = dg.decoder_robustness(tok, imgs, z, sigmas, std, distance=dg.rmse_distance, distance_name="rmse", seed=5)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    ref, clean = imgs.double().numpy(), _u8(tok.decode(z)).astype(np.float64)

    def psnr(a, b):
        return float(np.mean([min(100.0, 10 * np.log10(255.0**2 / np.mean((x - y) ** 2))) for x, y in zip(a, b)]))

    def rmse(a, b):
        return np.sqrt(((a - b) / 255.0).reshape(len(a), -1).__pow__(2).mean(1))

    assert curve.psnr_clean == pytest.approx(psnr(clean, ref), rel=1e-6)
    for i, s in enumerate(sigmas):
        noisy = _u8(tok.decode(z + s * std * eps)).astype(np.float64)
        assert curve.psnr_vs_decode[i] == pytest.approx(psnr(noisy, clean), rel=1e-6)
        assert curve.psnr_vs_image[i] == pytest.approx(psnr(noisy, ref), rel=1e-6)
        assert curve.dist_vs_decode[i] == pytest.approx(rmse(noisy, clean).mean(), rel=1e-6)
        assert curve.dist_vs_image[i] == pytest.approx(rmse(noisy, ref).mean(), rel=1e-6)

    # a curved decoder, so the relative variance is not a difference of rounding errors (bicubic is linear in z)
    tok = _CurvedDecoder()
    z = tok.encode(imgs.float() / 255)
    steps, pairs = 3, [(0, 2), (3, 1)]
    res = dg.interpolation_smoothness(tok, z, pairs, steps=steps)
    assert res.step_relvar > 1e-3
    d, ends = [], []
    for a, b in pairs:
        path = [_u8(tok.decode((1 - k / steps) * z[a : a + 1] + k / steps * z[b : b + 1]))[0].astype(np.float64)
                for k in range(steps + 1)]
        d.append([rmse(path[k][None], path[k + 1][None])[0] for k in range(steps)])
        ends.append(rmse(path[0][None], path[-1][None])[0])
    v = np.array(d) * steps  # distance per unit t
    assert res.step_mean == pytest.approx(v.mean(), rel=1e-6)
    assert res.step_relvar == pytest.approx((v.var(1) / v.mean(1) ** 2).mean(), rel=1e-6)
    assert res.path_ratio == pytest.approx((np.array(d).sum(1) / np.array(ends)).mean(), rel=1e-6)
