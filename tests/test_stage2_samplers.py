"""Samplers against the official samples; guidance semantics; adaptive and SDE solvers."""

import json

import pytest
import torch

from raebench.stage2.samplers import canonical_method, sample, time_grid, velocity_fn
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


def test_euler_maruyama_recovers_point_mass():
    """For data concentrated at a point mu the exact velocity is (x - mu)/t; EM must land on mu."""
    mu = PointMass.mu
    g = torch.Generator().manual_seed(0)
    out = sample(PointMass(), torch.randn(64, 2, 1, 1, generator=g), torch.zeros(64, dtype=torch.long),
                 method="euler-maruyama", num_steps=100, generator=g)
    err = (out - mu).abs()
    assert err.max() < 0.1 and err.mean() < 0.03  # first-order scheme, stiff near t = 0
    a = sample(PointMass(), torch.ones(2, 2, 1, 1), torch.zeros(2, dtype=torch.long), method="em", num_steps=10,
               generator=torch.Generator().manual_seed(3))
    b = sample(PointMass(), torch.ones(2, 2, 1, 1), torch.zeros(2, dtype=torch.long), method="em", num_steps=10,
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@needs_oracle
def test_sampling_ignores_train_mode():
    """Label dropout must not act while sampling, whatever mode the caller left the model in."""
    model, io = oracle_model(), oracle_io()
    model.train()
    out = sample(model, io["sample_noise"], io["dit_y"], shift=oracle_shift(), method="euler", num_steps=12)
    assert (out - io["sample_euler_12"]).abs().max() < 1e-4 and model.training
