"""Alignment metrics and probes against brute-force definitions written here, and their properties."""

import itertools
import math

import numpy as np
import pytest
import torch

from raebench.analysis import alignment as al


def _feats(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(_feats(d, d, seed))
    return q


# --------------------------------------------------------------------------------------------
# Brute-force definitions (loops over samples; numpy; no shared code with the library)
# --------------------------------------------------------------------------------------------


def _unit_rows(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _neighbours(x, k):
    """Per sample, the set of its k most similar other samples (inner product of unit rows)."""
    u = _unit_rows(x)
    out = []
    for i in range(len(u)):
        sims = [(float(u[i] @ u[j]), j) for j in range(len(u)) if j != i]
        sims.sort(key=lambda s: -s[0])
        out.append({j for _, j in sims[:k]})
    return out


def brute_mutual_knn(a, b, k):
    na, nb = _neighbours(a, k), _neighbours(b, k)
    return sum(len(na[i] & nb[i]) / k for i in range(len(na))) / len(na)


def brute_hsic_u_statistic(K, L):
    """Song et al. (2012): the U-statistic over ordered 4-tuples of distinct indices."""
    m = len(K)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(m), 4):
        total += K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
        count += 1
    return total / count


def brute_hsic_eq5(K, L):
    """Eq. 5 of Song et al. written with explicit sums over off-diagonal entries."""
    m = len(K)
    off = [(i, j) for i in range(m) for j in range(m) if i != j]
    tr = sum(K[i][j] * L[j][i] for i, j in off)
    sk = sum(K[i][j] for i, j in off)
    sl = sum(L[i][j] for i, j in off)
    ones_kl_ones = sum(K[i][j] * L[j][q] for i, j in off for q in range(m) if q != j)
    return (tr + sk * sl / ((m - 1) * (m - 2)) - 2 * ones_kl_ones / (m - 2)) / (m * (m - 3))


def brute_cknna(a, b, k):
    ua, ub = _unit_rows(a), _unit_rows(b)
    m = len(ua)
    K = [[float(ua[i] @ ua[j]) for j in range(m)] for i in range(m)]
    L = [[float(ub[i] @ ub[j]) for j in range(m)] for i in range(m)]
    na, nb = _neighbours(a, k), _neighbours(b, k)
    mk = [[1.0 if j in na[i] else 0.0 for j in range(m)] for i in range(m)]
    ml = [[1.0 if j in nb[i] else 0.0 for j in range(m)] for i in range(m)]

    def masked(mask, X):
        return [[mask[i][j] * X[i][j] for j in range(m)] for i in range(m)]

    both = [[mk[i][j] * ml[i][j] for j in range(m)] for i in range(m)]
    num = brute_hsic_eq5(masked(both, K), masked(both, L))
    den = math.sqrt(brute_hsic_eq5(masked(mk, K), masked(mk, K)) * brute_hsic_eq5(masked(ml, L), masked(ml, L)))
    return num / den


def brute_cka(a, b, debiased=False):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    K, L = a @ a.T, b @ b.T
    if debiased:
        h = brute_hsic_u_statistic
        return h(K, L) / math.sqrt(h(K, K) * h(L, L))
    m = len(K)
    H = np.eye(m) - np.ones((m, m)) / m
    hs = lambda X, Y: np.trace(X @ H @ Y @ H)  # noqa: E731
    return hs(K, L) / math.sqrt(hs(K, K) * hs(L, L))


def brute_knn_accuracy(tr_x, tr_y, te_x, te_y, k, temperature):
    tr, te = _unit_rows(tr_x), _unit_rows(te_x)
    correct = 0
    for i in range(len(te)):
        sims = sorted(((float(te[i] @ tr[j]), int(tr_y[j])) for j in range(len(tr))), key=lambda s: -s[0])[:k]
        votes = {}
        for s, c in sims:
            votes[c] = votes.get(c, 0.0) + math.exp(s / temperature)
        best = max(sorted(votes), key=lambda c: votes[c])
        correct += best == int(te_y[i])
    return correct / len(te)


# --------------------------------------------------------------------------------------------
# Equality with the brute-force definitions
# --------------------------------------------------------------------------------------------


def test_hsic_unbiased_equals_u_statistic():
    a, b = _feats(7, 3, 0), _feats(7, 5, 1)
    K, L = (a @ a.T), (b @ b.T)
    got = float(al.hsic_unbiased(K, L))
    assert got == pytest.approx(brute_hsic_u_statistic(K.tolist(), L.tolist()), rel=1e-10, abs=1e-12)
    assert got == pytest.approx(brute_hsic_eq5(K.tolist(), L.tolist()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_mutual_knn_and_cknna_equal_brute_force(seed):
    a = _feats(24, 6, seed)
    b = a[:, :4] + 0.7 * _feats(24, 4, seed + 10)  # partly aligned
    assert al.mutual_knn(a, b, 5) == pytest.approx(brute_mutual_knn(a, b, 5), abs=1e-12)
    assert al.cknna(a, b, 5) == pytest.approx(brute_cknna(a, b, 5), rel=1e-9)


def test_duplicate_images_tie_to_the_lower_index_in_both_feature_sets():
    """Ten images appear twice (30 rows): their cosines to every other image tie exactly. ``topk``
    broke such ties by the other values, differently in the two sets, so the duplicates counted as
    disagreeing neighbours (mutual kNN 0.011 and CKNNA 0.018 off here in an audit). Ties now go to the
    lower index in both sets: the brute-force definition (a stable sort) and any reordering of the
    images give the same score."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20, 6, generator=g, dtype=torch.float64)
    b = a[:, :4] + torch.randn(20, 4, generator=g, dtype=torch.float64)
    a, b = torch.cat([a, a[:10]]), torch.cat([b, b[:10]])
    assert al.mutual_knn(a, b, 3) == pytest.approx(brute_mutual_knn(a, b, 3), abs=1e-12)
    assert al.cknna(a, b, 3) == pytest.approx(brute_cknna(a, b, 3), rel=1e-9)
    p = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    assert al.mutual_knn(a[p], b[p], 3) == pytest.approx(al.mutual_knn(a, b, 3), abs=1e-12)
    assert al.cknna(a[p], b[p], 3) == pytest.approx(al.cknna(a, b, 3), rel=1e-9)


def test_row_chunked_neighbours_equal_one_block(monkeypatch):
    """Mutual kNN, CKNNA and the trace term of the HSIC are summed over row chunks (memory O(chunk · N));
    chunks of 1-3 rows give the single-block values."""
    a = _feats(23, 5, 40)
    b = a[:, :3] + 0.5 * _feats(23, 3, 41)
    whole = (al.mutual_knn(a, b, 4), al.cknna(a, b, 4), float(al.hsic_unbiased(a @ a.T, b @ b.T)))
    for elements in (23, 46, 69):  # 1, 2, 3 rows per chunk (the last chunk shorter)
        monkeypatch.setattr(al, "ROW_CHUNK_ELEMENTS", elements)
        got = (al.mutual_knn(a, b, 4), al.cknna(a, b, 4), float(al.hsic_unbiased(a @ a.T, b @ b.T)))
        assert got == pytest.approx(whole, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_equals_brute_force(debiased):
    a, b = _feats(9, 4, 3), _feats(9, 6, 4)
    b[:, :4] += 2 * a
    assert al.linear_cka(a, b, debiased=debiased) == pytest.approx(brute_cka(a, b, debiased), rel=1e-9)


def test_knn_accuracy_equals_brute_force():
    tr_x, te_x = _feats(40, 5, 5), _feats(15, 5, 6)
    tr_y = torch.arange(40) % 3
    te_y = torch.arange(15) % 3
    for k in (1, 7, 20):
        got = al.knn_accuracy(tr_x, tr_y, te_x, te_y, k=k)
        assert got == brute_knn_accuracy(tr_x, tr_y, te_x, te_y, k, al.KNN_TEMPERATURE)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


def test_identical_features_score_one():
    a = _feats(60, 8, 7)
    assert al.mutual_knn(a, a) == pytest.approx(1.0)
    assert al.cknna(a, a) == pytest.approx(1.0, abs=1e-12)
    assert al.linear_cka(a, a) == pytest.approx(1.0, abs=1e-12)
    assert al.linear_cka(a, a, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_independent_features_score_near_zero():
    """N = 500 independent Gaussian samples, d = 32 and 48, k = 10. Stated bounds:
    mutual-kNN is k/(N-1) = 0.02 in expectation (a random k-subset overlap), its standard error
    here ~0.002: |value - 0.02| < 0.01. CKNNA < 0.05 (observed 0.012-0.017 over 5 seeds).
    Biased linear CKA ~ sqrt(d1 d2) / N = 0.078 for independent data: < 0.12. Debiased CKA
    is 0 in expectation: |value| < 0.01 (observed |.| <= 0.003)."""
    a, b = _feats(500, 32, 11), _feats(500, 48, 12)
    n, k = 500, 10
    assert abs(al.mutual_knn(a, b, k) - k / (n - 1)) < 0.01
    assert abs(al.cknna(a, b, k)) < 0.05
    assert 0 < al.linear_cka(a, b) < 0.12
    assert abs(al.linear_cka(a, b, debiased=True)) < 0.01


def test_invariance_to_orthogonal_transforms_and_isotropic_scaling():
    a = _feats(50, 8, 13)
    b = a @ _feats(8, 6, 14) + 0.5 * _feats(50, 6, 15)
    q = _orthogonal(8, 16)
    a2 = 3.7 * (a @ q)
    for debiased in (False, True):
        assert al.linear_cka(a2, b, debiased) == pytest.approx(al.linear_cka(a, b, debiased), rel=1e-10)
        assert al.linear_cka(a, 0.01 * b, debiased) == pytest.approx(al.linear_cka(a, b, debiased), rel=1e-10)
    # the kNN metrics see only inner products of unit rows: rotations and scaling leave them unchanged
    assert al.mutual_knn(a2, b, 5) == al.mutual_knn(a, b, 5)
    assert al.cknna(a2, b, 5) == pytest.approx(al.cknna(a, b, 5), rel=1e-9)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    a = _feats(50, 8, 17)
    b = a + 0.3 * _feats(50, 8, 18)
    s = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(al.linear_cka(a @ s, b) - al.linear_cka(a, b)) > 1e-3


@pytest.mark.parametrize("scale", [1e-200, 1e-80, 1e80, 1e200])
def test_linear_cka_is_scale_invariant_at_any_magnitude(scale):
    """Raw fourth powers of 1e±80 features under- or overflow float64; CKA is scale invariant."""
    a = _feats(10, 5, 21)
    b = a @ _feats(5, 4, 22) + 0.3 * _feats(10, 4, 23)
    assert al.linear_cka(a, a * scale) == pytest.approx(1.0, abs=1e-12)
    for debiased in (False, True):
        assert al.linear_cka(a * scale, b, debiased) == pytest.approx(brute_cka(a, b, debiased), rel=1e-9)
        assert al.linear_cka(a, b / scale, debiased) == pytest.approx(brute_cka(a, b, debiased), rel=1e-9)


def test_debiased_cka_can_be_negative():
    """The docstring's range: biased CKA is in [0, 1]; the debiased one can fall below 0."""
    pairs = [(_feats(12, 3, s), _feats(12, 3, s + 100)) for s in range(10)]
    a, b = min(pairs, key=lambda p: al.linear_cka(*p, debiased=True))
    assert al.linear_cka(a, b, debiased=True) < 0
    assert al.linear_cka(a, b, debiased=True) == pytest.approx(brute_cka(a, b, debiased=True), rel=1e-9)
    assert 0 <= al.linear_cka(a, b) <= 1


def test_features_without_geometry_give_nan():
    """Criterion (alignment.feature_issue): NaN/Inf, or every entry within 1e-6 of the largest
    magnitude from its column mean (on unit rows for mutual kNN and CKNNA)."""
    b = _feats(12, 4, 30)
    const = torch.full((12, 3), 0.5, dtype=torch.float64)  # 12 identical grey images
    for a in (const, torch.zeros(12, 3), const + 1e-8 * _feats(12, 3, 31)):  # equal up to rounding
        assert math.isnan(al.mutual_knn(a, b, 3)) and math.isnan(al.mutual_knn(b, a, 3))
        assert math.isnan(al.cknna(a, b, 3)) and math.isnan(al.linear_cka(a, b))
        assert math.isnan(al.linear_cka(b, a, debiased=True))
    assert al.feature_issue(const) == "are the same for every image"
    # rows in one direction with different lengths: no neighbour ranking, but a CKA (of the lengths)
    parallel = torch.arange(1.0, 13.0, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert al.feature_issue(parallel) is None and al.feature_issue(parallel, directions=True) is not None
    assert math.isnan(al.mutual_knn(parallel, b, 3)) and math.isnan(al.cknna(parallel, b, 3))
    assert al.linear_cka(parallel, b) == pytest.approx(brute_cka(parallel, b), rel=1e-9)
    # a real (small) spread is geometry: 1e-4 relative scores like any other features
    small = const + 1e-4 * b[:, :3]
    assert al.feature_issue(small, directions=True) is None
    assert al.mutual_knn(small, b, 3) == pytest.approx(brute_mutual_knn(small, b, 3), abs=1e-12)
    # one NaN entry (CKA and CKNNA were already NaN; mutual kNN returned 0.70)
    bad = b.clone()
    bad[3, 2] = float("nan")
    assert al.feature_issue(bad) == "contain NaN/Inf"
    for f in (lambda x, y: al.mutual_knn(x, y, 3), lambda x, y: al.cknna(x, y, 3), al.linear_cka):
        assert math.isnan(f(b, bad)) and math.isnan(f(bad, b))


def test_knn_accuracy_undefined_inputs():
    x, y = _separable(4, 2, 3, 0)
    with pytest.raises(ValueError, match="at least one training and one test sample"):
        al.knn_accuracy(x, y, x[:0], y[:0])
    with pytest.raises(ValueError, match="at least one training and one test sample"):
        al.knn_accuracy(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="k >= 1"):
        al.knn_accuracy(x, y, x, y, k=0)
    assert math.isnan(al.knn_accuracy(torch.ones(8, 3), y, x, y, k=3))  # every neighbour a tie


def test_metrics_reject_too_few_samples():
    with pytest.raises(ValueError, match="k = 10 needs"):
        al.mutual_knn(_feats(10, 3, 0), _feats(10, 3, 1), 10)
    with pytest.raises(ValueError, match="same N"):
        al.linear_cka(_feats(10, 3, 0), _feats(9, 3, 1))


# --------------------------------------------------------------------------------------------
# Linear probe and kNN classifier
# --------------------------------------------------------------------------------------------


def _separable(n_per_class, n_classes, d, seed, margin=4.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, d, generator=g, dtype=torch.float64) * margin
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64) * 0.3
    return x, y


@pytest.mark.parametrize("method", ["lbfgs", "ridge"])
@pytest.mark.parametrize("batchnorm", [True, False])
def test_linear_probe_separable_and_shuffled(method, batchnorm):
    x, y = _separable(40, 5, 16, 0)
    tr, te = al.stratified_split(y, 0.5, seed=0)
    assert al.linear_probe(x[tr], y[tr], x[te], y[te], method=method, batchnorm=batchnorm) == 1.0
    # shuffled labels: nothing to learn, test accuracy is chance (1/5) within binomial noise
    xs, ys = _separable(200, 5, 16, 1, margin=0.0)  # one blob: labels carry no information
    ys = ys[torch.randperm(len(ys), generator=torch.Generator().manual_seed(2))]
    tr, te = al.stratified_split(ys, 0.5, seed=0)
    acc = al.linear_probe(xs[tr], ys[tr], xs[te], ys[te], method=method, batchnorm=batchnorm)
    assert abs(acc - 0.2) < 0.07  # 500 test samples: binomial sd 0.018, bound ~4 sd


def test_linear_probe_is_linear_not_memorising():
    """XOR is not linearly separable: a linear probe cannot exceed ~75% on it, kNN can."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(400, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    tr, te = al.stratified_split(y, 0.5, seed=0)
    assert al.linear_probe(x[tr], y[tr], x[te], y[te]) < 0.8
    assert al.knn_accuracy(x[tr], y[tr], x[te], y[te], k=5) > 0.9


def test_ridge_probe_matches_closed_form():
    x, y = _separable(10, 3, 4, 4, margin=1.0)
    a = x.numpy()
    t = np.eye(3)[y.numpy()]
    ac = a - a.mean(0)
    gram = ac.T @ ac
    lam = 1e-3 * np.trace(gram) / gram.shape[0] + 1e-12  # the documented lambda, not the module's constant
    w = np.linalg.solve(gram + lam * np.eye(4), ac.T @ t)
    pred = ((a - a.mean(0)) @ w + t.mean(0)).argmax(1)
    expected = float((pred == y.numpy()).mean())
    assert al.linear_probe(x, y, x, y, method="ridge", batchnorm=False) == expected
    got_w, got_b = al._fit_ridge(x, y, 3)  # the accuracy alone barely depends on lambda: the weights do
    np.testing.assert_allclose(got_w.numpy(), w, rtol=1e-9)
    np.testing.assert_allclose(got_b.numpy(), t.mean(0) - a.mean(0) @ w, rtol=1e-9, atol=1e-12)


def test_stratified_split_is_deterministic_and_per_class():
    y = torch.tensor([0] * 5 + [1] * 4 + [2])
    tr, te = al.stratified_split(y, 0.5, seed=3)
    tr2, te2 = al.stratified_split(y, 0.5, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert [int((y[te] == c).sum()) for c in range(3)] == [2, 2, 0]
    y = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 7)  # floor(n_c / 2), not rounded: 1.5 -> 1, 3.5 -> 3
    _, te = al.stratified_split(y, 0.5, seed=0)
    assert [int((y[te] == c).sum()) for c in range(4)] == [0, 1, 1, 3]


def test_batchnorm_uses_the_training_splits_population_statistics():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(5, 4, generator=g, dtype=torch.float64)
    a, b = train.numpy(), test.numpy()
    mu, sd = a.mean(0), np.sqrt(a.var(0, ddof=0) + 1e-6)
    got_train, got_test = al.batchnorm_no_affine(train, test)
    np.testing.assert_allclose(got_train.numpy(), (a - mu) / sd, rtol=1e-12)
    np.testing.assert_allclose(got_test.numpy(), (b - mu) / sd, rtol=1e-12)


def test_pool_tokens_shapes():
    z = torch.randn(2, 5, 3, 4)
    assert torch.allclose(al.pool_tokens(z), z.mean((2, 3)))
    assert torch.allclose(al.pool_tokens(z.flatten(2).transpose(1, 2)), z.mean((2, 3)), atol=1e-6)
    with pytest.raises(ValueError):
        al.pool_tokens(torch.randn(2, 2, 2, 2, 2))


def test_probe_without_batchnorm_reaches_the_logistic_optimum():
    """Ill-conditioned features (offsets and scales far apart, the probe with batchnorm off): the fit
    reaches the minimum that scipy's L-BFGS-B finds (an audit found it stopping short). scipy solves
    the same objective written in standardised coordinates, where it converges in a few hundred steps."""
    from scipy.optimize import minimize

    from raebench.analysis.alignment import PROBE_L2, _fit_logistic_lbfgs

    g = torch.Generator().manual_seed(0)
    n, d, c = 240, 12, 3
    y = torch.arange(n) % c
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + y[:, None].double() * 0.7
    x = x * torch.logspace(-2, 2, d, dtype=torch.float64) + torch.linspace(-20, 20, d, dtype=torch.float64)

    def objective(w, b):
        return torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * PROBE_L2 * w.pow(2).sum()

    mu, sd = x.mean(0), x.std(0)

    def f(theta):  # w = v / sd, b = a - mu @ w: the same objective
        t = torch.tensor(theta, requires_grad=True)
        w = t[: d * c].view(d, c) / sd[:, None]
        loss = objective(w, t[d * c:] - mu @ w)
        loss.backward()
        return loss.item(), t.grad.numpy()

    ref = minimize(f, np.zeros(d * c + c), jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-12,
                                                                               "ftol": 1e-16})
    w, b = _fit_logistic_lbfgs(x, y, c, PROBE_L2)
    assert objective(w, b).item() <= ref.fun + 1e-9


def test_cosine_metrics_are_scale_invariant_down_to_tiny_features():
    """F.normalize divided rows with a norm below 1e-12 by 1e-12, so at feature scale 1e-13 the cosine
    kernel became a raw inner product (mutual-kNN 0.48 instead of 0.51 in an audit); every cosine metric
    now gives the scale-1 value at any scale."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 32, generator=g, dtype=torch.float64)
    b = a @ torch.randn(32, 64, generator=g, dtype=torch.float64) + 0.5 * torch.randn(200, 64, generator=g, dtype=torch.float64)
    y = torch.arange(200) % 4
    ref = (al.mutual_knn(a, b, 10), al.cknna(a, b, 10), al.knn_accuracy(a[:120], y[:120], a[120:], y[120:], k=20))
    for scale in (1e-13, 1e-200, 1e150):
        got = (al.mutual_knn(a * scale, b, 10), al.cknna(a * scale, b, 10),
               al.knn_accuracy(a[:120] * scale, y[:120], a[120:] * scale, y[120:], k=20))
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-12), scale


def test_one_large_constant_column_does_not_make_varying_features_constant():
    """The "same for every image" test compared the spread with the largest entry of the whole set, so
    a constant 1e7 column beside columns varying at order 1 gave CKA = NaN; centring removes such a
    column, so CKA equals the value without it."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 32, generator=g, dtype=torch.float64)
    b = a @ torch.randn(32, 16, generator=g, dtype=torch.float64) + torch.randn(200, 16, generator=g, dtype=torch.float64)
    wide = torch.cat([a, torch.full((200, 1), 1e7, dtype=torch.float64)], 1)
    assert al.feature_issue(wide) is None
    assert al.linear_cka(wide, b) == pytest.approx(al.linear_cka(a, b), rel=1e-9)
    assert al.feature_issue(torch.full((5, 3), 2.0)) == "are the same for every image"  # still caught


def test_defaults_are_the_published_recipes():
    """Called with their defaults, kNN accuracy is DINO's (k = 20, temperature 0.07) and mutual kNN
    and CKNNA the platonic-rep paper's (k = 10), against the brute-force definitions above with those
    numbers written out: data chosen so that k = 10 or temperature 0.7 (kNN), k = 5 (mutual kNN,
    CKNNA) give other values."""
    tr_x, te_x = _feats(60, 3, 12), _feats(100, 3, 112)
    tr_y = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(12))
    te_y = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(13))
    assert al.knn_accuracy(tr_x, tr_y, te_x, te_y) == brute_knn_accuracy(tr_x, tr_y, te_x, te_y, 20, 0.07)
    assert len({brute_knn_accuracy(tr_x, tr_y, te_x, te_y, k, t) for k, t in ((20, 0.07), (10, 0.07), (20, 0.7))}) == 3
    a = _feats(24, 6, 0)
    b = a[:, :4] + 0.7 * _feats(24, 4, 10)
    assert al.mutual_knn(a, b) == pytest.approx(brute_mutual_knn(a, b, 10), abs=1e-12)
    assert al.cknna(a, b) == pytest.approx(brute_cknna(a, b, 10), rel=1e-9)
    assert brute_mutual_knn(a, b, 10) != pytest.approx(brute_mutual_knn(a, b, 5), abs=1e-3)


def test_knn_default_temperature_is_pinned_by_a_vote():
    """One class-1 neighbour at cosine 1 against two class-0 neighbours at cosine 1 - gap: class 1 wins
    iff exp(1/T) > 2 exp((1 - gap)/T), i.e. T < gap / ln 2. Gaps 0.049 and 0.048 put the switch at
    T = 0.0707 and 0.0692, so only a default temperature in between (DINO's 0.07) gives these votes
    (the recipe test above told 0.07 from 0.7, not from 0.1)."""
    for gap, winner in ((0.049, 1), (0.048, 0)):
        angle = math.acos(1 - gap)
        train = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]],
                             dtype=torch.float64)
        test = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        ytr = torch.tensor([1, 0, 0])
        assert al.knn_accuracy(train, ytr, test, torch.tensor([winner])) == 1.0, gap


def test_probes_refuse_mismatched_labels_and_give_nan_for_non_finite_features():
    """A NaN test feature gave kNN accuracy and the linear probe an arbitrary vote (a confident 1.0 and
    0.5 in an audit); a label vector of another length an IndexError from inside the vote."""
    x, y = _separable(6, 2, 3, 0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert math.isnan(al.knn_accuracy(x, y, bad, y, k=3))
    assert math.isnan(al.linear_probe(x, y, bad, y)) and math.isnan(al.linear_probe(bad, y, x, y))
    assert math.isnan(al.linear_probe(x, y, bad * math.inf, y, method="ridge"))
    for f in (lambda *a: al.knn_accuracy(*a, k=3), al.linear_probe):
        with pytest.raises(ValueError, match="one label per sample"):
            f(x, y[:-1], x, y)
        with pytest.raises(ValueError, match="one label per sample"):
            f(x, y, x, y[:-1])
        with pytest.raises(ValueError, match="one D"):
            f(x, y, x[:, :2], y)
