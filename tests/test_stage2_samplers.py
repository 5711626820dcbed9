"""Samplers against the official samples; guidance semantics; adaptive and SDE solvers."""

import json
import math

import pytest
import torch

from raebench.stage2.models import DiTDH
from raebench.stage2.samplers import (
    adaptive, canonical_method, diffusion_coefficient, euler, sample, sde_time_grid, time_grid, velocity_fn,
)
from raebench.stage2.transport import shift_from_dims

from conftest import ORACLE
from test_stage2_models import needs_oracle, oracle_io, oracle_model

pytestmark = pytest.mark.usefixtures("one_thread")


def oracle_shift() -> float:
    meta = json.loads((ORACLE / "meta.json").read_text())["time_shift"]
    return shift_from_dims(meta["dim"], meta["base"])


CASES = {
    "sample_euler_12": dict(method="euler", num_steps=12),
    "sample_heun2_6": dict(method="heun", num_steps=6),
    "sample_euler_12_cfg3_interval_0.1_0.8": dict(method="euler", num_steps=12, cfg_scale=3.0, cfg_interval=(0.1, 0.8)),
    "sample_heun2_6_cfg3_interval_0.1_0.8": dict(method="heun", num_steps=6, cfg_scale=3.0, cfg_interval=(0.1, 0.8)),
}


@needs_oracle
@pytest.mark.parametrize("name", list(CASES))
def test_samples_match_official(name):
    model, io = oracle_model(), oracle_io()
    out = sample(model, io["sample_noise"], io["dit_y"], shift=oracle_shift(), **CASES[name])
    assert (out - io[name]).abs().max() < 1e-4


@needs_oracle
def test_cfg_velocity_matches_official():
    model, io = oracle_model(), oracle_io()
    with torch.no_grad():
        v = velocity_fn(model, io["dit_y"], 2.5, (0.2, 0.9))(io["dit_x"], io["dit_t"])
    assert (v - io["cfg_v"][:3]).abs().max() < 1e-5  # both official halves hold the guided velocity


@needs_oracle
def test_official_forward_with_cfg_method_matches_official():
    """Scripts written against the official model call model.forward_with_cfg on the doubled batch."""
    model, io = oracle_model(), oracle_io()
    x, t, y = io["dit_x"], io["dit_t"], io["dit_y"]
    with torch.no_grad():
        v = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                   torch.cat([y, torch.full_like(y, model.num_classes)]), 2.5, (0.2, 0.9))
    assert v.shape == io["cfg_v"].shape and (v - io["cfg_v"]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="t_min < t_max"):
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 2.5, (0.9, 0.2))


def _noisy(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_official_forward_with_autoguidance_method():
    torch.manual_seed(0)
    kw = dict(input_size=2, in_channels=8, depth=(1, 1), num_heads=(2, 2), num_classes=3)
    model = _noisy(DiTDH(hidden_size=(32, 48), **kw))
    guide = _noisy(DiTDH(hidden_size=(16, 16), **kw))
    x, t, y = torch.randn(4, 8, 2, 2), torch.tensor([0.05, 0.3, 0.6, 0.95]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        v = model.forward_with_autoguidance(x, t, y, 2.0, guide.forward, (0.1, 0.9))
        want = velocity_fn(model, y, 2.0, (0.1, 0.9), guide=guide)(x, t)
        plain = model(x, t, y)
    assert (v - want).abs().max() < 1e-6
    assert torch.equal(v[[0, 3]], plain[[0, 3]]) and not torch.allclose(v[1:3], plain[1:3])  # outside: unguided


def test_lightningdit_official_guidance_methods():
    """The official LightningDiT's rule: [lo, hi) intervals where interval_cfg (> 1) or the conditional
    velocity replaces cfg_scale, decided by the batch's first t."""
    from raebench.stage2.models import LightningDiT

    torch.manual_seed(0)
    model = _noisy(LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    guide = _noisy(LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=1, num_heads=2, num_classes=5))
    x, y = torch.randn(2, 8, 4, 4), torch.tensor([1, 3])
    x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 5)])
    with torch.no_grad():
        cond, uncond = model(torch.cat([x, x]), torch.full((4,), 0.5), y2).chunk(2)

        def cfg(t, *args):
            return model.forward_with_cfg(x2, torch.full((4,), t), y2, 3.0, *args)

        assert torch.allclose(cfg(0.5), torch.cat([uncond + 3 * (cond - uncond)] * 2), atol=1e-6)  # no interval
        assert torch.equal(cfg(0.5, [(0.4, 0.6)]), torch.cat([cond, cond]))  # inside, interval_cfg 0: conditional
        assert torch.equal(cfg(0.5, (0.4, 0.6)), cfg(0.5, [(0.4, 0.6)]))  # one pair = a list of one
        assert torch.allclose(cfg(0.5, [(0.4, 0.6)], 1.5), torch.cat([uncond + 1.5 * (cond - uncond)] * 2), atol=1e-6)
        assert torch.allclose(cfg(0.6, [(0.4, 0.6)]), cfg(0.6), atol=0)  # hi is excluded
        v = model.forward_with_autoguidance(x2, torch.full((4,), 0.5), torch.cat([y, y]), 2.0, guide.forward)
        want = velocity_fn(model, y, 2.0, (0.0, 1.0), guide=guide)(x, torch.full((2,), 0.5))
    assert v.shape == (4, 8, 4, 4) and (v - torch.cat([want, want])).abs().max() < 1e-6


def test_grid():
    g = time_grid(5, 1.0)
    assert g[0] == 1 and g[-1] == pytest.approx(1e-3, abs=1e-6) and len(g) == 5 and (g.diff() < 0).all()
    assert canonical_method("heun2") == "heun" and canonical_method("dopri5") == "adaptive"
    with pytest.raises(ValueError):
        canonical_method("rk45")


class Counting(torch.nn.Module):
    """Toy velocity model that records batch sizes; v = x - target(y)."""

    num_classes = 3

    def __init__(self, gain=1.0):
        super().__init__()
        self.gain, self.batches = gain, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.gain * (x - y.float().view(-1, 1, 1, 1))


def test_cfg_interval_and_doubling():
    m = Counting()
    x, y = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 1])
    v = velocity_fn(m, y, 2.0, (0.3, 0.6))
    t_in, t_out = torch.full((4,), 0.5), torch.full((4,), 0.9)
    cond, uncond = m(x, t_in, y), m(x, t_in, torch.full_like(y, 3))
    m.batches.clear()
    torch.testing.assert_close(v(x, t_in), uncond + 2.0 * (cond - uncond))
    torch.testing.assert_close(v(x, t_out), cond)
    assert m.batches[0] == 8  # CFG doubles the batch
    for edge in (0.3, 0.6):  # the interval is closed at both ends, as the official t >= lo & t <= hi
        t_edge = torch.full((4,), edge)
        guided = m(x, t_edge, torch.full_like(y, 3)) + 2.0 * (m(x, t_edge, y) - m(x, t_edge, torch.full_like(y, 3)))
        torch.testing.assert_close(v(x, t_edge), guided)


def test_autoguidance_no_doubling():
    main, guide = Counting(1.0), Counting(0.5)
    x, y, t = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 1]), torch.full((4,), 0.5)
    v = velocity_fn(main, y, 1.5, (0.0, 1.0), guide=guide)(x, t)
    vm, vg = main(x, t, y), guide(x, t, y)
    torch.testing.assert_close(v, vg + 1.5 * (vm - vg))
    assert main.batches[0] == 4 and guide.batches[0] == 4


class PointMass(torch.nn.Module):
    """Exact velocity for data concentrated at ``mu``: v = (x - mu) / t, so x(t) = mu + (x(1) - mu) t."""

    num_classes = 1
    mu = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1)

    def forward(self, x, t, y):
        return (x - self.mu) / t.view(-1, 1, 1, 1)


def test_adaptive_is_accurate():
    z = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    grid = time_grid(10, 2.0)
    out = sample(PointMass(), z, y, method="adaptive", num_steps=10, shift=2.0, rtol=1e-6, atol=1e-8)
    exact = PointMass.mu + (z - PointMass.mu) * grid[-1]
    assert (out - exact).abs().max() < 1e-5
    assert (sample(PointMass(), z, y, method="heun", num_steps=10, shift=2.0) - exact).abs().max() < 1e-5


def tiny_ditdh(seed: int = 0) -> DiTDH:
    """A 4x4x8 DiT-DH whose zero-initialised adaLN / output layers are perturbed, so that the velocity
    (|v| ~ 0.6) depends on x, t and the label."""
    torch.manual_seed(seed)
    model = DiTDH(input_size=4, patch_size=1, in_channels=8, hidden_size=[32, 48], depth=[2, 1],
                  num_heads=[2, 2], num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_inputs(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)


class Gaussian(torch.nn.Module):
    """Exact velocity for data N(mu, s^2 I) on the linear path x_t = (1 - t) x_0 + t eps:
    x_t ~ N(a mu, (a^2 s^2 + t^2) I) with a = 1 - t, and v = E[eps - x_0 | x_t] is
    v(x, t) = (t - a s^2) (x - a mu) / (a^2 s^2 + t^2) - mu.  The ODE flow from t = 1 is
    x(t) = a mu + sqrt(a^2 s^2 + t^2) x(1)."""

    num_classes = 1

    def __init__(self, mu=(1.5, -2.0), s=0.5):
        super().__init__()
        self.mu, self.s = torch.tensor(mu, dtype=torch.float64).view(1, -1, 1, 1), s

    def forward(self, x, t, y):
        t = t.view(-1, 1, 1, 1).double()
        a = 1 - t
        return ((t - a * self.s**2) * (x.double() - a * self.mu) / (a * a * self.s**2 + t * t) - self.mu).float()

    def flow(self, x1: torch.Tensor, t: float) -> torch.Tensor:
        a = 1 - t
        return (a * self.mu + math.sqrt(a * a * self.s**2 + t * t) * x1.double()).float()


def test_adaptive_matches_torchdiffeq():
    """``adaptive`` is torchdiffeq's dopri5 step for step: same result and calls at the official
    tolerances (given as one-element lists, as the official sampler does, which makes torchdiffeq's
    error control float64); at tight tolerances both are the exact flow and agree whatever the steps."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = tiny_ditdh()
    z, y = tiny_inputs()
    for shift, atol, rtol, tol in ((1.0, 1e-6, 1e-3, 1e-6), (2.0, 1e-6, 1e-3, 1e-6), (2.0, 1e-9, 1e-7, 1e-5)):
        grid = time_grid(10, shift)
        calls = {"ours": 0, "ref": 0}

        def v(x, t):
            calls["ours"] += 1
            return model(x, t, y)

        def f(t, x):
            calls["ref"] += 1
            return model(x, torch.ones(x.shape[0]) * t, y)

        with torch.no_grad():
            ours = adaptive(v, z, float(grid[0]), float(grid[-1]), rtol=rtol, atol=atol)
            ref = torchdiffeq.odeint(f, z, grid, method="dopri5", rtol=[rtol], atol=[atol])[-1]
        assert (ours - ref).abs().max() <= tol, (shift, rtol)
        assert calls["ours"] == calls["ref"] > 20


def test_adaptive_exact_gaussian_flow():
    m, z = Gaussian(), torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    exact = m.flow(z, float(time_grid(10, 3.0)[-1]))
    out = sample(m, z, y, method="adaptive", num_steps=10, shift=3.0, rtol=1e-7, atol=1e-9)
    assert (out - exact).abs().max() < 2e-5
    # the official default rtol 1e-3 is loose: 3 steps, error 0.08 here (torchdiffeq alike)
    assert (sample(m, z, y, method="dopri5", num_steps=10, shift=3.0, rtol=1e-5, atol=1e-7) - exact).abs().max() < 1e-4


def test_euler_maruyama_without_diffusion_is_euler():
    """diffusion_norm = 0: no score term, no noise; the grid is the SDE grid plus the last step to 0."""
    model = tiny_ditdh()
    z, y = tiny_inputs()
    grid = torch.cat([sde_time_grid(8, 2.0, 0.04), torch.zeros(1)])
    with torch.no_grad():
        ref = euler(lambda x, t: model(x, t, y), z, grid)
    for last in ("euler", "mean"):
        out = sample(model, z, y, method="em", num_steps=8, shift=2.0, diffusion_norm=0.0, last_step=last,
                     last_step_from_grid=True, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


class Affine(torch.nn.Module):
    """v = 0.7 x + 0.3 t - 0.1 y, for hand computations."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return 0.7 * x + 0.3 * t.view(-1, 1, 1, 1) - 0.1 * y.view(-1, 1, 1, 1).float()


def test_euler_maruyama_one_step_by_hand():
    """Two grid points: one noisy step 1 -> t1 = shift(0.04), then the mean step at tau = 0.04."""
    m, shift, norm, tau = Affine(), 1.5, 0.8, 0.04
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    out = sample(m, x.float(), y, method="em", num_steps=2, shift=shift, diffusion_norm=norm,
                 generator=torch.Generator().manual_seed(7))
    assert m.calls == 2  # num_steps network calls: one per grid step plus the last step
    zn = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7)).double()
    yb = y.view(-1, 1, 1, 1).double()

    def v(x, t):
        return 0.7 * x + 0.3 * t - 0.1 * yb

    def score(x, t):
        return -(x + (1 - t) * v(x, t)) / t

    t1 = shift * tau / (1 + (shift - 1) * tau)
    w0 = norm * 1.0  # sigma form: w(t) = norm * t at t = 1, where the score is -x
    x1 = x - (v(x, 1.0) - w0 * -x) * (1 - t1) + math.sqrt(2 * w0 * (1 - t1)) * zn
    x2 = x1 - (v(x1, tau) - norm * tau * score(x1, tau)) * tau
    torch.testing.assert_close(out.double(), x2, rtol=0, atol=2e-6)
    last = sample(Affine(), x.float(), y, method="em", num_steps=2, shift=shift, diffusion_norm=norm,
                  last_step=None, diffusion_form="constant", generator=torch.Generator().manual_seed(7))
    zn = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7)).double()  # grid now ends at 0
    x1 = x - (v(x, 1.0) - norm * -x) * 1.0 + math.sqrt(2 * norm) * zn
    torch.testing.assert_close(last.double(), x1, rtol=0, atol=2e-6)


def test_stochastic_heun_one_step_by_hand():
    """Two grid points: noise kick at t0 = 1, Heun step to t1 = shift(tau), then the mean last step."""
    m, shift, norm, tau = Affine(), 1.5, 0.8, 0.04
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    out = sample(m, x.float(), y, method="stochastic-heun", num_steps=2, shift=shift, diffusion_norm=norm,
                 generator=torch.Generator().manual_seed(7))
    zn = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7)).double()
    yb = y.view(-1, 1, 1, 1).double()

    def drift(x, t):  # v - w s with w = norm * t (the "sigma" form) and s = -(x + (1 - t) v) / t
        v = 0.7 * x + 0.3 * t - 0.1 * yb
        return v + norm * (x + (1 - t) * v)

    t1 = shift * tau / (1 + (shift - 1) * tau)
    dt = 1.0 - t1
    xh = x + (2 * norm * 1.0 * dt) ** 0.5 * zn
    k1 = drift(xh, 1.0)
    k2 = drift(xh - dt * k1, t1)
    x1 = xh - dt / 2 * (k1 + k2)
    torch.testing.assert_close(out.double(), x1 - drift(x1, tau) * tau, rtol=0, atol=2e-6)
    # without a last step the grid ends at t = 0, where Heun's corrector would divide by t: refused, not NaN
    with pytest.raises(ValueError, match="sde-heun needs a last step"):
        sample(m, x.float(), y, method="stochastic-heun", num_steps=3, last_step=None)


GAUSS_CASES = {
    "default": dict(),
    "decreasing": dict(diffusion_form="decreasing"),
    "norm0.3_tweedie": dict(diffusion_norm=0.3, last_step="tweedie"),
    "shift2_from_grid": dict(shift=2.0, last_step_from_grid=True, last_step_size=0.02),
}


@pytest.mark.parametrize("case", list(GAUSS_CASES))
def test_euler_maruyama_gaussian_statistics(case):
    """The reverse SDE keeps the marginals: on N(mu, s^2 I) data with the exact velocity the samples
    have mean mu and std s (20000 values per channel: standard errors 0.004 / 0.003; the rest of the
    tolerance is the first-order discretisation). A wrong score (sign, size) or noise is far off:
    a flipped score gives std 2.3, no score 0.9, half the score 0.65."""
    m, n = Gaussian(), 20_000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, 1, 1, generator=g)
    out = sample(m, z, torch.zeros(n, dtype=torch.long), method="euler-maruyama", num_steps=100, generator=g,
                 **GAUSS_CASES[case])
    mean, std = out.mean((0, 2, 3)).double(), out.std((0, 2, 3)).double()
    assert (mean - m.mu.view(-1)).abs().max() < 0.02 and (std - m.s).abs().max() < 0.02, (mean, std)


def test_euler_maruyama_unshifted_last_step():
    """As officially: with a shift the last step is evaluated at the unshifted tau, so it stops at
    t = shift(tau) - tau, where the mean is (1 - t) mu."""
    m, n = Gaussian(), 20_000
    g = torch.Generator().manual_seed(1)
    out = sample(m, torch.randn(n, 2, 1, 1, generator=g), torch.zeros(n, dtype=torch.long), method="em",
                 num_steps=100, shift=3.0, generator=g)
    t_left = 3 * 0.04 / (1 + 2 * 0.04) - 0.04
    assert (out.mean((0, 2, 3)).double() - (1 - t_left) * m.mu.view(-1)).abs().max() < 0.02


def test_euler_maruyama_noise_and_options():
    m, x, y = Affine(), torch.ones(2, 2, 1, 1), torch.zeros(2, dtype=torch.long)
    a = sample(m, x, y, method="em", num_steps=10, generator=torch.Generator().manual_seed(3))
    b = sample(m, x, y, method="em", num_steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and m.calls == 20
    torch.manual_seed(3)  # no generator: torch's global CPU RNG, as the official sampler draws it
    assert torch.equal(sample(m, x, y, method="sde", num_steps=10), a)
    with pytest.raises(ValueError, match="SBDM"):
        sample(m, x, y, method="em", num_steps=4, diffusion_form="SBDM")
    with pytest.raises(ValueError, match="last_step"):
        sample(m, x, y, method="em", num_steps=4, last_step="heun")
    assert m.calls == 30  # both rejected before any network call
    for form in ("sigma", "linear", "constant", "decreasing", "increasing-decreasing", "inccreasing-decreasing"):
        assert torch.isfinite(sample(m, x, y, method="em", num_steps=4, diffusion_form=form)).all()


def test_diffusion_coefficient_forms_are_the_official_ones():
    """The official ``compute_diffusion`` written out for the linear path (t = 0 data): sigma and
    linear norm * t, constant norm, decreasing 0.25 (norm cos(pi (1 - t)) + 1)^2, increasing-decreasing
    norm sin(pi (1 - t))^2 (its key is spelled "inccreasing-decreasing" there)."""
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    norm = 0.7
    expected = {
        "sigma": norm * t, "linear": norm * t, "constant": torch.full_like(t, norm),
        "decreasing": 0.25 * (norm * torch.cos(math.pi * (1 - t)) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(math.pi * (1 - t)) ** 2,
        "inccreasing-decreasing": norm * torch.sin(math.pi * (1 - t)) ** 2,
    }
    for form, want in expected.items():
        torch.testing.assert_close(diffusion_coefficient(form, t, norm), want, rtol=1e-12, atol=0, msg=form)


class LabelBlind(Affine):
    """v = 0.7 x + 0.3 t: the same velocity for every label, so CFG's guided velocity is the conditional one."""

    def forward(self, x, t, y):
        self.calls += 1
        return 0.7 * x + 0.3 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("method", ["euler-maruyama", "stochastic-heun"])
def test_sde_with_cfg_draws_the_step_noise_for_the_doubled_batch(method):
    """The official sampler integrates the guided batch [x, x] and draws randn of its size at every
    step. With a label-blind model that is the unguided sampler on [x, x], first half."""
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    guided = sample(LabelBlind(), x, y, method=method, num_steps=5, cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(5))
    doubled = sample(LabelBlind(), torch.cat([x, x]), torch.cat([y, torch.full_like(y, 3)]), method=method,
                     num_steps=5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(guided, doubled[:3], rtol=0, atol=1e-6)
    assert not torch.allclose(doubled[:3], doubled[3:])  # the two halves got different noise after step 1


@needs_oracle
def test_sampling_ignores_train_mode():
    """Label dropout must not act while sampling, whatever mode the caller left the model in."""
    model, io = oracle_model(), oracle_io()
    model.train()
    out = sample(model, io["sample_noise"], io["dit_y"], shift=oracle_shift(), method="euler", num_steps=12)
    assert (out - io["sample_euler_12"]).abs().max() < 1e-4 and model.training


class Bumpy(torch.nn.Module):
    """A nonlinear toy velocity with a null class: v = gain * sin(3 x + y) / (0.2 + t)."""

    num_classes = 3

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x, t, y):
        return self.gain * torch.sin(3 * x + y.float().view(-1, 1, 1, 1)) / (0.2 + t.view(-1, 1, 1, 1))


def test_autoguidance_adaptive_integrates_the_official_doubled_batch():
    """The official scripts integrate AutoGuidance on [x, x] with labels [y, null]; dopri5's step
    sizes depend on the whole state, so the null half changes the conditional half's result."""
    from torchdiffeq import odeint

    main, guide = Bumpy(1.0), Bumpy(0.6)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0, 2, 1])
    grid = time_grid(10, 2.0)
    y2 = torch.cat([y, torch.full_like(y, 3)])

    def official(t, x2):  # forward_with_autoguidance on the doubled batch, cfg_interval (0, 1)
        tt = torch.ones(x2.shape[0]) * t
        v, v_g = main(x2, tt, y2), guide(x2, tt, y2)
        return v_g + 1.5 * (v - v_g) if 0 <= float(t) <= 1 else v  # dopri5 may step just past the end

    ts = torch.tensor([float(grid[0]), float(grid[-1])])
    want = odeint(official, torch.cat([z, z]), ts, method="dopri5", rtol=[1e-3], atol=[1e-6])[-1][:3]
    got = sample(main, z, y, num_steps=10, method="adaptive", shift=2.0, cfg_scale=1.5, guide=guide)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    single = adaptive(velocity_fn(main, y, 1.5, (0.0, 1.0), guide=guide), z, float(grid[0]), float(grid[-1]))
    assert (single - want).abs().max() > 1e-4  # the N-row integration would not be the official result
