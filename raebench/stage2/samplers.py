"""Samplers for the linear path (t = 1 noise -> t = 0 data; see :mod:`raebench.stage2.transport`).

Grid (the official RAE one): ``g = 1 - linspace(0, 1 - 1/1000, num_steps)`` then the time shift, so
``num_steps`` points and ``num_steps - 1`` steps. Fixed-grid solvers reproduce torchdiffeq's
``odeint`` on a decreasing grid bit for bit (it integrates the negated time, so the Heun
corrector is evaluated at ``t0 - (t0 - t1)``, not at ``t1``):

- ``euler``: x <- x + (t1 - t0) v(x, t0)
- ``heun`` (torchdiffeq ``heun2``): predictor Euler, corrector with the average of both slopes
- ``adaptive``: Dormand-Prince 5(4) with error control from the first to the last grid time
- ``euler-maruyama``: the reverse SDE with diffusion w(t) = norm * t (finite at t = 1), noise-free
  last step.

Guidance wraps the network into a velocity function ``v(x, t)``:

- CFG: the batch is doubled with the null class; ``v_u + s (v_c - v_u)`` inside
  ``t_min <= t <= t_max``, the conditional velocity elsewhere.
- AutoGuidance (Karras et al. 2024): ``v_g + s (v - v_g)`` with a weaker guide model on the *same*
  batch (no doubling), inside the interval.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from raebench.stage2.transport import T_MAX, time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (N, ...), t (N,)) -> v
METHODS = ("euler", "heun", "adaptive", "euler-maruyama")
_ALIASES = {"heun2": "heun", "dopri5": "adaptive", "sde": "euler-maruyama", "em": "euler-maruyama"}


def canonical_method(method: str) -> str:
    m = _ALIASES.get(method.lower(), method.lower())
    if m not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    return m


def time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps,) float32 times from 1 (noise) down to shift(1/1000)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (points of the grid), got {num_steps}")
    return time_shift(1 - torch.linspace(0, T_MAX, num_steps), shift)


# ----------------------------------------------------------------------------------------------
# Velocity functions (model + guidance)
# ----------------------------------------------------------------------------------------------


def _in_interval(t: torch.Tensor, interval: tuple[float, float], ndim: int) -> torch.Tensor:
    lo, hi = interval
    if not lo < hi:
        raise ValueError(f"guidance interval must be (t_min, t_max) with t_min < t_max, got {interval}")
    return ((t >= lo) & (t <= hi)).view(-1, *([1] * (ndim - 1)))  # (N, 1, 1, 1)


def velocity_fn(
    model: nn.Module,
    y: torch.Tensor,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    guide: nn.Module | None = None,
    null_class: int | None = None,
) -> VelocityFn:
    """v(x, t) for ``model`` with labels ``y``; CFG (guide None) or AutoGuidance when scale != 1."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    if guide is not None:
        def v_ag(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v, v_g = model(x, t, y), guide(x, t, y)  # (N, C, H, W) each, same batch
            return torch.where(_in_interval(t, cfg_interval, x.dim()), v_g + cfg_scale * (v - v_g), v)
        return v_ag
    null = int(null_class if null_class is not None else model.num_classes)
    y2 = torch.cat([y, torch.full_like(y, null)])  # (2N,)

    def v_cfg(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), y2).chunk(2)  # (N, C, H, W) each
        return torch.where(_in_interval(t, cfg_interval, x.dim()), v_u + cfg_scale * (v_c - v_u), v_c)
    return v_cfg


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], device=x.device) * t  # (N,)


def euler(v: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    grid = grid.to(x.device)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * v(x, _tvec(t0, x))
    return x


def heun(v: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's method with torchdiffeq ``heun2`` arithmetic on a decreasing grid."""
    grid = grid.to(x.device)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        v1 = v(x, _tvec(t0, x))
        v2 = v(x + dt * v1, _tvec(t0 - (t0 - t1), x))  # torchdiffeq's t0 + dt in negated time
        x = x + dt * (v1 * 0.5 + v2 * 0.5)
    return x


# Dormand-Prince 5(4) tableau
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def adaptive(
    v: VelocityFn, x: torch.Tensor, t_start: float, t_end: float,
    rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 10_000,
) -> torch.Tensor:
    """Dormand-Prince 5(4) with PI-free standard step-size control (FSAL), from t_start to t_end."""
    t, direction = float(t_start), (1.0 if t_end > t_start else -1.0)
    h = direction * min(0.05, abs(t_end - t_start))
    k1 = v(x, _tvec(torch.tensor(t, dtype=torch.float32), x))
    for _ in range(max_steps):
        if direction * (t_end - t) <= 1e-12:
            return x
        if direction * (t + h - t_end) > 0:
            h = t_end - t
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(v(xi, _tvec(torch.tensor(t + _DP_C[i] * h, dtype=torch.float32), x)))
        x5 = x + h * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
        e = float((err / scale).pow(2).mean().sqrt())
        if e <= 1.0:  # accept; the 7th stage is f(t + h, x5) (first-same-as-last)
            t, x, k1 = t + h, x5, ks[6]
        h = h * min(10.0, max(0.2, 0.9 * (e + 1e-10) ** -0.2))
    raise RuntimeError(f"adaptive solver did not reach t={t_end} in {max_steps} steps; loosen rtol/atol")


def euler_maruyama(
    v: VelocityFn, x: torch.Tensor, grid: torch.Tensor, diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reverse SDE dx = [v - w s] dt + sqrt(2w) dW with w(t) = norm * t and score s = -(x + (1-t) v)/t.

    w * s = -norm * (x + (1 - t) v) is finite at t = 1; the last step takes the mean (no noise).
    """
    grid = grid.to(x.device)
    n = len(grid) - 1
    for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
        vel = v(x, _tvec(t0, x))
        drift = vel + diffusion_norm * (x + (1 - t0) * vel)  # v - w * score
        x = x - drift * (t0 - t1)
        if i < n - 1:
            if generator is None:
                noise = torch.randn_like(x)
            else:
                noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            x = x + torch.sqrt(2 * diffusion_norm * t0 * (t0 - t1)) * noise
    return x


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int = 50,
    method: str = "euler",
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    guide: nn.Module | None = None,
    null_class: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (t = 1) to normalised latents; returns (N, C, H, W).

    The networks run in eval mode (no label dropout) and are put back in their mode afterwards.
    """
    nets = [n for n in (model, guide) if isinstance(n, nn.Module)]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        v = velocity_fn(model, labels, cfg_scale, tuple(cfg_interval), guide, null_class)
        grid = time_grid(num_steps, shift)
        m = canonical_method(method)
        if m == "euler":
            return euler(v, noise, grid)
        if m == "heun":
            return heun(v, noise, grid)
        if m == "adaptive":
            return adaptive(v, noise, float(grid[0]), float(grid[-1]), rtol=rtol, atol=atol)
        return euler_maruyama(v, noise, grid, diffusion_norm, generator)
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)
