"""Transport for stage 2: the linear (rectified-flow) path with velocity prediction.

Convention (the RAE checkpoints'; pinned by ``tests/test_stage2_transport.py``): **t = 0 is data and
t = 1 is noise**::

    x_t = (1 - t) * x_0 + t * eps,        target velocity  v = dx_t/dt = eps - x_0

so sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) down towards t = 0. Training times are
drawn from a truncated logit-normal(mu, sigma) or a uniform distribution on [0, 1 - 1/1000] and then
moved by the dimension-dependent shift of Esser et al. 2024 (SD3) as used in RAE (Zheng et al. 2025)::

    t' = s * t / (1 + (s - 1) * t),       s = sqrt(dim / base),  dim = C * H * W,  base = 4096

which spends more time near noise for larger latents. The loss is the unweighted per-sample MSE to
the velocity. The network only predicts; this module owns the path and the loss, and
:mod:`raebench.stage2.samplers` owns integration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Any

import torch

#: training and sampling stop short of pure noise by this much (the official ``1 - 1/1000``)
T_MAX = 1 - 1 / 1000

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shift_from_dims(dim: int, base: float = 4096) -> float:
    """s = sqrt(dim / base); ``dim`` is C*H*W of one latent."""
    return math.sqrt(dim / base)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s*t / (1 + (s-1)*t): maps [0, 1] onto itself, s > 1 pushes times towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def truncated_logit_normal(
    n: int, mu: float, sigma: float, low: float = 0.0, high: float = T_MAX,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) samples X with logit(X) ~ N(mu, sigma^2) truncated to [low, high] (inverse-CDF sampling)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    z_lo = torch.logit(torch.tensor(low, dtype=torch.float64))  # -inf when low == 0
    z_hi = torch.logit(torch.tensor(high, dtype=torch.float64))
    c_lo, c_hi = normal.cdf((z_lo - mu) / sigma), normal.cdf((z_hi - mu) / sigma)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    u = (c_lo + (c_hi - c_lo) * u).clamp(1e-12, 1 - 1e-12)
    x = torch.sigmoid(mu + sigma * normal.icdf(u)).clamp(low, high)
    return x.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class Transport:
    """Linear path, velocity prediction, t = 0 data / t = 1 noise (see the module docstring).

    ``time_dist``: "logit-normal" (with ``mu``, ``sigma``) or "uniform". ``shift``: the time shift s.
    """

    time_dist: str = "logit-normal"
    mu: float = 0.0
    sigma: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.time_dist not in ("logit-normal", "uniform"):
            raise ValueError(f"time_dist must be 'logit-normal' or 'uniform', got {self.time_dist!r}")
        if self.shift <= 0:  # s < 1 (latents smaller than the base) is allowed: it favours low noise
            raise ValueError(f"time shift must be positive, got {self.shift}")

    @classmethod
    def from_official(cls, params: Mapping[str, Any], shift: float) -> "Transport":
        """From the official YAML ``transport.params`` (``time_dist_type``: uniform | logit-normal_MU_SIGMA)."""
        path = params.get("path_type", "Linear")
        pred = params.get("prediction", "velocity")
        if path != "Linear" or pred != "velocity":
            raise ValueError(f"only the Linear path with velocity prediction is supported, got {path}/{pred}")
        kind = str(params.get("time_dist_type", "uniform"))
        if kind == "uniform":
            return cls("uniform", shift=shift)
        parts = kind.split("_")
        if parts[0] != "logit-normal" or len(parts) != 3:
            raise ValueError(f"unknown time_dist_type {kind!r} (use 'uniform' or 'logit-normal_MU_SIGMA')")
        return cls("logit-normal", float(parts[1]), float(parts[2]), shift)

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) shifted training times in [0, shift(1 - 1/1000)]."""
        if self.time_dist == "uniform":
            t = torch.rand(n, generator=generator) * T_MAX
        else:
            t = truncated_logit_normal(n, self.mu, self.sigma, 0.0, T_MAX, generator)
        return time_shift(t, self.shift).to(device)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = (1 - t) x0 + t noise and the target velocity noise - x0 (t is (N,))."""
        tt = t.view(-1, *([1] * (x0.dim() - 1)))  # (N, 1, 1, 1)
        return (1 - tt) * x0 + tt * noise, noise - x0

    def loss(
        self, model: VelocityModel, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample unweighted MSE (N,) between model(x_t, t, y) and the velocity."""
        t = self.sample_t(x0.shape[0], x0.device, generator)
        if generator is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32)  # (N, C, H, W)
        else:
            noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
        return self.loss_at(model, x0, y, t, noise)

    def loss_at(
        self, model: VelocityModel, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`loss` at given (shifted) times t (N,) and noise (N, C, H, W)."""
        xt, target = self.interpolate(x0.float(), noise, t)
        pred = model(xt, t, y)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
