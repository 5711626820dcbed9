"""raebench.stage2.cpu_gemm: the DiT-DH's float32 CPU GEMMs through oneDNN equal torch's within float32
rounding (forward and both backward GEMMs), the choice is made once and can be forced, and everything that
is not eager float32 on the CPU keeps torch's ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raebench.stage2 import cpu_gemm

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def gemm(monkeypatch):
    """Set RAEBENCH_CPU_GEMM for one test (the process's choice is cached: cleared before and after)."""
    def set_choice(value: str) -> None:
        monkeypatch.setenv("RAEBENCH_CPU_GEMM", value)
        cpu_gemm.use_onednn.cache_clear()
    yield set_choice
    cpu_gemm.use_onednn.cache_clear()


def _grads(f, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = f(x, w, b)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, w.grad, b.grad


@onednn
def test_linear_equals_torch_forward_and_backward(gemm, monkeypatch):
    gemm("onednn")
    assert cpu_gemm.use_onednn()  # decided (its own check calls oneDNN once) before counting
    calls = []
    real = cpu_gemm._onednn_linear
    monkeypatch.setattr(cpu_gemm, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 24, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    ours = _grads(cpu_gemm.linear, x, w, b)
    assert len(calls) == 3  # forward, input gradient, weight gradient
    ref = _grads(lambda *a: F.linear(*(t.double() for t in a)), x, w, b)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        torch.testing.assert_close(o.double(), r.double(), rtol=1e-5, atol=1e-5)


@onednn
@pytest.mark.parametrize("shape", [(4, 0, 48), (0, 48), (48,)])
def test_empty_and_one_dimensional_inputs(gemm, shape):
    """oneDNN refuses an empty product (an empty batch's weight gradient): such inputs take torch's ops."""
    gemm("onednn")
    x = torch.randn(*shape, requires_grad=True)
    w, b = torch.randn(8, 48, requires_grad=True), torch.randn(8, requires_grad=True)
    y = cpu_gemm.linear(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@onednn
def test_transposed_views_and_out(gemm):
    gemm("onednn")
    a, b = torch.randn(64, 32), torch.randn(64, 48)
    out = torch.empty(32, 48)
    r = cpu_gemm.mm(a.t(), b, out=out)  # (32, 64) @ (64, 48), a transposed view read in place
    assert r.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, a.t() @ b, rtol=1e-5, atol=1e-5)


def test_torch_forced_and_other_dtypes_keep_torchs_ops(gemm, monkeypatch):
    def boom(*a):
        raise AssertionError("oneDNN used")

    monkeypatch.setattr(cpu_gemm, "_onednn_linear", boom)
    gemm("torch")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(cpu_gemm.linear(x, w), F.linear(x, w))
    torch.testing.assert_close(cpu_gemm.mm(x, w.t()), x @ w.t())
    gemm("onednn")
    cpu_gemm.linear(x.double(), w.double())  # float64 (gradient checks): torch's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(x, w).dtype == torch.bfloat16  # autocast decides the precision, as for F.linear


def test_the_choice_leaves_the_global_rng_alone(gemm):
    """Deciding times GEMMs on random matrices: drawn from the global RNG, they shifted every later draw
    (label dropout, noise) depending on when the first forward ran."""
    gemm("auto")
    torch.manual_seed(3)
    cpu_gemm.use_onednn()
    after = torch.rand(4)
    torch.manual_seed(3)
    torch.testing.assert_close(after, torch.rand(4), rtol=0, atol=0)


def test_a_bad_choice_is_one_sentence(gemm):
    from raebench.errors import RaebenchError

    gemm("mkl")
    with pytest.raises(RaebenchError, match="RAEBENCH_CPU_GEMM='mkl' is not one of auto, onednn, torch"):
        cpu_gemm.use_onednn()


@onednn
def test_auto_takes_the_faster_library(gemm, monkeypatch):
    gemm("auto")
    times = iter([5.0, 1.0])  # torch, then oneDNN
    monkeypatch.setattr(cpu_gemm, "_median_ms", lambda f, n=7: next(times))
    assert cpu_gemm.use_onednn()
    gemm("auto")
    times = iter([1.0, 0.95])  # oneDNN only 5 % faster: torch's ops stay
    monkeypatch.setattr(cpu_gemm, "_median_ms", lambda f, n=7: next(times))
    assert not cpu_gemm.use_onednn()


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ref = nn.Linear(6, 4)
    ours = cpu_gemm.Linear(6, 4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@onednn
def test_ditdh_training_step_with_onednn_equals_torchs(gemm):
    """The whole model: velocities and every parameter gradient of a tiny DiT-DH agree between the two
    libraries within float32 rounding (the fused per-token adaLN projections included)."""
    from raebench.stage2.models import MODELS

    def run(choice):
        gemm(choice)
        torch.manual_seed(0)
        model = MODELS.get("ditdh-tiny").build(input_size=4, in_channels=8, num_classes=10)
        with torch.no_grad():  # adaLN-Zero starts with zero outputs and gradients: every tensor random instead
            for p in model.parameters():  # (at std 0.2 outputs reach ~4e3 and float32 rounding is amplified)
                p.normal_(0, 0.05)
        x, t, y = torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([1, 2, 3])
        v = model(x, t, y)
        v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    v1, g1 = run("torch")
    v2, g2 = run("onednn")
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        scale = g1[n].abs().max().clamp_min(1e-12)
        assert (g2[n] - g1[n]).abs().max() / scale < 1e-4, n
