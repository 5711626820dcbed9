"""Samplers for the linear path (t = 1 noise -> t = 0 data; see :mod:`raebench.stage2.transport`).

Grid (the official RAE one): ``g = 1 - linspace(0, 1 - 1/1000, num_steps)`` then the time shift, so
``num_steps`` points and ``num_steps - 1`` steps. Fixed-grid solvers reproduce torchdiffeq's
``odeint`` on a decreasing grid bit for bit (it integrates the negated time, so the Heun
corrector is evaluated at ``t0 - (t0 - t1)``, not at ``t1``):

- ``euler``: x <- x + (t1 - t0) v(x, t0)
- ``heun`` (torchdiffeq ``heun2``): predictor Euler, corrector with the average of both slopes
- ``adaptive``: torchdiffeq's ``dopri5`` from the first to the last grid time (the official
  ``sample_ode`` default)
- ``euler-maruyama``: the official ``sample_sde`` (Euler): reverse SDE with the score from the
  velocity and diffusion w(t) (default "sigma": w = norm * t) on the grid
  ``1 - linspace(0, 1 - last_step_size, num_steps)`` (shifted), every step noisy, then a noise-free
  "mean" step of size ``last_step_size`` (0.04); see :func:`euler_maruyama`.
- ``sde-heun``: the official ``sample_sde`` with ``sampling_method="heun"``: the same grid, noise
  and last step, each step a noise kick followed by a Heun step of the drift; see
  :func:`stochastic_heun`.

Guidance wraps the network into a velocity function ``v(x, t)``:

- CFG: the batch is doubled with the null class; ``v_u + s (v_c - v_u)`` inside
  ``t_min <= t <= t_max``, the conditional velocity elsewhere.
- AutoGuidance (Karras et al. 2024): ``v_g + s (v - v_g)`` with a weaker guide model on the *same*
  batch (no doubling), inside the interval.

The official sampling scripts run every guided sampler (CFG and AutoGuidance) on the doubled batch
``[x, x]`` with labels ``[y, null]`` and keep the first half. For the fixed-grid ODE solvers that
changes nothing, but the SDE solvers draw their step noise for the whole (2N, ...) batch, so with
guidance :func:`sample` draws 2N rows per step and keeps the first N: the official noise for the
same seed. The adaptive solver's step sizes depend on the whole state: with CFG both halves carry
the same guided velocity (nothing changes), with AutoGuidance the null half differs, so
:func:`sample` integrates AutoGuidance + ``adaptive`` on the doubled batch as well.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from raebench.errors import RaebenchError
from raebench.stage2.transport import T_MAX, time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (N, ...), t (N,)) -> v
METHODS = ("euler", "heun", "adaptive", "euler-maruyama", "sde-heun")
SDE_METHODS = ("euler-maruyama", "sde-heun")
_ALIASES = {"heun2": "heun", "dopri5": "adaptive", "sde": "euler-maruyama", "em": "euler-maruyama",
            "stochastic-heun": "sde-heun"}


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


def has_null_class(model: nn.Module, null_class: int | None = None) -> bool:
    """Whether ``model``'s label table has the null row ``null_class`` (default ``num_classes``: the
    row a model trained with label dropout has)."""
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    null = model.num_classes if null_class is None else null_class
    return table is None or 0 <= null < table.num_embeddings


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
    if null_class is None and not has_null_class(model):
        raise RaebenchError("This model has no null class (it was trained without label dropout), so classifier-free "
                            "guidance is impossible; sample with cfg_scale 1 or use a guide model.")
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


def adaptive(
    v: VelocityFn, x: torch.Tensor, t_start: float, t_end: float,
    rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 10_000,
) -> torch.Tensor:
    """Dormand-Prince 5(4) from ``t_start`` to ``t_end`` with torchdiffeq's ``dopri5``, called as the
    official ``sample_ode(sampling_method="dopri5")`` calls it (tolerances as one-element lists, which
    makes the error control float64). Its steps are not clipped at ``t_end``: ``v`` may be evaluated
    just beyond it, and the result is read off the last step's dense output. More than ``max_steps``
    steps raise.
    """
    from torchdiffeq import odeint

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return v(y, _tvec(t, y))

    ts = torch.tensor([t_start, t_end], dtype=torch.float32, device=x.device)
    try:
        return odeint(f, x, ts, method="dopri5", rtol=[rtol], atol=[atol], options={"max_num_steps": max_steps})[-1]
    except AssertionError as e:  # torchdiffeq's step-count check
        raise RuntimeError(f"adaptive solver did not reach t={t_end} in {max_steps} steps; loosen rtol/atol") from e


# ----------------------------------------------------------------------------------------------
# Euler-Maruyama (reverse SDE)
# ----------------------------------------------------------------------------------------------

DIFFUSION_FORMS = ("sigma", "linear", "constant", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")
_FORM_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}  # the official key's spelling


def diffusion_coefficient(form: str, t: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """w(t) for the reverse SDE (the official ``compute_diffusion`` forms, in our t: t = 1 noise).

    sigma, linear: norm * t;  constant: norm;  decreasing: (norm cos(pi (1 - t)) + 1)^2 / 4;
    increasing-decreasing: norm * sin(pi (1 - t))^2.  The official default "SBDM" is rejected: for
    this path its formula gives w = -norm * t / (1 - t) < 0 (infinite at t = 1), so the official
    sampler returns NaN with it.
    """
    f = _FORM_ALIASES.get(form.lower(), form.lower())
    if f == "sbdm":
        raise ValueError("diffusion_form 'SBDM' is negative for this path (w = -t/(1-t); the official "
                         "sampler returns NaN with it); use 'sigma' (w = norm * t), the default")
    if f in ("sigma", "linear"):
        return norm * t
    if f == "constant":
        return torch.full_like(t, float(norm))
    if f == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * (1 - t)) + 1) ** 2
    if f == "increasing-decreasing":
        return norm * torch.sin(math.pi * (1 - t)) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")


def canonical_last_step(last_step: str | None) -> str:
    s = "none" if last_step is None else str(last_step).lower()
    if s not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of mean, tweedie, euler, None")
    return s


def sde_time_grid(num_steps: int, shift: float = 1.0, last_step_size: float = 0.04) -> torch.Tensor:
    """(num_steps,) float32 times shift(1 - linspace(0, 1 - last_step_size, num_steps)): 1 -> shift(lss)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (points of the grid), got {num_steps}")
    if not 0.0 <= last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
    return time_shift(1 - torch.linspace(0, 1 - last_step_size, num_steps), shift)


def _score(vel: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) from the velocity: s = -(x + (1 - t) v) / t; t (N,).

    x = x_0 + t v and x = (1 - t) x_0 + t eps give E[eps | x] = x + (1 - t) v, and s = -E[eps | x] / t.
    The denominator is written as the path's sigma^2 - (alpha / alpha') sigma sigma' = t^2 + (1 - t) t
    (= t) so that the float rounding is the official one.
    """
    tb = t.view(-1, *([1] * (x.dim() - 1)))  # (N, 1, 1, 1)
    return -(x + (1 - tb) * vel) / (tb * tb + (1 - tb) * tb)


def _sde_drift(v: VelocityFn, x: torch.Tensor, t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
    """v - w s at (x, t); t (N,)."""
    vel = v(x, t)  # (N, C, H, W)
    w = diffusion_coefficient(form, t.view(-1, *([1] * (x.dim() - 1))), norm)  # (N, 1, 1, 1)
    return vel - w * _score(vel, x, t)


def _step_noise(x: torch.Tensor, generator: torch.Generator | None, rows: int | None) -> torch.Tensor:
    """Standard normal step noise like ``x`` (N, ...), drawn in float32 as (rows, ...) and cut to N rows.

    From ``generator`` (on its device) or, when None, torch's global CPU generator, then moved to
    ``x``: with the same seed this is the official draw, ``randn(x.size())`` on the official batch
    (``rows`` = 2N when that batch is the guided [x, x]; its first N rows are the conditional half's).
    """
    shape = (x.shape[0] if rows is None else int(rows), *x.shape[1:])
    if generator is None:
        z = torch.randn(shape)  # global CPU RNG
    else:
        z = torch.randn(shape, generator=generator, device=generator.device)
    return z[: x.shape[0]].to(x)  # (N, C, H, W)


def _sde_last_step(
    v: VelocityFn, x: torch.Tensor, tau: float, last: str, form: str, norm: float
) -> torch.Tensor:
    """The noise-free last step at ``tau`` (see :func:`euler_maruyama`); "none" or tau <= 0 skips it."""
    if last == "none" or tau <= 0.0:
        return x
    t = torch.full((x.shape[0],), tau, device=x.device)  # (N,) float32
    if last == "mean":
        return x - _sde_drift(v, x, t, form, norm) * tau
    vel = v(x, t)  # (N, C, H, W)
    if last == "euler":
        return x - vel * tau
    return x / (1 - tau) + tau * tau / (1 - tau) * _score(vel, x, t)  # Tweedie: x/alpha + sigma^2/alpha s


def euler_maruyama(
    v: VelocityFn, x: torch.Tensor, grid: torch.Tensor, diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None, *, diffusion_form: str = "sigma",
    last_step: str | None = "mean", last_step_size: float = 0.04, last_step_from_grid: bool = False,
    noise_rows: int | None = None,
) -> torch.Tensor:
    """Reverse SDE from grid[0] = 1 down the grid, then one noise-free last step (the official
    ``sample_sde`` with ``sampling_method="euler"``).

    For the linear path the score follows from the velocity, s(x, t) = -(x + (1 - t) v) / t, and
    with w(t) from :func:`diffusion_coefficient` every grid step t0 -> t1 (dt = t0 - t1 > 0) is::

        mean = x - (v - w s) dt,      x <- mean + sqrt(2 w) * sqrt(dt) * z,   z ~ N(0, I)

    all at t0; every step is noisy. The noise is drawn before the network call, in float32 with
    the shape of ``x`` (or ``noise_rows`` rows, of which the first N are used: the official guided
    batch is doubled), from ``generator`` (on its device) or, when None, from torch's global CPU
    generator, then moved to ``x``: with the same seed this is the official draw. The last step
    (``last_step``; "none" skips it) is, at tau = ``last_step_size`` with the same drift:

        mean: x - (v - w s) tau,   euler: x - v tau,
        tweedie: E[x_0 | x] = (x + tau^2 s) / (1 - tau)  (= x - tau v, the same as euler up to rounding)

    As in the official code tau is *not* shifted although the grid is, so with a shift s > 1 the
    grid ends at shift(tau) > tau and the last step only reaches t = shift(tau) - tau (for s = 6.9,
    tau = 0.04: t ~ 0.18). ``last_step_from_grid=True`` instead takes it at tau = grid[-1], which
    lands at t = 0. Use :func:`sde_time_grid` for the official grid (it ends at shift(tau)).
    Returns (N, C, H, W); ``num_steps - 1`` noisy steps plus the last one = ``num_steps`` calls.
    """
    grid = grid.to(x.device)
    last = canonical_last_step(last_step)
    diffusion_coefficient(diffusion_form, grid[:1])  # fail before any network call
    for t0, t1 in zip(grid[:-1], grid[1:]):
        z = _step_noise(x, generator, noise_rows)  # (N, C, H, W)
        t = _tvec(t0, x)  # (N,)
        mean = x - _sde_drift(v, x, t, diffusion_form, diffusion_norm) * (t0 - t1)
        w = diffusion_coefficient(diffusion_form, t.view(-1, *([1] * (x.dim() - 1))), diffusion_norm)
        x = mean + torch.sqrt(2 * w) * (z * torch.sqrt(t0 - t1))
    tau = float(grid[-1]) if last_step_from_grid else float(last_step_size)
    return _sde_last_step(v, x, tau, last, diffusion_form, diffusion_norm)


def stochastic_heun(
    v: VelocityFn, x: torch.Tensor, grid: torch.Tensor, diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None, *, diffusion_form: str = "sigma",
    last_step: str | None = "mean", last_step_size: float = 0.04, last_step_from_grid: bool = False,
    noise_rows: int | None = None,
) -> torch.Tensor:
    """The official ``sample_sde`` with ``sampling_method="heun"``: every grid step t0 -> t1
    (dt = t0 - t1 > 0) is a noise kick at t0 followed by Heun's method on the drift d = v - w s::

        x^ = x + sqrt(2 w(t0)) * sqrt(dt) * z,   k1 = d(x^, t0),   k2 = d(x^ - dt k1, t1),
        x <- x^ - dt/2 (k1 + k2)

    Grid, noise draws (one per step, before the network calls), last step and arguments are those
    of :func:`euler_maruyama`. Returns (N, C, H, W) after 2 (num_steps - 1) + 1 network calls.
    """
    grid = grid.to(x.device)
    last = canonical_last_step(last_step)
    diffusion_coefficient(diffusion_form, grid[:1])  # fail before any network call
    if float(grid[-1]) <= 0:  # Euler-Maruyama never evaluates the drift at its last grid point; Heun does
        raise ValueError("sde-heun needs a last step (mean, tweedie or euler): without one its grid ends at t = 0, "
                         "where the score -(x + (1 - t) v) / t is undefined (the official sampler returns NaN there)")
    for t0, t1 in zip(grid[:-1], grid[1:]):
        z = _step_noise(x, generator, noise_rows)  # (N, C, H, W)
        dt, t = t0 - t1, _tvec(t0, x)  # 0-d, > 0; (N,)
        w = diffusion_coefficient(diffusion_form, t.view(-1, *([1] * (x.dim() - 1))), diffusion_norm)
        xh = x + torch.sqrt(2 * w) * (z * torch.sqrt(dt))  # (N, C, H, W)
        k1 = _sde_drift(v, xh, t, diffusion_form, diffusion_norm)
        k2 = _sde_drift(v, xh - dt * k1, _tvec(t1, x), diffusion_form, diffusion_norm)
        x = xh - 0.5 * dt * (k1 + k2)
    tau = float(grid[-1]) if last_step_from_grid else float(last_step_size)
    return _sde_last_step(v, x, tau, last, diffusion_form, diffusion_norm)


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
    diffusion_form: str = "sigma",
    last_step: str | None = "mean",
    last_step_size: float = 0.04,
    last_step_from_grid: bool = False,
) -> torch.Tensor:
    """Integrate from ``noise`` (t = 1) to normalised latents; returns (N, C, H, W).

    ``rtol``/``atol`` are for ``adaptive``; ``diffusion_norm``, ``diffusion_form``, ``last_step``,
    ``last_step_size``, ``last_step_from_grid`` and ``generator`` (None: torch's global CPU RNG, as
    the official code) for ``euler-maruyama`` and ``sde-heun``, whose grid is :func:`sde_time_grid`;
    with guidance (``cfg_scale != 1``) their step noise is drawn for the doubled batch, as officially
    (see the module docstring). The networks run in eval mode (no label dropout) and are put back in
    their mode afterwards.
    """
    nets = [n for n in (model, guide) if isinstance(n, nn.Module)]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        v = velocity_fn(model, labels, cfg_scale, tuple(cfg_interval), guide, null_class)
        m = canonical_method(method)
        if m in SDE_METHODS:
            lss = 0.0 if canonical_last_step(last_step) == "none" else float(last_step_size)
            solver = euler_maruyama if m == "euler-maruyama" else stochastic_heun
            return solver(
                v, noise, sde_time_grid(num_steps, shift, lss), diffusion_norm, generator,
                diffusion_form=diffusion_form, last_step=last_step, last_step_size=lss,
                last_step_from_grid=last_step_from_grid,
                noise_rows=2 * noise.shape[0] if cfg_scale != 1.0 else None,  # the guided batch is [x, x]
            )
        grid = time_grid(num_steps, shift)
        if m == "euler":
            return euler(v, noise, grid)
        if m == "heun":
            return heun(v, noise, grid)
        if guide is not None and cfg_scale != 1.0 and has_null_class(model, null_class) and has_null_class(guide, null_class):
            # The official scripts integrate AutoGuidance on [x, x] with labels [y, null], like CFG.
            # dopri5's error norm spans the whole state, and the null half's guided velocity differs
            # from the conditional one, so it changes the step sizes (measured: 1e-2 to 6e-2 apart).
            # The fixed-grid solvers are unaffected.
            null = int(null_class if null_class is not None else model.num_classes)
            v2 = velocity_fn(model, torch.cat([labels, torch.full_like(labels, null)]), cfg_scale,
                             tuple(cfg_interval), guide, null_class)
            out = adaptive(v2, torch.cat([noise, noise]), float(grid[0]), float(grid[-1]), rtol=rtol, atol=atol)
            return out[: noise.shape[0]]
        return adaptive(v, noise, float(grid[0]), float(grid[-1]), rtol=rtol, atol=atol)
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)
