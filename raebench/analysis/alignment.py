"""Semantic alignment of latents: linear probe, kNN accuracy, mutual-kNN, CKNNA and linear CKA.

Every function is pure: float tensors in, a Python float out, computed in float64 on the device of
the inputs. Rows of two feature matrices describe the same images in the same order.

Definitions (stated once, here):

* **Pooling** (:func:`pool_tokens`): a latent (N, C, H, W) becomes (N, C) by the mean over its
  H·W tokens ("token-mean pooled"); (N, L, C) by the mean over L; (N, C) is kept.
* **Linear probe** (:func:`linear_probe`): optional BatchNorm without affine (standardise each
  feature with the *training* mean and variance, eps 1e-6; as MAE's probe), then one fixed recipe:
  ``"lbfgs"`` (default) is multinomial logistic regression with bias, mean cross-entropy plus
  ``l2 / 2 · ||W||²`` (l2 = 1e-4, bias not decayed), full batch, L-BFGS with strong-Wolfe line
  search, at most 500 iterations, tolerance 1e-9, zero initialisation (so it is deterministic);
  ``"ridge"`` is closed-form ridge regression onto one-hot targets with bias (λ = 1e-3 · trace of
  the Gram matrix / dims), prediction by argmax. Top-1 accuracy on the test split.
* **kNN accuracy** (:func:`knn_accuracy`), as DINO's ``eval_knn``: L2-normalised features, cosine
  similarity to every training feature, the k = 20 most similar vote for their class with weight
  ``exp(sim / 0.07)``, the class with the largest summed weight wins (ties: the lower class index).
  NaN when the training features all point the same way (:func:`feature_issue`): every neighbour
  would be a tie.
* **Mutual kNN** (:func:`mutual_knn`), as "The Platonic Representation Hypothesis" (Huh et al. 2024,
  arXiv:2405.07987, the platonic-rep code): features L2-normalised, the k = 10 nearest neighbours of
  each sample by inner product, itself excluded; the score is the mean over samples of
  ``|N_A(i) ∩ N_B(i)| / k``. Independent features give k / (N − 1) in expectation, not 0.
  Neighbours with equal cosines (exact duplicate images) go to the lower index, in both sets
  (:func:`neighbour_mask`; the platonic-rep code's ``argsort`` picks among them arbitrarily).
* **CKNNA** (:func:`cknna`), same paper: kernels ``K = A Aᵀ``, ``L = B Bᵀ`` of L2-normalised
  features; ``M_K[i, j] = 1`` when j is among the k nearest neighbours of i under K (self excluded);
  ``CKNNA = HSIC_u(M_K∘M_L∘K, M_K∘M_L∘L) / sqrt(HSIC_u(M_K∘K, M_K∘K) · HSIC_u(M_L∘L, M_L∘L))`` with
  the unbiased HSIC of Song et al. (2012) (:func:`hsic_unbiased`). No ε in the denominator (the
  paper's code adds 1e-6); a zero denominator gives NaN. The unbiased HSIC of masked (asymmetric)
  kernels is not an inner product, so on small sets the score can leave [0, 1] (the paper's code
  does the same; use N in the hundreds, as the paper's 1024). Neighbour ties as mutual kNN.
* **Linear CKA** (:func:`linear_cka`), Kornblith et al. (2019) on the raw (not normalised) features:
  biased ``||B_cᵀ A_c||²_F / (||A_cᵀ A_c||_F ||B_cᵀ B_c||_F)`` with column-centred features
  (computed in feature space, no N×N matrix), in [0, 1]; ``debiased=True`` replaces the biased
  HSIC by the unbiased one on linear kernels (N×N; meant for N up to a few thousand), which can be
  slightly negative for unrelated features. Each feature set is first divided by its largest
  centred magnitude (CKA is scale invariant), so features of any scale give the same value.
* **Memory and time** (float64 on the CPU; measured with 2 cores, D = 768 and 1024): mutual kNN
  works in row chunks (no N×N matrix: 0.4 GB, ~20 s at N = 10k); CKNNA holds two float64 and two bool
  N×N matrices (18·N² bytes: 2.1 GB, 15–30 s at N = 10k); debiased CKA two float64 N×N kernels
  (1.7 GB, ~20 s); biased CKA only D×D matrices (0.2 GB, 2 s). Time grows as N², memory as N²
  (CKNNA, debiased CKA): N = 50k would need ~45 GB. ``raebench analyze`` scores a seeded subset of
  ``--align-images`` (default 1024: under a second each) images.
* **Undefined values** (:func:`feature_issue`): a feature set with a NaN/Inf entry, fewer than two
  rows, or rows that are all equal — no entry further from its column's mean than ``1e-6`` times
  the largest magnitude in the set — has no geometry to compare: neighbours would be decided by
  tie-breaking and CKA by rounding. Mutual kNN, CKNNA and kNN accuracy apply the test to the
  L2-normalised rows (they see only directions, so rows that differ only in length count as
  equal), CKA to the raw rows; the score is then NaN.

Not applied: the outlier clamp of the platonic-rep code. Its ``prepare_features`` calls
``remove_outliers(feats, q=0.95)`` before L2 normalising: every entry is clamped to ±t, with t the
0.95 quantile of |x| over all entries (``--precise``) or, by default, the mean over samples of each
sample's own 0.95 quantile. raebench scores the features as they are, for three reasons: t is a
statistic of the whole set, so one image's features (and neighbours) would depend on which other
images are analysed; the clamp targets the few huge activations of single tokens in transformer
hidden states, which token-mean pooling already dilutes; and on few-channel latents (4 for
SD-VAE) clamping the top 5 % of entries rewrites the direction of exactly the images with the
strongest channels. So raebench's mutual kNN and CKNNA follow the paper's definitions; on features
with outliers they differ from numbers computed with its code (whose CKNNA also adds 1e-6 to the
denominator, see above).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KNN_K = 20
KNN_TEMPERATURE = 0.07
MUTUAL_K = 10
PROBE_L2 = 1e-4
PROBE_MAX_ITER = 500
RIDGE_REL_LAMBDA = 1e-3
CONSTANT_REL = 1e-6  # rows closer than this fraction of the largest magnitude to their mean count as equal


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def pool_tokens(z: torch.Tensor) -> torch.Tensor:
    """Token-mean pooling: (N, C, H, W) -> (N, C); (N, L, C) -> (N, C); (N, C) unchanged."""
    if z.ndim == 4:
        return z.mean(dim=(2, 3))
    if z.ndim == 3:
        return z.mean(dim=1)
    if z.ndim == 2:
        return z
    raise ValueError(f"cannot pool latents of shape {tuple(z.shape)}; expected 2, 3 or 4 dimensions")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float64, for any magnitude: each row is divided by its largest
    entry first, because ``F.normalize`` divides rows with a norm below its eps (1e-12) by the eps,
    which turned cosine kernels of tiny features into raw inner products. Zero rows stay zero."""
    x = x.double()
    top = x.abs().amax(1, keepdim=True)
    return F.normalize(x / torch.where(top > 0, top, torch.ones_like(top)), dim=1)


def feature_issue(x: torch.Tensor, directions: bool = False) -> str | None:
    """Why the (N, D) features ``x`` give no alignment score (see module doc), or None.

    ``directions``: test the L2-normalised rows (what mutual kNN and CKNNA see).
    """
    x = x.double()
    if x.shape[0] < 2:
        return "have fewer than two rows"
    if not bool(torch.isfinite(x).all()):
        return "contain NaN/Inf"
    if directions:
        x = unit_rows(x)
    # per column, against that column's own magnitude: one large constant column must not hide the
    # variation of the others (a 1e7 column made every row "the same")
    spread = (x - x.mean(0)).abs().amax(0)
    if not bool((spread > CONSTANT_REL * x.abs().amax(0)).any()):
        return "point the same way for every image" if directions else "are the same for every image"
    return None


def batchnorm_no_affine(train: torch.Tensor, test: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits with the training split's per-feature mean and (biased) variance."""
    mu = train.mean(0, keepdim=True)
    sd = (train.var(0, unbiased=False, keepdim=True) + eps).sqrt()
    return (train - mu) / sd, (test - mu) / sd


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split -> (train indices, test indices), each sorted.

    Within each class a seeded permutation puts ``floor(n_c · test_fraction)`` images in the test
    split; a class with a single image goes to training only.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(math.floor(idx.numel() * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


# ---------------------------------------------------------------------------------------------
# Classification probes
# ---------------------------------------------------------------------------------------------


def _check_labels(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"expected (N, D) training and test features of one D, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError(f"expected one label per sample, got {tuple(train_y.shape)} labels for {train_x.shape[0]} training "
                         f"and {tuple(test_y.shape)} for {test_x.shape[0]} test samples")


def _fit_logistic_lbfgs(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise cross-entropy(x w + b) + l2/2 ||w||^2 with L-BFGS.

    Solved in standardised coordinates x' = (x - mu) / sd, w = w' / sd, with the penalty carried over
    exactly (l2/2 sum (w'/sd)^2): the same minimiser, but a conditioning L-BFGS can finish on.
    Without the change of variables, features with offsets and scales far apart (the probe with
    batchnorm off) stopped short of the optimum (an audit measured gradient entries of 7e-5 and a
    different accuracy).
    """
    mu = x.mean(0)
    sd = x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # constant columns: left as they are
    xs = (x - mu) / sd
    inv2 = sd.pow(-2)[:, None]  # (D, 1): the penalty in the new coordinates
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=PROBE_MAX_ITER, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 0.5 * l2 * (w.pow(2) * inv2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    if iters >= PROBE_MAX_ITER:  # features whose scales span ~8 decades (batchnorm off) can stop short
        log.warning("linear probe: L-BFGS stopped at its %d-iteration cap before converging; the accuracy may be "
                    "slightly below the optimum's (probe with batchnorm, the default, converges)", PROBE_MAX_ITER)
    w_orig = w.detach() / sd[:, None]
    return w_orig, b.detach() - mu @ w_orig


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)
    xc = x - mu  # centring absorbs the bias, which is then not penalised
    t = F.one_hot(y, n_classes).to(x.dtype)
    gram = xc.T @ xc  # (D, D)
    lam = RIDGE_REL_LAMBDA * gram.diagonal().sum() / gram.shape[0] + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=x.dtype, device=x.device), xc.T @ t)
    b = t.mean(0) - mu @ w
    return w, b


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    method: str = "lbfgs",
    batchnorm: bool = True,
    l2: float = PROBE_L2,
) -> float:
    """Top-1 accuracy in [0, 1] of a linear classifier fit on (train_x, train_y); see module doc.

    Labels are integers in [0, n_classes); classes absent from training can never be predicted.
    NaN when either split holds a NaN/Inf feature (the fit, or the prediction, would be arbitrary).
    """
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("the linear probe needs at least one training and one test sample")
    _check_labels(train_x, train_y, test_x, test_y)
    if not (bool(torch.isfinite(train_x).all()) and bool(torch.isfinite(test_x).all())):
        return math.nan
    xtr, xte = train_x.double(), test_x.double()
    if batchnorm:
        xtr, xte = batchnorm_no_affine(xtr, xte)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    ytr = train_y.long().to(xtr.device)
    if method == "lbfgs":
        w, b = _fit_logistic_lbfgs(xtr, ytr, n_classes, l2)
    elif method == "ridge":
        w, b = _fit_ridge(xtr, ytr, n_classes)
    else:
        raise ValueError(f"unknown probe method {method!r}; use 'lbfgs' or 'ridge'")
    pred = (xte @ w + b).argmax(1)
    return float((pred.cpu() == test_y.long().cpu()).double().mean())


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> float:
    """Temperature-weighted cosine kNN top-1 accuracy in [0, 1] (DINO's recipe; see module doc);
    NaN also when a test feature is NaN/Inf (its neighbours would be arbitrary)."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("kNN accuracy needs at least one training and one test sample")
    if k < 1:
        raise ValueError(f"kNN accuracy needs k >= 1, got {k}")
    _check_labels(train_x, train_y, test_x, test_y)
    if feature_issue(train_x, directions=True) or not bool(torch.isfinite(test_x).all()):
        return math.nan
    tr = unit_rows(train_x)
    te = unit_rows(test_x)
    ytr = train_y.long().to(tr.device)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, tr.shape[0])
    correct = 0
    for s in range(0, te.shape[0], chunk):
        sim = te[s : s + chunk] @ tr.T  # (B, Ntr)
        top, idx = sim.topk(k, dim=1)  # (B, k)
        votes = torch.zeros(sim.shape[0], n_classes, dtype=tr.dtype, device=tr.device)
        votes.scatter_add_(1, ytr[idx], (top / temperature).exp())
        correct += int((votes.argmax(1).cpu() == test_y[s : s + chunk].long().cpu()).sum())
    return correct / te.shape[0]


# ---------------------------------------------------------------------------------------------
# Representation alignment
# ---------------------------------------------------------------------------------------------


ROW_CHUNK_ELEMENTS = 1 << 22  # rows of an (N, N) similarity handled at once: ~4M entries of temporaries


def _rows_per_chunk(n: int) -> int:
    return max(1, ROW_CHUNK_ELEMENTS // max(n, 1))


def neighbour_mask(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) similarities -> (B, N) bool mask of each row's k largest entries; among entries equal
    to the k-th largest, the lowest column indices are taken (``topk`` alone picks among equal values
    in an order that depends on the other values, so two feature sets with the same duplicates chose
    different ones). The caller sets a row's own entry to -inf to exclude it."""
    thr = sim.topk(k, dim=1).values[:, -1:]  # (B, 1): the k-th largest value of each row
    above = sim > thr
    tied = sim == thr
    need = k - above.sum(1, keepdim=True)  # how many of the tied entries complete the k
    return above | (tied & (tied.cumsum(1) <= need))


def knn_mask(feats: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) -> (N, N) bool: row i marks the k rows of largest inner product with row i, itself
    excluded, ties to the lower index (:func:`neighbour_mask`); computed in row chunks, so besides the
    mask only O(chunk · N) memory is used."""
    n = feats.shape[0]
    step = _rows_per_chunk(n)
    out = torch.empty(n, n, dtype=torch.bool, device=feats.device)
    for s in range(0, n, step):
        sim = feats[s : s + step] @ feats.T  # (B, N)
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + s] = -math.inf  # the row itself is not its own neighbour
        out[s : s + step] = neighbour_mask(sim, k)
    return out


def _check_pair(a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected two (N, D) feature matrices over the same N samples, got {tuple(a.shape)} and {tuple(b.shape)}")
    if k is not None and not 1 <= k < a.shape[0]:
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} samples, got {a.shape[0]}")


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = MUTUAL_K) -> float:
    """Mutual k-nearest-neighbour alignment in [0, 1] of two (N, D_a), (N, D_b) feature sets (NaN
    when either has no geometry: :func:`feature_issue`). Neighbours whose cosines are equal go to the
    lower index in both sets (:func:`neighbour_mask`), so exact duplicate images count as agreeing;
    rows equal only up to rounding (duplicates encoded in different batches) may still pick different
    neighbours in the two sets, as in the platonic-rep code. Memory O(chunk · N), no N×N matrix."""
    _check_pair(a, b, k)
    if feature_issue(a, directions=True) or feature_issue(b, directions=True):
        return math.nan
    ua, ub = unit_rows(a), unit_rows(b.to(a.device))
    n = a.shape[0]
    step = _rows_per_chunk(n)
    overlap = 0
    for s in range(0, n, step):
        rows = torch.arange(min(step, n - s), device=ua.device)
        sa, sb = ua[s : s + step] @ ua.T, ub[s : s + step] @ ub.T  # (B, N) cosines
        sa[rows, rows + s] = -math.inf
        sb[rows, rows + s] = -math.inf
        overlap += int((neighbour_mask(sa, k) & neighbour_mask(sb, k)).sum())
    return overlap / (k * n)  # the mean over samples of |N_A(i) ∩ N_B(i)| / k


def _hsic_zero_diagonal(kt: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """:func:`hsic_unbiased` of kernels whose diagonals are already zero (nothing copied; the trace
    term is summed in row chunks, so no N×N temporary)."""
    m = kt.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    step = _rows_per_chunk(m)
    trace = sum((kt[s : s + step] * lt[:, s : s + step].T).sum() for s in range(0, m, step))  # tr(K̃ L̃)
    value = trace + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2.0 * (kt.sum(0) @ lt.sum(1)) / (m - 2)
    return value / (m * (m - 3))


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two (m, m) kernels, m >= 4.

    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((m-1)(m-2)) - 2 · 1ᵀK̃L̃1 / (m-2)] / (m(m-3))`` with zeroed diagonals.
    """
    if k.shape[0] < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {k.shape[0]}")
    return _hsic_zero_diagonal(k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0))


def cknna(a: torch.Tensor, b: torch.Tensor, k: int = MUTUAL_K) -> float:
    """Centered kernel nearest-neighbour alignment (CKNNA) of two feature sets; see module doc.
    Neighbour ties as :func:`mutual_knn`. Memory: two float64 and two bool N×N matrices."""
    _check_pair(a, b, k)
    if feature_issue(a, directions=True) or feature_issue(b, directions=True):
        return math.nan
    an = unit_rows(a)
    bn = unit_rows(b.to(a.device))
    mk, ml = knn_mask(an, k), knn_mask(bn, k)  # (N, N) bool, diagonals False
    kk = (an @ an.T).masked_fill_(~mk, 0.0)  # M_K ∘ K, its diagonal zero (self is never a neighbour)
    ll = (bn @ bn.T).masked_fill_(~ml, 0.0)  # M_L ∘ L
    den = (_hsic_zero_diagonal(kk, kk) * _hsic_zero_diagonal(ll, ll)).sqrt()
    num = _hsic_zero_diagonal(kk.masked_fill_(~ml, 0.0), ll.masked_fill_(~mk, 0.0))  # M_K∘M_L∘K, M_K∘M_L∘L
    return float(num / den) if float(den) > 0 else math.nan


def linear_cka(a: torch.Tensor, b: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA: biased in [0, 1], or debiased with the unbiased HSIC (can be slightly negative);
    NaN when either feature set has no geometry (:func:`feature_issue`). See module doc."""
    _check_pair(a, b)
    if feature_issue(a) or feature_issue(b):
        return math.nan
    ac = a.double() - a.double().mean(0)
    bc = b.double().to(a.device)
    bc = bc - bc.mean(0)
    # CKA is invariant to scaling either set: scale to unit largest magnitude, or the fourth powers
    # below under- or overflow for features around 1e-80 or 1e80
    ac, bc = ac / ac.abs().max(), bc / bc.abs().max()
    if debiased:  # the unbiased HSIC of the linear kernels, their diagonals zeroed in place (two N×N)
        kk, ll = (ac @ ac.T).fill_diagonal_(0), (bc @ bc.T).fill_diagonal_(0)
        num = _hsic_zero_diagonal(kk, ll)
        den = (_hsic_zero_diagonal(kk, kk) * _hsic_zero_diagonal(ll, ll)).sqrt()
    else:
        num = (bc.T @ ac).pow(2).sum()
        den = (ac.T @ ac).norm() * (bc.T @ bc).norm()
    return float(num / den) if float(den) > 0 else math.nan
