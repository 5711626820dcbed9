"""Hand-fused forward/backward for the element-wise chains of an adaLN-Zero block.

Why hand-written: in eager mode every element-wise op is one pass over memory, and autograd's
generic derivatives add passes a block does not need (``addcmul``'s backward multiplies both factors
by its scalar ``value`` before using them; ``chunk``'s backward concatenates the six modulation
gradients into a new tensor; the composite ``rms_norm`` backward takes ~10 multiplies). Each
function below computes the same values in fewer passes and writes gradients straight to where the
next op reads them. ``bench/bench_stage2_step.py`` measures the step against the official model;
``tests/test_stage2_fused.py`` checks every function against plain autograd (values and gradients,
float64 ``gradcheck``, per-sample and per-token conditions, bf16 autocast).

Shapes: ``x`` (N, L, D); a modulation (shift, scale, gate) is per sample (N, 1, D) or per token
(N, L, D). The residual stream ``x`` is float32 (also under bf16 autocast); modulations and branch
outputs may be bfloat16 and their gradients are returned in their own dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from raebench.stage2 import cpu_gemm

#: the models take the fused paths while this is True (see :func:`disabled`)
ENABLED = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the models' plain-autograd paths instead: the reference the tests compare against."""
    global ENABLED
    old, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = old


def fusable(t: Tensor) -> bool:
    """The fused paths run in eager mode on float32 (and float64, for gradient checks) tensors.

    Under ``torch.compile`` the plain ops are traced instead: Inductor fuses those itself, and a
    custom autograd function would cut its fusion groups (measured: 0.90x the official compiled
    step with these functions compiled, see bench/README.md).
    """
    return ENABLED and t.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def autocast_on(t: Tensor) -> bool:
    """Whether autocast is active for ``t``'s device (its linear layers then run in low precision)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if t.device.type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta)
        return False


def wide(t: Tensor) -> Tensor:
    """float32 for half types; float32/float64 unchanged (float64 is used by the gradient checks)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _RMSModulate(torch.autograd.Function):
    """y = rms_norm(x) * w * (1 + scale) + shift, with rms_norm(x) = x / sqrt(mean(x^2) + eps)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, shift: Tensor | None, scale: Tensor, eps: float):
        xf = wide(x)
        # one reduction pass: ||x||^2 / D instead of pow + mean
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))  # (N, L, 1)
        n = xf * r  # (N, L, D) normalised
        scale_f = scale.to(xf.dtype)
        wf = w.to(xf.dtype)
        a = torch.addcmul(wf, wf, scale_f)  # w * (1 + scale): (N, 1 or L, D)
        y = torch.addcmul(shift.to(xf.dtype), n, a) if shift is not None else n * a  # (N, L, D)
        ctx.save_for_backward(n, r, a, scale_f, w)
        ctx.has_shift = shift is not None
        ctx.dtypes = (x.dtype, None if shift is None else shift.dtype, scale.dtype)
        ctx.per_token = scale.shape[1] != 1
        ctx.set_materialize_grads(False)  # an unused pass-through output gives None, not a zero-filled tensor
        # x passes through as a second output for the residual branch: its gradient then joins
        # this function's in one fused op instead of autograd adding two full-size gradients
        return y, x

    @staticmethod
    def backward(ctx, g: Tensor, g_res: Tensor | None):
        n, r, a, scale_f, w = ctx.saved_tensors
        x_dtype, shift_dtype, scale_dtype = ctx.dtypes
        if g is None:  # only the pass-through x reached the loss
            return (None if g_res is None else g_res.to(x_dtype)), None, None, None, None
        g = g.to(n.dtype)
        grad_shift = None
        if ctx.has_shift and ctx.needs_input_grad[2]:
            grad_shift = (g if ctx.per_token else g.sum(1, keepdim=True)).to(shift_dtype)
        gn = g * n  # d/d(w(1+scale)) before reduction: (N, L, D)
        if ctx.per_token:
            grad_scale = (gn * w.to(gn.dtype)).to(scale_dtype)  # (N, L, D)
            grad_w = torch.linalg.vecdot(gn.flatten(0, 1), scale_f.flatten(0, 1), dim=0) + gn.sum((0, 1))  # sum gn (1+scale)
        else:
            gs = gn.sum(1, keepdim=True)  # (N, 1, D)
            grad_scale = (gs * w.to(gs.dtype)).to(scale_dtype)
            grad_w = (gs * (1 + scale_f)).sum((0, 1))
        # rms_norm backward: dx = r * (dn - n * mean(dn * n)),  dn = g * a
        dn = g * a  # (N, L, D)
        dot = torch.linalg.vecdot(dn, n).unsqueeze(-1).div_(n.shape[-1])  # (N, L, 1)
        tmp = torch.addcmul(dn, n, dot, value=-1)
        grad_x = tmp.mul_(r) if g_res is None else torch.addcmul(g_res.to(tmp.dtype), tmp, r)
        return grad_x.to(x_dtype), grad_w.to(w.dtype), grad_shift, grad_scale, None


def rms_modulate(x: Tensor, weight: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    """rms_norm(x; weight, eps) * (1 + scale) + shift in one function (shift may be None)."""
    return _RMSModulate.apply(x, weight, shift, scale, eps)[0]


def rms_modulate_residual(x: Tensor, weight: Tensor, shift: Tensor | None, scale: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    """(:func:`rms_modulate` of x, x): use the second output as the residual stream, so that both
    gradients of x are summed inside the backward (one pass less than autograd's accumulation)."""
    return _RMSModulate.apply(x, weight, shift, scale, eps)


class _GatedResidual(torch.autograd.Function):
    """y = x + gate * f: one pass forward, two backward (``addcmul``'s generic backward takes four)."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
        ctx.save_for_backward(gate, f)
        return torch.addcmul(x, gate, f)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, f = ctx.saved_tensors
        grad_f = (g * gate).to(f.dtype) if ctx.needs_input_grad[2] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            if gate.shape[1] == 1 and g.shape[1] != 1:  # per sample: one fused multiply-reduce over tokens
                grad_gate = torch.linalg.vecdot(g, f.to(g.dtype), dim=1).unsqueeze(1).to(gate.dtype)
            else:
                grad_gate = (g * f).to(gate.dtype)
        return g, grad_gate, grad_f


def gated_residual(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    """x + gate * f (gate per sample or per token)."""
    return _GatedResidual.apply(x, gate, f)


class _SwiGLU(torch.autograd.Function):
    """h = silu(a) * b with [a, b] = u.chunk(2); the gradient of u is written in one buffer (no cat)."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        a, b = u.chunk(2, dim=-1)
        sa = torch.nn.functional.silu(a)
        ctx.save_for_backward(u, sa)
        return sa * b

    @staticmethod
    def backward(ctx, g: Tensor):
        u, sa = ctx.saved_tensors
        a, b = u.chunk(2, dim=-1)
        grad = torch.empty_like(u)
        ga, gb = grad.chunk(2, dim=-1)
        torch.mul(g, sa, out=gb)
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=ga)
        return grad


def swiglu(u: Tensor) -> Tensor:
    """silu(a) * b for [a, b] = u.chunk(2, -1)."""
    return _SwiGLU.apply(u)


class _QKVRope(torch.autograd.Function):
    """(N, L, 3*H*hd) qkv projection -> q, k rotated by RoPE, v: each (N, H, L, hd) for SDPA.

    The rotation is one complex multiply per channel pair (x0 + i x1)(cos + i sin). The backward
    writes the three gradients straight into one (N, L, 3, H, hd) buffer, the layout the qkv linear
    reads; autograd's generic graph (slice/select/unbind backward) zero-fills and adds full-size
    tensors instead. float32 only (there is no bfloat16 complex type); see :func:`qkv_rope`.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, heads: int):
        n, l, _ = qkv.shape
        t = qkv.view(n, l, 3, heads, -1)  # (N, L, 3, H, hd)
        cis = torch.complex(cos[:, ::2].to(qkv.dtype), sin[:, ::2].to(qkv.dtype))[:, None, None, :]  # (L, 1, 1, hd/2)
        rot = torch.view_as_real(torch.view_as_complex(t[:, :, :2].unflatten(-1, (-1, 2))) * cis)  # (N, L, 2, H, hd/2, 2)
        rot = rot.flatten(-2)  # (N, L, 2, H, hd)
        ctx.save_for_backward(cis)
        ctx.shape = t.shape
        return rot[:, :, 0].transpose(1, 2), rot[:, :, 1].transpose(1, 2), t[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, gq: Tensor, gk: Tensor, gv: Tensor):
        (cis,) = ctx.saved_tensors
        n, l, _, heads, hd = ctx.shape
        buf = torch.empty(ctx.shape, dtype=cis.real.dtype, device=cis.device)  # (N, L, 3, H, hd)
        for i, g in enumerate((gq, gk)):
            dst = torch.view_as_complex(buf[:, :, i].unflatten(-1, (-1, 2)))  # (N, L, H, hd/2)
            if g is None:
                dst.zero_()
                continue
            if not complex_viewable(g):  # e.g. SDPA backwards on CUDA can return channel-strided gradients
                g = g.contiguous()
            src = torch.view_as_complex(g.transpose(1, 2).unflatten(-1, (-1, 2)))  # (N, L, H, hd/2), strided
            torch.mul(src, cis[:, 0].conj(), out=dst)  # inverse rotation
        if gv is None:
            buf[:, :, 2].zero_()
        else:
            buf[:, :, 2].copy_(gv.transpose(1, 2))
        return buf.view(n, l, -1), None, None, None


def complex_viewable(t: Tensor) -> bool:
    """Whether ``view_as_complex`` accepts ``t.unflatten(-1, (-1, 2))``: channel pairs adjacent in memory."""
    return t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in t.stride()[:-1])


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated) and v, each (N, H, L, hd), from a float32/64 (N, L, 3*H*hd) qkv projection."""
    return _QKVRope.apply(qkv, cos, sin, heads)


class _LinearChunks(torch.autograd.Function):
    """``F.linear(c, w, b).chunk(k, -1)`` whose backward needs no concatenation of the k gradients.

    Forward is one GEMM. Backward: the weight gradient of chunk i is one GEMM written straight into
    rows i of the weight-gradient buffer, and the input gradient accumulates the k chunk products
    in place (GEMMs with beta = 1), so the (M, k*D) gradient is never materialised. Used for the
    per-token adaLN projections of the DiT-DH head, where that tensor is the largest in the block.
    """

    @staticmethod
    def forward(ctx, c: Tensor, w: Tensor, b: Tensor, k: int):
        out = cpu_gemm.linear(c, w, b)  # (..., k*D)
        ctx.save_for_backward(c, w)
        ctx.k = k
        return out.chunk(k, dim=-1)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        c, w = ctx.saved_tensors
        d = w.shape[0] // ctx.k
        c2 = c.reshape(-1, c.shape[-1])  # (M, Din)
        gw = torch.zeros_like(w) if any(g is None for g in grads) else torch.empty_like(w)  # (k*D, Din)
        gb = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        gc = None
        for i, g in enumerate(grads):
            if g is None:
                continue
            g2 = g.reshape(-1, d).to(c.dtype)  # (M, D)
            cpu_gemm.mm(g2.t(), c2, out=gw[i * d:(i + 1) * d])
            torch.sum(g2, 0, out=gb[i * d:(i + 1) * d])
            wi = w[i * d:(i + 1) * d].to(c.dtype)  # (D, Din)
            if cpu_gemm.eligible(g2):  # oneDNN has no beta = 1 here: its product is added
                p = cpu_gemm.mm(g2, wi)
                gc = p if gc is None else gc.add_(p)
            else:
                gc = torch.mm(g2, wi) if gc is None else gc.addmm_(g2, wi)
        if gc is None:
            gc = torch.zeros_like(c2)
        return gc.view(c.shape), gw, gb, None


def linear_chunks(c: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, ...]:
    """``F.linear(c, weight, bias).chunk(k, -1)`` with a concatenation-free backward (float32)."""
    return _LinearChunks.apply(c, weight, bias, k)
