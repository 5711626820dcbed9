"""Fréchet distances between Gaussians fitted to features: FID, sFID, FD-DINOv2.

    FD = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½        (Dowson & Landau 1982; Heusel et al. 2017)

The trace term is computed from a *symmetric* eigenproblem instead of scipy's ``sqrtm`` of the
non-symmetric product Σ1Σ2 (a Schur decomposition, ~10 s at d = 2048 on a CPU): with any factor
Σ1 = A Aᵀ, the matrix Aᵀ Σ2 A is symmetric positive semi-definite and has the same non-zero
eigenvalues as Σ1^½ Σ2 Σ1^½ (A = Σ1^½ Q for an orthogonal Q), so

    tr (Σ1^½ Σ2 Σ1^½)^½ = Σ_i sqrt(max(λ_i(Aᵀ Σ2 A), 0)).

A is, in order of preference: the centred features themselves when a side has N ≤ d images
(Σ = XᵀX / (N − 1), turned off the all-ones direction that centred rows lack, so the eigenproblem
is (N − 1) × (N − 1), exact and without a structural 0 eigenvalue whose rounding noise ε would add
sqrt(ε) to the trace), a Cholesky factor when Σ is positive
definite, else the eigen-factor V Λ^½ (eigenvalues clamped at 0). Eigenvalues that come out
slightly negative from rounding are clamped to 0 (they are exactly 0 in exact arithmetic). Everything
is float64. With N < d the covariance is singular and FD is biased; the metric records a note.

Streaming: :class:`GaussianStats` keeps float64 Σ(x − c) and Σ(x − c)(x − c)ᵀ about a shift c (the
first batch's mean, so large feature offsets do not cancel) and the count: memory is constant in N,
shards merge exactly (moving one shift onto the other), and the batch size only changes float64
summation order.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from raebench.metrics.base import Metric, MetricBatch, MetricInputError, MetricSpec, register_metric, require_images


#: a side with at most this many rows keeps them, for the exact low-rank path (N ≤ d)
KEEP_ROWS_MAX = 4096


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64).cpu()


def _factor(sigma: torch.Tensor) -> torch.Tensor:
    """A with A Aᵀ = Σ (d, r): Cholesky when Σ is positive definite, else V Λ^½ over λ > 0."""
    L, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return L
    w, V = torch.linalg.eigh(sigma)
    keep = w > 0
    return V[:, keep] * w[keep].sqrt()


def trace_sqrt_product(
    sigma1: torch.Tensor, sigma2: torch.Tensor, factor1: torch.Tensor | None = None, factor2: torch.Tensor | None = None
) -> float:
    """tr (Σ1^½ Σ2 Σ1^½)^½ for symmetric PSD Σ1, Σ2 (float64). ``factor*``: optional A with A Aᵀ = Σ
    (e.g. centred features / sqrt(N − 1)); the side with the smaller factor is used."""
    cands = [(f.shape[1], f, other) for f, other in ((factor1, sigma2), (factor2, sigma1)) if f is not None]
    if cands:
        _, A, other = min(cands, key=lambda c: c[0])
    else:
        A, other = _factor(sigma1), sigma2
    M = A.T @ (other @ A)  # (r, r), symmetric PSD up to rounding
    M = (M + M.T) / 2
    lam = torch.linalg.eigvalsh(M).clamp_min(0.0)
    return float(lam.sqrt().sum())


def frechet_distance(
    mu1, sigma1, mu2, sigma2, factor1: torch.Tensor | None = None, factor2: torch.Tensor | None = None
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); arrays or tensors, computed in
    float64. Returns a float ≥ 0 (a result below 0 from rounding is clamped)."""
    mu1, mu2, sigma1, sigma2 = (_f64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"Fréchet distance needs matching shapes, got {tuple(mu1.shape)}/{tuple(sigma1.shape)} "
                         f"and {tuple(mu2.shape)}/{tuple(sigma2.shape)}")
    diff = mu1 - mu2
    tr = trace_sqrt_product(sigma1, sigma2, factor1, factor2)
    fd = float(diff @ diff) + float(sigma1.trace()) + float(sigma2.trace()) - 2.0 * tr
    return max(fd, 0.0)


# ---------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------


class GaussianStats:
    """Running float64 sums of (N, d) features about a fixed shift c (the first batch's mean):
    Σ(x − c), Σ(x − c)(x − c)ᵀ and N; mean and unbiased covariance (np.cov).

    Raw moments (ΣxxT − N μμᵀ) cancel catastrophically when |μ| is large against the spread (two
    16-d sets offset by 1e7 gave FD 2.008 instead of 1.710); about c ≈ μ the sums stay of the order
    of the spread. Accumulators with different shifts still merge exactly (:meth:`add`)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # (d,)
        self.sum: torch.Tensor | None = None  # (d,) Σ(x − c)
        self.sum_outer: torch.Tensor | None = None  # (d, d) Σ(x − c)(x − c)ᵀ
        self.rows: list[torch.Tensor] = []  # the features themselves while N ≤ KEEP_ROWS_MAX

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).flatten(1)  # (N, d)
        if x.shape[0] == 0:
            return
        if self.sum is None:
            d = x.shape[1]
            self.shift = x.mean(0)
            self.sum = torch.zeros(d, dtype=torch.float64, device=x.device)
            self.sum_outer = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        elif self.sum.device != x.device:  # a merged (resumed) state lives on the CPU; the features on the GPU
            self.shift, self.sum, self.sum_outer = (t.to(x.device) for t in (self.shift, self.sum, self.sum_outer))
        xc = x - self.shift
        self.n += x.shape[0]
        self.sum += xc.sum(0)
        self.sum_outer += xc.T @ xc
        if self.n <= KEEP_ROWS_MAX:
            self.rows.append(x.cpu())
        else:
            self.rows = []

    def add(self, n: int, shift: torch.Tensor | None, sum_: torch.Tensor, sum_outer: torch.Tensor,
            rows: list[torch.Tensor]) -> None:
        """Add another accumulator's sums about its own ``shift`` (None: raw sums, as states
        saved before shifts were used). Moving the shift by δ = c' − c turns S' = Σ(x − c') into
        S' + n δ and O' = Σ(x − c')(x − c')ᵀ into O' + S'δᵀ + δS'ᵀ + n δδᵀ, exactly."""
        if n == 0:
            return
        shift = torch.zeros_like(sum_) if shift is None else shift
        if self.sum is None:
            self.shift, self.sum, self.sum_outer = shift.clone(), sum_.clone(), sum_outer.clone()
        else:
            dev = self.sum.device
            delta = shift.to(dev) - self.shift  # (d,)
            s = sum_.to(dev)
            self.sum += s + n * delta
            self.sum_outer += sum_outer.to(dev) + torch.outer(s, delta) + torch.outer(delta, s) + n * torch.outer(delta, delta)
        self.n += n
        self.rows = self.rows + list(rows) if self.n <= KEEP_ROWS_MAX else []

    @property
    def dim(self) -> int:
        return 0 if self.sum is None else self.sum.numel()

    def mean(self) -> torch.Tensor:
        return (self.shift + self.sum / self.n).cpu()

    def cov(self) -> torch.Tensor:
        mu = self.sum / self.n  # the mean about the shift
        c = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return ((c + c.T) / 2).cpu()

    def factor(self) -> torch.Tensor | None:
        """A with A Aᵀ = Σ, (d, N − 1), when the rows were kept and 2 ≤ N ≤ d, else None: the
        centred features / sqrt(N − 1), turned off the direction they are known to lack. Centred
        rows sum to 0, so N columns of them span N − 1 dimensions; the exact 0 eigenvalue this puts
        into Aᵀ Σ' A would come out as rounding noise ε and add sqrt(ε) ~ 1e-8 to the trace."""
        n = self.n
        if not self.rows or sum(r.shape[0] for r in self.rows) != n or n > self.dim or n < 2:
            return None
        xc = (torch.cat(self.rows) - self.mean()) / math.sqrt(n - 1)  # (N, d)
        # the Householder reflection H that swaps 1/sqrt(N) and e1: rows 2..N of H xc = Qᵀ xc with Q
        # an orthonormal basis of the vectors orthogonal to 1, so Q Qᵀ xc = xc
        v = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
        v[0] -= 1
        hx = xc - (2 / (v @ v)) * torch.outer(v, v @ xc)  # (N, d)
        return hx[1:].T


# ---------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------


class FrechetMetric(Metric):
    """FD between reference and candidate features of one extractor output ("inception/pool").

    The reference side can instead be given as stored statistics (``set_reference_stats``), as in
    the ADM evaluator's reference batches (``mu``/``sigma`` for FID, ``mu_s``/``sigma_s`` for sFID).
    """

    def __init__(self, spec: MetricSpec, feature: str) -> None:
        super().__init__(spec)
        self.extractor, self.output = feature.split("/")
        self._ref_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        self.notes = []
        self.ref = GaussianStats()
        self.cand = GaussianStats()

    # state()/merge() of the base class see plain attributes; the two GaussianStats are flattened here
    def state(self) -> dict:
        out = {}
        for side in ("ref", "cand"):
            g: GaussianStats = getattr(self, side)
            # on the CPU, as the base class's state(): pickled GPU tensors would unpickle onto the saving
            # rank's GPU in every other process of an all_gather_object
            cpu = [None if t is None else t.cpu() for t in (g.shift, g.sum, g.sum_outer)]
            out[side] = {"n": g.n, "shift": cpu[0], "sum": cpu[1], "sum_outer": cpu[2], "rows": list(g.rows)}
        return out

    def merge(self, state: dict) -> None:
        for side in ("ref", "cand"):
            s = state[side]
            getattr(self, side).add(s["n"], s.get("shift"), s["sum"], s["sum_outer"], s["rows"])

    def update(self, batch: MetricBatch) -> None:
        ref, cand = batch.features.get(self.extractor, (None, None))
        if ref is not None and self._ref_stats is None:
            self.ref.update(ref[self.output])
        if cand is not None:
            self.cand.update(cand[self.output])

    def set_reference_stats(self, stats: dict) -> None:
        k_mu, k_sigma = self.reference_stats_keys
        mu, sigma = _f64(stats[k_mu]), _f64(stats[k_sigma])
        if mu.ndim != 1 or sigma.shape != (mu.numel(), mu.numel()):
            raise MetricInputError(f"{self.spec.name} needs {k_mu} of shape (d,) and {k_sigma} (d, d), "
                                   f"got {tuple(mu.shape)} and {tuple(sigma.shape)}.")
        if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())):
            raise MetricInputError(f"{self.spec.name}: the stored reference statistics {k_mu}/{k_sigma} hold NaN/Inf.")
        self._ref_stats = (mu, sigma)

    def compute(self) -> dict[str, float]:
        self.notes = []
        if self._ref_stats is None:
            require_images(self.spec, candidates=self.cand.n, references=self.ref.n)
        else:
            require_images(self.spec, candidates=self.cand.n)
        if self._ref_stats is not None:
            mu_r, sigma_r = self._ref_stats
            factor_r = None
        else:
            mu_r, sigma_r, factor_r = self.ref.mean(), self.ref.cov(), self.ref.factor()
        d = self.cand.dim
        sides = [f"{n} {side}" for side, n in (("candidate", self.cand.n), ("reference", self.ref.n))
                 if n < d and not (side == "reference" and self._ref_stats is not None)]
        if sides:
            self.notes.append(f"N < d: {' and '.join(sides)} images for {d}-d features (singular covariance; FD is biased)")
        value = frechet_distance(self.cand.mean(), self.cand.cov(), mu_r, sigma_r, self.cand.factor(), factor_r)
        return {self.spec.name: value}


def _frechet_builder(feature: str):
    return lambda spec: FrechetMetric(spec, feature)


register_metric(
    MetricSpec(
        name="fid", higher_is_better=False, kind="distribution", version="fid-tfinception-pool3-eigh-v1",
        description="Fréchet Inception Distance, torch-fidelity's TF Inception pool3 (2048-d), float64",
        builder=_frechet_builder("inception/pool"), extractors=("inception",), reference_stats_keys=("mu", "sigma"),
        reference_inputs=("inception/pool",), candidate_inputs=("inception/pool",), min_images=2,
    )
)
register_metric(
    MetricSpec(
        name="sfid", higher_is_better=False, kind="distribution", version="sfid-tfinception-mixed6conv7-eigh-v1",
        description="spatial FID (ADM): first 7 channels of mixed_6/conv, 17x17x7 = 2023-d, HWC order",
        builder=_frechet_builder("inception/spatial"), extractors=("inception",), reference_stats_keys=("mu_s", "sigma_s"),
        reference_inputs=("inception/spatial",), candidate_inputs=("inception/spatial",), min_images=2,
    )
)
register_metric(
    MetricSpec(
        name="fd-dinov2", higher_is_better=False, kind="distribution", version="fd-dinov2-vitl14-cls224-torchbicubicaa-v1",
        description="Fréchet distance in DINOv2 ViT-L/14 CLS space at 224 px (EDM2 / dgm-eval)",
        builder=_frechet_builder("dinov2-l14/cls"), extractors=("dinov2-l14",),
        reference_inputs=("dinov2-l14/cls",), candidate_inputs=("dinov2-l14/cls",), min_images=2,
    )
)
