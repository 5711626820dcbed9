"""Float32 GEMMs of the stage-2 networks on the CPU, through oneDNN where that is measurably faster.

Why: PyTorch runs float32 ``mm``/``addmm`` on the CPU with MKL, which on AMD processors takes its
AVX2 code path. On the AMD EPYC (Zen 4, AVX-512) of the CI machine that is ~106 GFLOP/s per core,
while oneDNN's AVX-512 kernels (``torch.ops.mkldnn._linear_pointwise``, the op Inductor uses for
linear layers) reach ~235 GFLOP/s on the same shapes, forward and both backward GEMMs (measured
2026-11-27, one thread, 1024 tokens, widths 192-2304). On an Intel machine an earlier session
measured the two libraries within 0.93-1.06x of each other. So the choice is made once per process
by timing both on one layer-sized GEMM (``RAEBENCH_CPU_GEMM=auto``, the default); ``onednn`` or
``torch`` force one. The results differ from MKL's by float32 rounding only (same products, another
summation order: relative differences ~1e-6).

Only eager float32 on the CPU outside autocast takes this path; GPUs, float64 (gradient checks),
autocast and ``torch.compile`` (which traces ``F.linear``) keep PyTorch's own ops.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: ``auto``: time both libraries once and take oneDNN if it is >= 15 % faster; ``onednn``; ``torch``
CHOICES = ("auto", "onednn", "torch")


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T + b`` for 2-D float32 CPU tensors by oneDNN (transposed views are read in place)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _median_ms(f, n: int = 7) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


@functools.lru_cache(maxsize=None)
def use_onednn() -> bool:
    """Whether this process runs its float32 CPU GEMMs through oneDNN (decided once; see module doc)."""
    choice = os.environ.get("RAEBENCH_CPU_GEMM", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        from raebench.errors import RaebenchError

        raise RaebenchError(f"RAEBENCH_CPU_GEMM={choice!r} is not one of {', '.join(CHOICES)}; unset it for 'auto'.")
    if choice == "torch":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("this torch build has no oneDNN")
        g = torch.Generator().manual_seed(0)  # its own: the global RNG (label dropout, noise) is not touched
        x, w, b = torch.randn(256, 384, generator=g), torch.randn(1152, 384, generator=g), torch.randn(1152, generator=g)
        if not torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4):
            raise RuntimeError("oneDNN's linear disagrees with torch's")
    except Exception as e:  # noqa: BLE001 - any failure means: keep torch's own GEMMs
        if choice == "onednn":
            log.warning("RAEBENCH_CPU_GEMM=onednn: oneDNN is not usable here (%s); using torch's GEMMs", e)
        return False
    if choice == "onednn":
        return True
    ms_torch = _median_ms(lambda: F.linear(x, w, b))
    ms_dnn = _median_ms(lambda: _onednn_linear(x, w, b))
    log.debug("float32 CPU GEMM, 256x384 @ 384x1152: torch %.3f ms, oneDNN %.3f ms", ms_torch, ms_dnn)
    return ms_dnn * 1.15 <= ms_torch


def eligible(x: Tensor) -> bool:
    """Eager float32 on the CPU, outside autocast and ``torch.compile``, with oneDNN chosen."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not _cpu_autocast()
            and not torch.compiler.is_compiling() and use_onednn())


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


class _Linear(torch.autograd.Function):
    """``F.linear`` whose forward and both backward GEMMs run in oneDNN (float32, CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(x2, w)
        ctx.has_bias, ctx.shape = b is not None, x.shape
        return _onednn_linear(x2, w, b).view(*x.shape[:-1], w.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, w = ctx.saved_tensors
        g2 = g.reshape(-1, w.shape[0])  # (M, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(g2, w.t(), None).view(ctx.shape)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(g2.t(), x2.t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``, by oneDNN where :func:`eligible`."""
    if eligible(x) and x.numel() and w.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
        return _Linear.apply(x, w, b)
    return F.linear(x, w, b)


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.mm(a, b)`` (2-D), by oneDNN where :func:`eligible` (``out`` is then copied into)."""
    if eligible(a) and a.numel() and b.numel() and b.dtype == torch.float32:  # oneDNN refuses empty products
        r = _onednn_linear(a, b.t(), None)
        return r if out is None else out.copy_(r)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose float32 CPU GEMMs may run in oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
