"""Fréchet distance: equal to scipy's sqrtm at d = 2048, exact for N < d, streaming and merging."""

import numpy as np
import pytest
import scipy.linalg
import torch

from raebench.metrics.frechet import GaussianStats, frechet_distance, trace_sqrt_product


def _sqrtm_fd(mu1, s1, mu2, s2) -> float:
    """The reference: scipy's sqrtm of the product (what pytorch-fid / clean-fid / ADM do)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Correlated non-negative features, like pooled ReLU activations."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.abs(rng.standard_normal((n, d)) @ mix + shift)


def test_equals_scipy_sqrtm_at_d2048():
    d = 2048
    rng = np.random.default_rng(0)
    # full-rank covariances straight from random factors (cheaper than 2k+ feature rows)
    a1, a2 = rng.standard_normal((d, d + 64)) / d, rng.standard_normal((d, d + 64)) / d * 1.3
    s1, s2 = a1 @ a1.T, a2 @ a2.T + 0.1 * a1 @ a1.T
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_sqrtm_fd(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.parametrize("n1,n2", [(20, 30), (300, 30), (300, 400)])
def test_small_cases_equal_sqrtm_and_low_rank_is_exact(n1, n2):
    d = 128
    x, y = _features(n1, d, 1), _features(n2, d, 2, shift=0.3)
    g1, g2 = GaussianStats(), GaussianStats()
    g1.update(torch.from_numpy(x))
    g2.update(torch.from_numpy(y))
    mu1, s1, mu2, s2 = g1.mean(), g1.cov(), g2.mean(), g2.cov()
    assert np.allclose(s1.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)
    ours = frechet_distance(mu1, s1, mu2, s2, g1.factor(), g2.factor())
    if n1 > d and n2 > d:
        assert g1.factor() is None and g2.factor() is None
        assert ours == pytest.approx(_sqrtm_fd(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()), rel=1e-8)
    else:
        # exact reference for N < d: the non-zero spectrum of Σ1Σ2 is that of (Y Xᵀ)(Y Xᵀ)ᵀ with
        # Σ1 = XᵀX, Σ2 = YᵀY (centred rows / sqrt(N - 1)), so tr sqrt = nuclear norm of Y Xᵀ
        xc = (x - x.mean(0)) / np.sqrt(n1 - 1)
        yc = (y - y.mean(0)) / np.sqrt(n2 - 1)
        tr = np.linalg.svd(yc @ xc.T, compute_uv=False).sum()
        assert trace_sqrt_product(s1, s2, g1.factor(), g2.factor()) == pytest.approx(tr, rel=1e-10)
        # and the dense path (Cholesky / eigen-factor of a singular Σ) agrees to rounding
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ours, rel=1e-6)


def test_equals_torch_fidelity_statistics_to_metric():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    x, y = _features(400, 64, 3), _features(500, 64, 4, shift=0.2)
    st = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (x, y)]
    theirs = fid_statistics_to_metric(st[0], st[1], verbose=False)["frechet_inception_distance"]
    assert frechet_distance(st[0]["mu"], st[0]["sigma"], st[1]["mu"], st[1]["sigma"]) == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("n", [10, 500])
def test_identical_sets_give_zero(n):
    x = torch.from_numpy(_features(n, 64, 5))
    g = GaussianStats()
    g.update(x)
    assert frechet_distance(g.mean(), g.cov(), g.mean(), g.cov(), g.factor(), g.factor()) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(g.mean(), g.cov(), g.mean(), g.cov()) == pytest.approx(0.0, abs=1e-6)


def test_streaming_is_batch_size_independent_and_merges():
    x = torch.from_numpy(_features(100, 32, 6)).float()
    one, many = GaussianStats(), GaussianStats()
    many.update(x)
    for row in x:
        one.update(row[None])
    assert torch.allclose(one.cov(), many.cov(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(one.mean(), many.mean(), rtol=1e-13)
    assert torch.equal(torch.cat(one.rows), torch.cat(many.rows))


def test_metric_notes_n_below_d_and_uses_stored_reference_stats():
    from raebench.metrics import METRICS, MetricBatch

    spec = METRICS.get("fid")
    x, y = _features(40, 64, 7), _features(30, 64, 8, shift=0.1)
    m = spec.build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": torch.from_numpy(y)}, {"pool": torch.from_numpy(x)})}))
    value = m.compute()["fid"]
    assert any("N < d" in n for n in m.notes)
    # the same reference given as stored statistics (an ADM reference batch) gives the same value
    m2 = spec.build()
    m2.set_reference_stats({"mu": y.mean(0), "sigma": np.cov(y, rowvar=False)})
    m2.update(MetricBatch(None, None, {"inception": ({"pool": torch.from_numpy(y + 100)}, {"pool": torch.from_numpy(x)})}))
    assert m2.compute()["fid"] == pytest.approx(value, rel=1e-6)
    # stored statistics that cannot be a Gaussian's are refused when given, not after the pass
    from raebench.metrics.base import MetricInputError

    for bad in ({"mu": np.full(64, np.nan), "sigma": np.eye(64)}, {"mu": np.zeros(64), "sigma": np.eye(10)}):
        with pytest.raises(MetricInputError, match="NaN/Inf|shape"):
            spec.build().set_reference_stats(bad)


@pytest.mark.parametrize("offset", [1e6, 1e7])
def test_large_feature_offsets_equal_a_float64_reference(offset):
    """Raw moments (ΣxxT − Nμμᵀ) cancel at large offsets (1e7 gave 2.008 for 1.710); the shifted sums
    equal scipy on np.cov (which centres first), streamed in batches and merged across shards."""
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(200, 16)) + offset, rng.normal(size=(240, 16)) * 1.2 + offset
    ref = _sqrtm_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    g1, g2 = GaussianStats(), GaussianStats()
    for b in np.array_split(x, 7):
        g1.update(torch.from_numpy(b))
    shards = [GaussianStats() for _ in range(3)]  # three ranks, each with its own shift
    for g, part in zip(shards, np.array_split(y, 3)):
        for b in np.array_split(part, 4):
            g.update(torch.from_numpy(b))
    for g in shards:
        g2.add(g.n, g.shift, g.sum, g.sum_outer, g.rows)
    assert np.allclose(g2.cov().numpy(), np.cov(y, rowvar=False), rtol=1e-9, atol=1e-9)
    assert frechet_distance(g1.mean(), g1.cov(), g2.mean(), g2.cov()) == pytest.approx(ref, rel=1e-8)
    # translation invariance: the same sets without the offset
    h1, h2 = GaussianStats(), GaussianStats()
    h1.update(torch.from_numpy(x - offset))
    h2.update(torch.from_numpy(y - offset))
    assert frechet_distance(h1.mean(), h1.cov(), h2.mean(), h2.cov()) == pytest.approx(ref, rel=1e-7)


def test_metric_states_merge_across_shifts_and_from_raw_sums():
    """FrechetMetric.state()/merge() across shards with other shifts, and a state saved before shifts
    existed (raw Σx, ΣxxT, no "shift") still merges exactly."""
    from raebench.metrics import METRICS, MetricBatch

    spec = METRICS.get("fid")
    x, y = _features(60, 24, 10, shift=5.0), _features(50, 24, 11)
    whole = spec.build()
    whole.update(MetricBatch(None, None, {"inception": ({"pool": torch.from_numpy(y)}, {"pool": torch.from_numpy(x)})}))
    merged = spec.build()
    for lo, hi in ((0, 25), (25, 60)):
        part = spec.build()
        part.update(MetricBatch(None, None, {"inception": ({"pool": torch.from_numpy(y[lo:hi])}, {"pool": torch.from_numpy(x[lo:hi])})}))
        merged.merge(part.state())
    old = {side: {"n": len(a), "sum": torch.from_numpy(a.sum(0)), "sum_outer": torch.from_numpy(a.T @ a), "rows": []}
           for side, a in (("ref", y), ("cand", x))}
    from_raw = spec.build()
    from_raw.merge(old)
    expected = _sqrtm_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    for m in (whole, merged, from_raw):
        assert m.compute()["fid"] == pytest.approx(expected, rel=1e-8)


def test_low_rank_factor_drops_the_direction_centred_rows_lack():
    """With N ≤ d the trace term is the nuclear norm of Y_c X_cᵀ; keeping the centred rows' null
    direction made it off by up to ~5e-9 relative (sqrt of rounding noise), now ~1e-15."""
    worst = 0.0
    for seed in range(6):
        x, y = _features(20, 128, seed), _features(30, 128, seed + 50, shift=0.3)
        g1, g2 = GaussianStats(), GaussianStats()
        g1.update(torch.from_numpy(x))
        g2.update(torch.from_numpy(y))
        assert g1.factor().shape == (128, 19)
        assert torch.allclose(g1.factor() @ g1.factor().T, g1.cov(), rtol=1e-12, atol=1e-14)
        xc, yc = (x - x.mean(0)) / np.sqrt(19), (y - y.mean(0)) / np.sqrt(29)
        tr = np.linalg.svd(yc @ xc.T, compute_uv=False).sum()
        worst = max(worst, abs(trace_sqrt_product(g1.cov(), g2.cov(), g1.factor(), g2.factor()) / tr - 1))
    assert worst < 1e-13


def test_resumed_state_follows_the_features_device(monkeypatch):
    """A saved state loads on the CPU; on resume the features come from the extractor's device. The
    'meta' device stands in for a GPU: the update must move the sums, not fail on mixed devices."""
    from raebench.metrics import METRICS, MetricBatch

    x = torch.rand(6, 5, dtype=torch.float64)
    m = METRICS.get("fid").build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": x.float()}, {"pool": x.float()})}))
    st = m.state()
    assert all(st[side][k].device.type == "cpu" for side in ("ref", "cand") for k in ("shift", "sum", "sum_outer"))
    import raebench.metrics.frechet as fr

    monkeypatch.setattr(fr, "KEEP_ROWS_MAX", 0)  # meta tensors hold no rows to keep
    g = GaussianStats()
    g.add(st["ref"]["n"], st["ref"]["shift"], st["ref"]["sum"], st["ref"]["sum_outer"], [])
    g.update(torch.rand(3, 5, device="meta"))
    assert g.sum.device.type == "meta" and g.n == 9
