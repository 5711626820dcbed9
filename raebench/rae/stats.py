"""Latent statistics of an RAE: per-element mean and variance of the encoder features.

RAE normalises every latent element separately: z_norm = (z - mean) / sqrt(var + eps) with
``mean``/``var`` of shape (C, H, W) and eps = 1e-5; the diffusion model sees ``z_norm``. The official
file format is ``torch.save({'mean': (C,H,W), 'var': (C,H,W)})`` (either entry may be absent: 0 and 1).

The official estimator is a momentum EMA over batches, so its result depends on batch size, order
and world size. :class:`StatsAccumulator` computes the exact population mean and variance instead:
float64 running sums of z and z² (constant memory), deterministic for a given data order, combined
across processes by summation (:meth:`merge`, :meth:`all_reduce`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from raebench.checkpoint import save_atomic
from raebench.errors import CheckpointError
from raebench.images import nonfinite_rows
from raebench.rae.decoder import load_checkpoint

log = logging.getLogger(__name__)

STATS_EPS = 1e-5


class LatentStats(nn.Module):
    """Per-element normalisation of (N, C, H, W) latents; buffers ``mean`` and ``var`` are (C, H, W)."""

    def __init__(self, mean: torch.Tensor | None, var: torch.Tensor | None, eps: float = STATS_EPS) -> None:
        super().__init__()
        if mean is None and var is None:
            raise CheckpointError("Latent statistics need a mean, a var or both.")
        shape = (mean if mean is not None else var).shape
        mean = torch.zeros(shape) if mean is None else mean
        var = torch.ones(shape) if var is None else var
        if mean.shape != var.shape:
            raise CheckpointError(f"Latent statistics disagree: mean {tuple(mean.shape)} vs var {tuple(var.shape)}.")
        if bool((var < 0).any()) or not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            raise CheckpointError("Latent statistics hold a negative or non-finite variance or mean.")
        self.eps = float(eps)
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("var", var.detach().float().clone())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.dtype)) / torch.sqrt(self.var.to(z.dtype) + self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sqrt(self.var.to(z.dtype) + self.eps) + self.mean.to(z.dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, eps: float = STATS_EPS) -> "LatentStats":
        """Read the official ``stat.pt`` (or a safetensors file with ``mean``/``var``)."""
        obj = load_checkpoint(path, "latent statistics")
        if not isinstance(obj, dict) or not ({"mean", "var"} & set(obj)):
            raise CheckpointError(f"The statistics file {str(path)!r} has no 'mean' or 'var' entry.")
        mean, var = obj.get("mean"), obj.get("var")
        unknown = sorted(set(obj) - {"mean", "var"})
        if unknown:  # e.g. a VA-VAE-style 'std', which the official loader (and raebench) ignore
            log.warning("The statistics file %r also holds %s, which are ignored: RAE normalises with 'mean' and "
                        "'var' only (a missing one means no shift / unit variance).", str(path), unknown)
        for k, v in (("mean", mean), ("var", var)):
            if v is not None and not isinstance(v, torch.Tensor):
                raise CheckpointError(f"The statistics file {str(path)!r} stores {k!r} as {type(v).__name__}, not a tensor.")
        return cls(mean, var, eps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the official format atomically: ``{'mean': float32 (C,H,W), 'var': float32 (C,H,W)}``."""
        state = {"mean": self.mean.detach().cpu().float().clone(), "var": self.var.detach().cpu().float().clone()}
        return save_atomic(state, path)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, eps={self.eps}"


class StatsAccumulator:
    """Exact running per-element mean/variance of latents, mergeable across processes.

    ``update(z)`` with (N, C, H, W) features adds N samples. ``mean``/``var`` are the population
    statistics (divisor N, as the official estimator uses).
    """

    def __init__(self, shape: tuple[int, ...] | None = None, device: str | torch.device = "cpu") -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        if shape is not None:
            self._init(tuple(shape), torch.device(device))

    def _init(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(shape, dtype=torch.float64, device=device)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None if self.sum is None else tuple(self.sum.shape)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        if self.sum is None:
            self._init(tuple(z.shape[1:]), z.device)
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"latent shape {tuple(z.shape[1:])} differs from the accumulated {self.shape}")
        z64 = z.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum += z64.sum(0)
        self.sumsq += (z64 * z64).sum(0)
        self.count += int(z.shape[0])

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        """Add another accumulator's samples into this one (exact: sums add); returns self."""
        if other.count == 0:
            return self
        if self.sum is None:
            self._init(other.shape, other.sum.device)
        if other.shape != self.shape:
            raise ValueError(f"cannot merge statistics of shape {other.shape} into {self.shape}")
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sum.device)
        self.count += other.count
        return self

    def all_reduce(self) -> "StatsAccumulator":
        """Sum counts and sums over all ranks when torch.distributed is initialised; returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.sum is None:
            raise ValueError("every rank needs at least one batch (or an explicit shape) before all_reduce")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for t in (count, self.sum, self.sumsq):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.count = int(count.item())
        return self

    @property
    def mean(self) -> torch.Tensor:
        if not self.count:
            raise ValueError("no samples accumulated")
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        m = self.mean
        return (self.sumsq / self.count - m * m).clamp_min(0.0)

    def to_stats(self, eps: float = STATS_EPS) -> LatentStats:
        return LatentStats(self.mean.float().cpu(), self.var.float().cpu(), eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sum, self.sumsq = int(state["count"]), state["sum"], state["sumsq"]


def add_batch(
    features: Callable[[torch.Tensor], torch.Tensor], acc: StatsAccumulator, x: torch.Tensor, hflip: bool = False
) -> tuple[list[int], bool, int] | None:
    """``features(x)`` (and of its mirror with ``hflip``) into ``acc``; None when every latent is finite. A view
    whose latents hold NaN/Inf is not added and stops the batch: (its rows :func:`nonfinite_rows`, whether it is
    the mirror, the batch size), for the caller's refusal (``accumulate_stats``, ``raebench stats``)."""
    for mirrored in (False, True) if hflip else (False,):
        z = features(x.flip(-1) if mirrored else x).float()
        bad = nonfinite_rows(z)
        if bad:
            return bad, mirrored, len(z)
        acc.update(z)
    return None


def accumulate_stats(
    features: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    hflip: bool = False,
    accumulator: StatsAccumulator | None = None,
) -> StatsAccumulator:
    """Feed ``features(x)`` of every batch of [0, 1] images (N, 3, H, W) into an accumulator.

    ``hflip`` also adds each image's mirror: the exact expectation of the official estimator's
    random horizontal flip, without its randomness. Under torch.distributed, call
    :meth:`StatsAccumulator.all_reduce` afterwards. Features with NaN/Inf stop it at their batch
    (:class:`~raebench.errors.NonFiniteError` naming the batch and image), not at the end with NaN statistics.
    """
    from raebench.errors import NonFiniteError

    acc = accumulator if accumulator is not None else StatsAccumulator()
    with torch.no_grad():
        for b, x in enumerate(batches):
            found = add_batch(features, acc, x, hflip)
            if found:
                bad, mirrored, n = found
                raise NonFiniteError(f"The features of batch {b} hold NaN/Inf (image {bad[0]} of the batch"
                                     f"{', mirrored' if mirrored else ''}; {len(bad)} of {n}).")
    return acc
