"""Hand-fused adaLN-Zero functions: values and gradients against plain autograd, float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from raebench.stage2 import fused
from raebench.stage2.models import DiTDH, LightningDiT, Rope2D

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def _rms_ref(x, w, shift, scale, eps):
    h = F.rms_norm(x, (x.shape[-1],), w, eps)
    return h * (1 + scale) + (shift if shift is not None else 0)


@pytest.mark.parametrize("tokens", [1, 5], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("with_shift", [True, False])
def test_rms_modulate_gradcheck_and_reference(tokens, with_shift):
    x, w = _rand(2, 5, 8), _rand(8, seed=1)
    shift = _rand(2, tokens, 8, seed=2) if with_shift else None
    scale = _rand(2, tokens, 8, seed=3)
    inputs = (x, w, shift, scale, 1e-6)
    assert torch.autograd.gradcheck(fused.rms_modulate, inputs)
    ins = [t for t in (x, w, shift, scale) if t is not None]
    out, ref = fused.rms_modulate(*inputs), _rms_ref(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_rms_modulate_residual_with_one_output_unused():
    """Either output alone reaching the loss gives that output's exact gradient (no materialised zeros)."""
    x, w, shift, scale = _rand(2, 5, 8), _rand(8, seed=1), _rand(2, 1, 8, seed=2), _rand(2, 1, 8, seed=3)
    y, x_out = fused.rms_modulate_residual(x, w, shift, scale, 1e-6)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(x_out, x, g, retain_graph=True)[0], g)
    got = torch.autograd.grad(y, (x, w, shift, scale), g)
    want = torch.autograd.grad(_rms_ref(x, w, shift, scale, 1e-6), (x, w, shift, scale), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rms_modulate_mixed_precision_returns_input_dtypes():
    """bf16 modulations (autocast linear outputs) on a float32 stream: computed in float32."""
    x = torch.randn(2, 6, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    shift = torch.randn(2, 6, 16).bfloat16().requires_grad_(True)
    scale = torch.randn(2, 6, 16).bfloat16().requires_grad_(True)
    out = fused.rms_modulate(x, w, shift, scale, 1e-6)
    ref = _rms_ref(x, w, shift.float(), scale.float(), 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert (x.grad.dtype, shift.grad.dtype, scale.grad.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 5], ids=["per-sample", "per-token"])
def test_gated_residual_gradcheck(tokens):
    x, gate, f = _rand(3, 5, 4), _rand(3, tokens, 4, seed=1), _rand(3, 5, 4, seed=2)
    assert torch.autograd.gradcheck(fused.gated_residual, (x, gate, f))
    torch.testing.assert_close(fused.gated_residual(x, gate, f), x + gate * f)


def test_swiglu_gradcheck():
    u = _rand(2, 3, 10)
    assert torch.autograd.gradcheck(fused.swiglu, (u,))
    a, b = u.chunk(2, -1)
    torch.testing.assert_close(fused.swiglu(u), F.silu(a) * b)


def test_linear_chunks_gradcheck_including_unused_chunks():
    c, w, b = _rand(2, 3, 4), _rand(12, 4, seed=1), _rand(12, seed=2)
    assert torch.autograd.gradcheck(lambda *a: fused.linear_chunks(*a, 3), (c, w, b))
    # a chunk that does not reach the loss gets no gradient; the others are exact
    out = fused.linear_chunks(c, w, b, 3)
    ref = F.linear(c, w, b).chunk(3, -1)
    loss, loss_ref = (out[0] * 2).sum() + out[2].pow(2).sum(), (ref[0] * 2).sum() + ref[2].pow(2).sum()
    for x, y in zip(torch.autograd.grad(loss, (c, w, b)), torch.autograd.grad(loss_ref, (c, w, b))):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_qkv_rope_matches_rotate_half_reference():
    heads, hd, grid = 2, 8, 3
    rope = Rope2D(hd, grid).double()
    qkv = _rand(2, grid * grid, 3 * heads * hd)
    assert torch.autograd.gradcheck(lambda t: fused.qkv_rope(t, rope.freqs_cos, rope.freqs_sin, heads), (qkv,))

    def reference(t):  # x cos + rotate_half(x) sin, rotate_half on adjacent pairs (x0, x1) -> (-x1, x0)
        q, k, v = t.view(2, grid * grid, 3, heads, hd).permute(2, 0, 3, 1, 4)
        def rot(z):
            pairs = z.unflatten(-1, (-1, 2))
            half = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
            return z * rope.freqs_cos + half * rope.freqs_sin
        return rot(q), rot(k), v
    outs, refs = fused.qkv_rope(qkv, rope.freqs_cos, rope.freqs_sin, heads), reference(qkv)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gs = [torch.randn_like(o) for o in outs]
    torch.testing.assert_close(torch.autograd.grad(outs, qkv, gs)[0], torch.autograd.grad(refs, qkv, gs)[0])


def test_qkv_rope_backward_takes_gradients_of_any_layout():
    """SDPA backwards on CUDA hand back q/k gradients whose channels are not contiguous (found on an
    H200 by bench/check_stage2_device.py); the backward must give the same result as for contiguous ones."""
    rope = Rope2D(8, 3)
    qkv = torch.randn(2, 9, 48, requires_grad=True)
    outs = fused.qkv_rope(qkv, rope.freqs_cos, rope.freqs_sin, 2)
    gs = [torch.randn(2, 2, 8, 9).transpose(-1, -2) for _ in range(3)]  # (N, H, L, hd), channel stride 9
    assert gs[0].stride(-1) != 1
    odd = torch.randn(2, 2, 9, 9)[..., 1:]  # storage offset 1: pairs straddle complex boundaries
    for layout in (gs, [odd, gs[1], gs[2]]):
        got = torch.autograd.grad(outs, qkv, layout, retain_graph=True)[0]
        want = torch.autograd.grad(outs, qkv, [g.contiguous() for g in layout], retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["ditdh", "ditdh-wo-shift", "lightningdit"])
def test_model_gradients_equal_the_plain_autograd_paths(arch):
    """The whole model, fused vs plain paths: same velocity and same gradient for every parameter."""
    torch.manual_seed(0)
    if arch == "lightningdit":
        model = LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    else:
        model = DiTDH(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 2), num_heads=(2, 2),
                      num_classes=5, wo_shift=arch.endswith("wo-shift"))
    for p in model.parameters():  # away from adaLN-Zero so that every branch carries gradient
        torch.nn.init.normal_(p, std=0.1)
    model = model.double().eval()
    x, t, y = torch.randn(3, 8, 4, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([0, 4, 2])
    w = torch.randn(3, 8, 4, 4, dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, t, y)
        (out * w).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out, grads = run()
    with fused.disabled():
        out_ref, grads_ref = run()
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(grads_ref) > 10
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_training_step_runs_and_tracks_float32():
    torch.manual_seed(0)
    model = DiTDH(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2), num_classes=5)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 3])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_rope_real_arithmetic_branch_equals_complex(monkeypatch):
    """The branch taken under torch.compile (no complex ops) gives the same rotation."""
    rope = Rope2D(8, 3)
    x = torch.randn(2, 2, 9, 8)
    ref = rope(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused.fusable(x)
    torch.testing.assert_close(rope(x), ref, rtol=1e-6, atol=1e-6)


def test_head_projection_keeps_autocast_precision():
    """Under autocast the per-token adaLN projection stays an autocast linear (bf16 GEMMs)."""
    lin = torch.nn.Linear(16, 48)
    c = torch.randn(2, 5, 16)
    from raebench.stage2.models import _modulations

    mods = _modulations(lin, c, 5, 3)
    assert mods[0].grad_fn is not None and type(mods[0].grad_fn).__name__.startswith("_LinearChunks")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mods = _modulations(lin, c, 5, 3)
    assert all(m.dtype == torch.bfloat16 for m in mods)
