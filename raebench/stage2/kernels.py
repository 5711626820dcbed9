"""Inductor-generated CPU kernels for the element-wise chains of an adaLN-Zero block.

Why generated: the eager functions of :mod:`raebench.stage2.fused` already cut the passes over
memory to one torch op each, but on CPU each op still reads and writes whole activations that no
longer fit in cache (the RMSNorm + modulation backward alone is ~19 activation-sized reads and
writes). Here the same chains are written as plain torch code and compiled, one small function
at a time, by ``torch.compile`` (Inductor's C++ backend), which emits one loop nest per chain:
the RMSNorm + modulation backward on 16x64x384 drops from 3.3 to 0.9 ms. They also fold in the
biases of the linear layers they follow (qkv, w12), so those GEMMs run without the copy of the
bias into their output, and they save the input instead of intermediates (the normalised
activations and ``silu(a)`` are recomputed in the backward, which costs less than reading them
back). Measured on the small bench config, the training step is ~7 % faster than with the eager
fused functions (bench/README.md).

Only the networks' eager CPU float32/float64 path uses them: not under autocast (the linear
layers then run in bfloat16), not inside ``torch.compile`` of the whole model (Inductor then
fuses the plain ops itself), not on CUDA (not measured there; the eager fused functions run).
``RAEBENCH_KERNELS=eager`` turns them off. If Inductor cannot build a kernel (no C++ compiler),
the same functions run eagerly after one warning: the values are the same, only slower.

Every kernel is checked against plain autograd in tests/test_stage2_kernels.py.
"""

from __future__ import annotations

import logging
import os
import threading
import types
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

#: "auto": generated kernels on CPU; "eager": never (the eager fused functions run)
MODE = os.environ.get("RAEBENCH_KERNELS", "auto").strip().lower() or "auto"
if MODE not in ("auto", "eager"):
    raise ValueError(f"RAEBENCH_KERNELS must be 'auto' or 'eager', not {MODE!r}")

_broken: str | None = None  # why Inductor could not build a kernel here (then everything runs eagerly)
_lock = threading.Lock()


def set_mode(mode: str) -> str:
    """Set the kernel mode ("auto" or "eager") and return the previous one."""
    global MODE
    if mode not in ("auto", "eager"):
        raise ValueError(f"kernel mode must be 'auto' or 'eager', not {mode!r}")
    old, MODE = MODE, mode
    return old


def active(*tensors: Tensor | None) -> bool:
    """Whether the generated kernels serve these tensors: CPU, one float32/float64 dtype, eager, no autocast."""
    if MODE != "auto" or _broken is not None or torch.compiler.is_compiling():
        return False
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype for t in ts):
        return False
    return not torch.is_autocast_enabled("cpu")


def _kernel(fn: Callable) -> Callable:
    """``fn`` compiled by Inductor on first use; ``fn`` itself (eager) if the compiler is unusable.

    Static shapes (``dynamic=False``): symbolic sizes measured 2 % slower on the whole training
    step. Dynamo keeps at most 8 compilations per code object, so each feature width (the last
    dimension of every tensor argument) and dtype gets its own copy of the code: a backbone and
    a head of other widths, each at a few batch sizes (training, CFG sampling, a last partial
    batch), never exhaust it.
    """
    copies: dict[tuple, Callable] = {}

    def compiled_for(args: tuple) -> Callable:
        key = tuple((a.shape[-1] if a.dim() else 0, a.dtype) if isinstance(a, Tensor) else type(a) for a in args)
        if key not in copies:
            # a new code object: Dynamo keys its cache (and recompile limit) on the code object
            code = fn.__code__.replace()
            twin = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            copies[key] = torch.compile(twin, dynamic=False, fullgraph=True)
        return copies[key]

    def run(*args):
        global _broken
        if _broken is None:
            try:
                return compiled_for(args)(*args)
            except Exception as e:  # noqa: BLE001 - a missing/broken C++ toolchain raises many types
                with _lock:
                    if _broken is None:
                        _broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        warnings.warn(
                            "raebench could not build its generated CPU kernels with torch.compile "
                            f"({_broken}); the DiT runs its eager fused functions instead (same values, "
                            "slower). Install a C++ compiler, or set RAEBENCH_KERNELS=eager to skip the attempt.",
                            RuntimeWarning, stacklevel=3)
        return fn(*args)  # the same computation, eagerly: also raises the real error for bad input

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# ----------------------------------------------------------------------------------------------
# RMSNorm + adaLN modulation (the residual stream passes through, as in fused._RMSModulate)
# ----------------------------------------------------------------------------------------------


@_kernel
def _rms_fwd(x: Tensor, w: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # (N, L, 1)
    y = x * r * (w * (1 + scale))  # (N, L, D)
    return (y if shift is None else y + shift), r


@_kernel
def _rms_bwd(g: Tensor, g_res: Tensor | None, x: Tensor, r: Tensor, w: Tensor, scale: Tensor,
             shift_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    n = x * r  # (N, L, D) recomputed: cheaper than reading a saved copy back
    gn = g * n
    grad_shift = None
    if scale.shape[1] != 1:  # per token
        grad_scale = gn * w
        grad_w = (gn * (1 + scale)).sum((0, 1))
    else:  # per sample
        gs = gn.sum(1, keepdim=True)  # (N, 1, D)
        grad_scale = gs * w
        grad_w = (gs * (1 + scale)).sum((0, 1))
        if shift_grad:
            grad_shift = g.sum(1, keepdim=True)
    dn = g * (w * (1 + scale))
    grad_x = (dn - n * (dn * n).mean(-1, keepdim=True)) * r  # rms_norm backward
    return (grad_x if g_res is None else grad_x + g_res), grad_w, grad_scale, grad_shift


class _RMSModulate(torch.autograd.Function):
    """(rms_norm(x) * w * (1 + scale) + shift, x); saves x and 1/rms instead of the normalised x."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, shift: Tensor | None, scale: Tensor, eps: float):
        y, r = _rms_fwd(x, w, shift, scale, eps)
        ctx.save_for_backward(x, r, w, scale)
        ctx.has_shift = shift is not None
        ctx.set_materialize_grads(False)
        return y, x

    @staticmethod
    def backward(ctx, g: Tensor | None, g_res: Tensor | None):
        if g is None:  # only the pass-through x reached the loss
            return g_res, None, None, None, None
        x, r, w, scale = ctx.saved_tensors
        need_shift = ctx.has_shift and ctx.needs_input_grad[2]
        per_token = scale.shape[1] != 1
        grad_x, grad_w, grad_scale, grad_shift = _rms_bwd(g.contiguous(), g_res, x, r, w, scale,
                                                          need_shift and not per_token)
        if need_shift and per_token:
            grad_shift = g
        return grad_x, grad_w, grad_shift, grad_scale, None


def rms_modulate_residual(x: Tensor, weight: Tensor, shift: Tensor | None, scale: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    """As :func:`raebench.stage2.fused.rms_modulate_residual`, with generated kernels."""
    return _RMSModulate.apply(x, weight, shift, scale, eps)


# ----------------------------------------------------------------------------------------------
# Gated residual x + gate * f: the forward is one addcmul already; the backward is one kernel
# ----------------------------------------------------------------------------------------------


@_kernel
def _gated_bwd(g: Tensor, gate: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    grad_f = g * gate
    if gate.shape[1] == 1 and g.shape[1] != 1:  # per sample: reduce over tokens
        return grad_f, (g * f).sum(1, keepdim=True)
    return grad_f, g * f


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
        ctx.save_for_backward(gate, f)
        return torch.addcmul(x, gate, f)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, f = ctx.saved_tensors
        grad_f, grad_gate = _gated_bwd(g, gate, f)
        return g, grad_gate, grad_f


def gated_residual(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    """x + gate * f, with a generated backward."""
    return _GatedResidual.apply(x, gate, f)


# ----------------------------------------------------------------------------------------------
# SwiGLU with the w12 bias folded in
# ----------------------------------------------------------------------------------------------


@_kernel
def _swiglu_fwd(u: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        u = u + bias
    a, b = u.chunk(2, dim=-1)
    return F.silu(a) * b


@_kernel
def _swiglu_bwd(g: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        u = u + bias
    a, b = u.chunk(2, dim=-1)
    s = torch.sigmoid(a)
    grad = torch.cat([g * b * (s * (1 + a * (1 - s))), g * (a * s)], dim=-1)  # silu' = s (1 + a (1 - s))
    return grad


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(u, bias)
        return _swiglu_fwd(u, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        u, bias = ctx.saved_tensors
        grad_u = _swiglu_bwd(g, u, bias)
        # the bias gradient eagerly: Inductor reduces over rows column block by column block,
        # a strided walk that measured 2-3x slower than torch's row-major sum on DRAM-resident data
        return grad_u, (None if bias is None else grad_u.flatten(0, -2).sum(0))


def swiglu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """silu(a) * b for [a, b] = F.linear(x, weight, bias).chunk(2, -1); the bias is added in the kernel."""
    return _SwiGLU.apply(F.linear(x, weight), bias)


# ----------------------------------------------------------------------------------------------
# qkv bias + 2-D RoPE on q and k, written in SDPA's (N, H, L, hd) views of one (N, L, 3, H, hd) buffer
# ----------------------------------------------------------------------------------------------


@_kernel
def _rope_fwd(qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    n, l, _ = qkv.shape
    if bias is not None:
        qkv = qkv + bias
    t = qkv.view(n, l, 3, heads, -1, 2)  # (N, L, 3, H, hd/2, 2): rotation pairs are adjacent channels
    c = cos[:, ::2].view(1, l, 1, 1, -1)  # (1, L, 1, 1, hd/2)
    s = sin[:, ::2].view(1, l, 1, 1, -1)
    x0, x1 = t[:, :, :2, :, :, 0], t[:, :, :2, :, :, 1]  # (N, L, 2, H, hd/2)
    qk = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)  # (N, L, 2, H, hd/2, 2)
    return torch.cat([qk, t[:, :, 2:]], dim=2).view(n, l, 3, heads, -1)  # (N, L, 3, H, hd)


@_kernel
def _rope_bwd(gq: Tensor, gk: Tensor, gv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    n, h, l, hd = gv.shape
    c = cos[:, ::2].view(1, l, 1, -1)  # (1, L, 1, hd/2)
    s = sin[:, ::2].view(1, l, 1, -1)

    def unrotate(g: Tensor) -> Tensor:  # (N, H, L, hd) -> (N, L, H, hd), the transposed rotation
        p = g.transpose(1, 2).unflatten(-1, (-1, 2))  # (N, L, H, hd/2, 2)
        g0, g1 = p[..., 0], p[..., 1]
        return torch.stack([g0 * c + g1 * s, g1 * c - g0 * s], dim=-1).flatten(-2)

    return torch.stack([unrotate(gq), unrotate(gk), gv.transpose(1, 2)], dim=2).view(n, l, -1)  # (N, L, 3*H*hd)


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, heads: int):
        out = _rope_fwd(qkv, bias, cos.to(qkv.dtype), sin.to(qkv.dtype), heads)  # (N, L, 3, H, hd)
        ctx.save_for_backward(cos, sin)
        ctx.with_bias = bias is not None
        return out[:, :, 0].transpose(1, 2), out[:, :, 1].transpose(1, 2), out[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None):
        cos, sin = ctx.saved_tensors
        ref = next(g for g in (gq, gk, gv) if g is not None)
        gq, gk, gv = (torch.zeros_like(ref) if g is None else g for g in (gq, gk, gv))
        grad = _rope_bwd(gq, gk, gv, cos.to(ref.dtype), sin.to(ref.dtype))  # (N, L, 3*H*hd)
        return grad, (grad.flatten(0, 1).sum(0) if ctx.with_bias else None), None, None, None


def qkv_rope_linear(x: Tensor, weight: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor,
                    heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated) and v, each (N, H, L, hd), of ``F.linear(x, weight, bias)``; the bias is added in the kernel."""
    return _QKVRope.apply(F.linear(x, weight), bias, cos, sin, heads)


def describe() -> str:
    """One line for logs: which element-wise path the DiT takes on CPU."""
    if MODE == "eager":
        return "eager fused element-wise functions (RAEBENCH_KERNELS=eager)"
    if _broken is not None:
        return f"eager fused element-wise functions (generated kernels unavailable: {_broken})"
    return "Inductor-generated element-wise kernels on CPU (RAEBENCH_KERNELS=eager to turn off)"
