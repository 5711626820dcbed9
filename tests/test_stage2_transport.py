"""Transport: the t = 0 data / t = 1 noise convention, the time shift, time sampling, the loss."""

import json
import math

import pytest
import torch

from raebench.stage2.transport import T_MAX, Transport, shift_from_dims, time_shift, truncated_logit_normal

from conftest import ORACLE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_convention_t0_data_t1_noise():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt, v = Transport.interpolate(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert torch.equal(v, noise - x0)  # dx_t/dt points from data to noise


def test_shift_formula():
    assert shift_from_dims(768 * 16 * 16) == pytest.approx(math.sqrt(48))
    t = torch.linspace(0, 1, 11)
    assert torch.equal(time_shift(t, 1.0), t)
    s = time_shift(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()


@pytest.mark.skipif(not (ORACLE / "meta.json").exists(), reason="oracle fixtures not present")
def test_shift_matches_official():
    from safetensors.torch import load_file

    meta = json.loads((ORACLE / "meta.json").read_text())["time_shift"]
    io = load_file(str(ORACLE / "ditdh_io.safetensors"))
    s = shift_from_dims(meta["dim"], meta["base"])
    assert s == pytest.approx(meta["shift"], abs=1e-12)
    assert (time_shift(io["shift_t_in"], s) - io["shift_t_out"]).abs().max() < 1e-6


def test_time_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    t = Transport("uniform").sample_t(20000, generator=g)
    assert t.min() >= 0 and t.max() <= T_MAX and abs(t.mean() - T_MAX / 2) < 0.01
    ln = truncated_logit_normal(20000, 0.0, 1.0, generator=g)
    assert ln.min() > 0 and ln.max() <= T_MAX and abs(ln.median() - 0.5) < 0.02
    shifted = Transport("logit-normal", shift=3.0).sample_t(20000, generator=g)
    assert shifted.median() > 0.7  # s = 3 moves the median 0.5 to 0.75


def test_from_official_params():
    tr = Transport.from_official({"path_type": "Linear", "prediction": "velocity", "time_dist_type": "logit-normal_0_1"}, 2.0)
    assert (tr.time_dist, tr.mu, tr.sigma, tr.shift) == ("logit-normal", 0.0, 1.0, 2.0)
    assert Transport.from_official({"time_dist_type": "uniform"}, 1.0).time_dist == "uniform"
    with pytest.raises(ValueError):
        Transport.from_official({"path_type": "VP"}, 1.0)


def test_loss_zero_for_exact_velocity():
    """A 'model' that knows the data point returns the exact velocity: the loss is zero."""
    x0 = torch.randn(4, 2, 3, 3)

    def exact(xt, t, y):
        tt = t.view(-1, 1, 1, 1)
        noise = (xt - (1 - tt) * x0) / tt
        return noise - x0

    loss = Transport("uniform").loss(exact, x0, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(1))
    assert loss.shape == (4,) and loss.max() < 1e-6


@pytest.mark.parametrize("mu, sigma", [(0.5, 0.7), (1.0, 2.0)])
def test_truncated_logit_normal_is_the_inverse_cdf_draw(mu, sigma):
    """X = expit(mu + sigma * ndtri(U)) with U uniform on [ndtr(-inf), ndtr((logit(1 - 1/1000) - mu) / sigma)]:
    the official truncated_logitnormal_sample, written with scipy, on the same uniforms."""
    from scipy.special import expit, logit, ndtr, ndtri

    n = 2000
    got = truncated_logit_normal(n, mu, sigma, generator=torch.Generator().manual_seed(3))
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    c_hi = ndtr((logit(T_MAX) - mu) / sigma)
    want = expit(mu + sigma * ndtri(c_hi * u))
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-7)


def test_loss_is_the_per_sample_mean_squared_velocity_error():
    """The official mean_flat((model_output - (x1 - x0))^2) on a model that is not exact."""
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 2])

    def model(xt, t, y):
        return 0.5 * xt - t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)

    xt = (1 - t.view(-1, 1, 1, 1)).double() * x0.double() + t.view(-1, 1, 1, 1).double() * noise.double()
    want = ((model(xt, t.double(), y.double()) - (noise.double() - x0.double())) ** 2).mean(dim=(1, 2, 3))
    got = Transport().loss_at(model, x0, y, t, noise)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_truncated_logit_normal_with_a_lower_bound_is_the_inverse_cdf_draw():
    """The same inverse-CDF draw on [low, high] with low > 0 (training uses low = 0, where
    ndtr(-inf) = 0 hides the lower end): U uniform on [ndtr(z_lo), ndtr(z_hi)], written with scipy."""
    from scipy.special import expit, logit, ndtr, ndtri

    n, mu, sigma, low, high = 2000, 0.3, 1.5, 0.2, 0.9
    got = truncated_logit_normal(n, mu, sigma, low, high, generator=torch.Generator().manual_seed(5))
    u = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    c_lo, c_hi = ndtr((logit(low) - mu) / sigma), ndtr((logit(high) - mu) / sigma)
    want = expit(mu + sigma * ndtri(c_lo + (c_hi - c_lo) * u))
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-7)
