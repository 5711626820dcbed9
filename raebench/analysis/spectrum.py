"""Spectrum and sparsity of a latent space, accumulated in one streaming pass in float64.

A latent (N, C, H, W) is read as N·H·W *tokens* of C channels ((N, L, C) as N·L tokens, (N, C) as
N tokens). :class:`LatentStats` keeps float64 sums whose memory is O(C²), never O(N); every
quantity below is a function of those sums:

* token covariance Σ (C×C, population normalisation) and its eigenvalues λ₁ ≥ … ≥ λ_C ≥ 0;
* effective rank (Roy & Vetterli 2007) ``exp(-Σ pᵢ log pᵢ)`` with ``pᵢ = λᵢ / Σλ`` — C for a flat
  spectrum, 1 for a rank-one one;
* participation ratio ``(Σλ)² / Σλ²``;
* top-k PCA energy fraction ``Σ_{i≤k} λᵢ / Σλ`` (1 when k ≥ C);
* per-channel excess kurtosis ``m₄ / m₂² − 3`` over tokens (0 for a Gaussian; heavy tails and a few
  "massive activations" make it large);
* Hoyer sparsity of each token vector ``(√C − ‖x‖₁/‖x‖₂) / (√C − 1)`` averaged over tokens (0 for
  a constant-magnitude vector, 1 for a one-hot one; scale invariant; needs C ≥ 2);
* ``latent_std``: the root of the mean per-channel variance (the "per-element std" that the
  robustness σ grid is relative to);
* near-zero fraction: elements with ``|x_c| ≤ 0.05 · rms(x)``, relative to the RMS of their own
  token (scale invariant, and unlike a dataset-wide threshold known within one pass); large when a
  few channels carry each token (every element of an all-zero token counts);
* token L2 norms (mean and std over tokens).

Numerics: sums are taken of ``x − shift`` where ``shift`` is the first batch's channel mean, which
keeps the one-pass variance and the higher moments free of cancellation when latents are offset.
Shards of the data (``torchrun`` ranks) accumulate separately and :meth:`LatentStats.merge` adds
one into another exactly: the other's power sums are re-centred on this shift with the binomial
expansion of ``(y + d)^k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEAR_ZERO_REL = 0.05
TOPK_ENERGY = (1, 8, 32)


def tokens_of(z: torch.Tensor) -> torch.Tensor:
    """Latents -> (T, C) tokens: NCHW by spatial position, (N, L, C) by position, (N, C) as is."""
    if z.ndim == 4:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if z.ndim == 3:
        return z.reshape(-1, z.shape[2])
    if z.ndim == 2:
        return z
    raise ValueError(f"cannot read latents of shape {tuple(z.shape)} as tokens")


def effective_rank(eigvals: torch.Tensor) -> float:
    """exp(entropy) of the normalised non-negative spectrum (Roy & Vetterli 2007)."""
    lam = eigvals.double().clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return math.nan
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(eigvals: torch.Tensor) -> float:
    """(Σλ)² / Σλ² of the non-negative spectrum."""
    lam = eigvals.double().clamp_min(0)
    den = lam.pow(2).sum()
    return float(lam.sum() ** 2 / den) if den > 0 else math.nan


def topk_energy(eigvals: torch.Tensor, k: int) -> float:
    """Fraction of the total variance in the k largest eigenvalues."""
    lam = eigvals.double().clamp_min(0).sort(descending=True).values
    total = lam.sum()
    return float(lam[:k].sum() / total) if total > 0 else math.nan


@dataclass
class SpectrumSummary:
    """What :meth:`LatentStats.summary` returns; ``eigvals`` (descending) and ``kurtosis`` are
    per-component / per-channel arrays for the plots, the rest are scalars for result rows."""

    channels: int
    tokens: int
    eigvals: torch.Tensor  # (C,) float64, descending
    kurtosis: torch.Tensor  # (C,) float64 excess kurtosis per channel
    latent_std: float
    effective_rank: float
    participation_ratio: float
    topk_energy: dict[int, float]
    kurtosis_mean: float
    kurtosis_max: float
    hoyer_sparsity: float
    near_zero_frac: float
    token_norm_mean: float
    token_norm_std: float


class LatentStats:
    """Streaming float64 moments of latent tokens (``update`` per batch, ``summary`` at the end)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        x = tokens_of(z.detach()).double()  # (T, C)
        if x.shape[0] == 0:  # an empty batch would set the shift to NaN
            return
        if not bool(torch.isfinite(x).all()):  # one NaN would poison every sum (eigvalsh then fails to converge)
            raise ValueError("latents with NaN/Inf entries cannot enter the spectrum; leave those images out")
        if self.shift is None:
            c = x.shape[1]
            self.shift = x.mean(0)
            zeros = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
            self.s1, self.s3, self.s4 = zeros(c), zeros(c), zeros(c)
            self.s2 = zeros(c, c)  # Σ y yᵀ
            self.hoyer = self.hoyer_n = self.near_zero = self.norm1 = self.norm2 = 0.0
            # token norms about the first batch's mean norm: E[n²] - E[n]² cancels when norms vary little
            self.norm_shift = float(x.norm(dim=1).mean())
        elif x.shape[1] != self.shift.numel():
            raise ValueError(f"latent channels changed from {self.shift.numel()} to {x.shape[1]} between batches")
        y = x - self.shift
        self.n += y.shape[0]
        self.s1 += y.sum(0)
        self.s2 += y.T @ y
        y2 = y * y
        self.s3 += (y2 * y).sum(0)
        self.s4 += (y2 * y2).sum(0)
        l2 = x.norm(dim=1)  # (T,)
        d = l2 - self.norm_shift
        self.norm1 += float(d.sum())
        self.norm2 += float(d.pow(2).sum())
        c = x.shape[1]
        if c >= 2:  # an all-zero token has no Hoyer sparsity (0/0): left out of its mean
            nz = l2 > 0
            ratio = x.abs().sum(1)[nz] / l2[nz]
            self.hoyer += float(((math.sqrt(c) - ratio) / (math.sqrt(c) - 1)).sum())
            self.hoyer_n += float(nz.sum())
        rms = l2 / math.sqrt(c)  # (T,)
        # <=: every element of an all-zero token is near zero (with <, 0 < 0 counted none of them)
        self.near_zero += float((x.abs() <= NEAR_ZERO_REL * rms[:, None]).sum())

    _SUMS = ("shift", "s1", "s2", "s3", "s4")
    _SCALARS = ("n", "hoyer", "hoyer_n", "near_zero", "norm_shift", "norm1", "norm2")

    def state(self) -> dict:
        """The sums on the CPU (to send to another process); ``{}`` before the first update."""
        if self.shift is None:
            return {}
        return {**{k: getattr(self, k).cpu() for k in self._SUMS}, **{k: getattr(self, k) for k in self._SCALARS}}

    def merge(self, other: "LatentStats | dict") -> None:
        """Add the tokens of ``other`` (a :class:`LatentStats` or its :meth:`state`), exactly.

        With ``y = x - shift_other`` and ``d = shift_other - shift_self``, ``x - shift_self = y + d``:
        ``Σ(y+d) = s1 + n d``, ``Σ(y+d)(y+d)ᵀ = s2 + s1 dᵀ + d s1ᵀ + n d dᵀ``, and per channel
        ``Σ(y+d)³ = s3 + 3 d e2 + 3 d² s1 + n d³``, ``Σ(y+d)⁴ = s4 + 4 d s3 + 6 d² e2 + 4 d³ s1 + n d⁴``
        (``e2`` = the diagonal of s2). The token-norm sums move the same way to this shift
        (``e`` = other's norm shift minus ours): ``Σ(m+e) = norm1 + n e``, ``Σ(m+e)² = norm2 + 2 e norm1 + n e²``;
        Hoyer and near-zero counts simply add.
        """
        st = other.state() if isinstance(other, LatentStats) else other
        if not st or st["n"] == 0:
            return
        if self.shift is None:
            for k in self._SUMS:
                setattr(self, k, st[k].clone())
            for k in self._SCALARS:
                setattr(self, k, st[k])
            return
        if st["shift"].numel() != self.shift.numel():
            raise ValueError(f"cannot merge latents of {st['shift'].numel()} channels into {self.shift.numel()}")
        dev = self.shift.device
        s1, s2, s3, s4 = (st[k].to(dev) for k in ("s1", "s2", "s3", "s4"))
        n, d = st["n"], st["shift"].to(dev) - self.shift  # (C,)
        e2 = s2.diagonal()
        self.s1 += s1 + n * d
        self.s2 += s2 + torch.outer(s1, d) + torch.outer(d, s1) + n * torch.outer(d, d)
        self.s3 += s3 + 3 * d * e2 + 3 * d**2 * s1 + n * d**3
        self.s4 += s4 + 4 * d * s3 + 6 * d**2 * e2 + 4 * d**3 * s1 + n * d**4
        self.n += n
        self.hoyer += st["hoyer"]
        self.hoyer_n += st["hoyer_n"]
        self.near_zero += st["near_zero"]
        e = st["norm_shift"] - self.norm_shift
        self.norm2 += st["norm2"] + 2 * e * st["norm1"] + n * e * e  # uses other's norm1 before it is added
        self.norm1 += st["norm1"] + n * e

    def summary(self) -> SpectrumSummary:
        if self.n == 0 or self.shift is None:
            raise ValueError("no latents were accumulated")
        n, c = self.n, self.shift.numel()
        mu = self.s1 / n  # mean of the shifted tokens
        cov = self.s2 / n - torch.outer(mu, mu)  # (C, C)
        cov = 0.5 * (cov + cov.T)
        eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
        # central moments per channel from raw moments of the shifted data
        e2, e3, e4 = self.s2.diagonal() / n, self.s3 / n, self.s4 / n
        m2 = e2 - mu**2
        m4 = e4 - 4 * mu * e3 + 6 * mu**2 * e2 - 3 * mu**4
        kurt = torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2 - 3.0, torch.full_like(m2, math.nan))
        finite = kurt[torch.isfinite(kurt)]
        std = float(m2.clamp_min(0).mean().sqrt())
        dm = self.norm1 / n  # mean token norm minus the norm shift
        norm_mean = self.norm_shift + dm
        return SpectrumSummary(
            channels=c,
            tokens=n,
            eigvals=eig.cpu(),
            kurtosis=kurt.cpu(),
            latent_std=std,
            effective_rank=effective_rank(eig),
            participation_ratio=participation_ratio(eig),
            topk_energy={k: topk_energy(eig, k) for k in TOPK_ENERGY},
            kurtosis_mean=float(finite.mean()) if finite.numel() else math.nan,
            kurtosis_max=float(finite.max()) if finite.numel() else math.nan,
            hoyer_sparsity=self.hoyer / self.hoyer_n if c >= 2 and self.hoyer_n else math.nan,
            near_zero_frac=self.near_zero / (n * c),
            token_norm_mean=norm_mean,
            token_norm_std=math.sqrt(max(self.norm2 / n - dm**2, 0.0)),
        )
