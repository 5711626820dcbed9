"""The stage-2 fused paths on an accelerator: the checks of tests/test_stage2_fused.py, on a device CI lacks.

    python bench/check_stage2_device.py --device cuda       # exits 1 if a check fails

The test suite runs the hand-fused autograd functions (raebench.stage2.fused) on the CPU only. Their
kernels are the same torch ops on CUDA, but reductions, atomics and bf16 autocast differ there, so
this script repeats the checks on the device:

1. float64 ``gradcheck`` of each fused function (RMSNorm+modulation with and without the residual
   pass-through, gated residual, SwiGLU, q/k RoPE, chunked linear);
2. a whole DiT-DH and LightningDiT, fused vs plain-autograd paths: velocity and every gradient in
   float64 (1e-9) and float32 (relative 1e-4 of each tensor's largest value);
3. a bf16-autocast training step: finite gradients, velocity within 5 % of float32, and the fused
   and plain paths within bf16 rounding of each other.
"""

from __future__ import annotations

import argparse
import sys

import torch

from raebench.stage2 import fused
from raebench.stage2.models import DiTDH, LightningDiT, Rope2D

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILED.append(name)


def gradchecks(dev: torch.device) -> None:
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float64).requires_grad_(True)

    x, w, shift, scale = r(2, 5, 8), r(8), r(2, 1, 8), r(2, 1, 8)
    check("gradcheck rms_modulate", torch.autograd.gradcheck(fused.rms_modulate, (x, w, shift, scale, 1e-6)))
    check("gradcheck rms_modulate (per token)",
          torch.autograd.gradcheck(fused.rms_modulate, (x, w, r(2, 5, 8), r(2, 5, 8), 1e-6)))
    check("gradcheck rms_modulate (no shift)", torch.autograd.gradcheck(fused.rms_modulate, (x, w, None, scale, 1e-6)))
    res = r(2, 5, 8)
    check("gradcheck rms_modulate_residual",
          torch.autograd.gradcheck(lambda *a: fused.rms_modulate_residual(*a, 1e-6), (x, w, shift, scale)))
    check("gradcheck gated_residual", torch.autograd.gradcheck(fused.gated_residual, (x, r(2, 1, 8), res)))
    check("gradcheck swiglu", torch.autograd.gradcheck(fused.swiglu, (r(2, 3, 10),)))
    check("gradcheck linear_chunks",
          torch.autograd.gradcheck(lambda *a: fused.linear_chunks(*a, 3), (r(2, 3, 4), r(12, 4), r(12))))
    rope = Rope2D(8, 3).double().to(dev)
    check("gradcheck qkv_rope", torch.autograd.gradcheck(
        lambda t: fused.qkv_rope(t, rope.freqs_cos, rope.freqs_sin, 2), (r(2, 9, 48),)))


def _models():
    torch.manual_seed(0)
    yield "ditdh", DiTDH(input_size=8, in_channels=32, hidden_size=(128, 256), depth=(3, 2), num_heads=(4, 4),
                         num_classes=10)
    yield "ditdh-wo-shift", DiTDH(input_size=8, in_channels=32, hidden_size=(128, 256), depth=(2, 2),
                                  num_heads=(4, 4), num_classes=10, wo_shift=True)
    yield "lightningdit", LightningDiT(input_size=8, in_channels=32, hidden_size=128, depth=3, num_heads=4,
                                       num_classes=10)


def _run(model, x, t, y, w, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        out = model(x, t, y)
    (out.float() * w).sum().backward()
    return out.detach().float(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None]


def _worst(a: list, b: list) -> float:
    return max(((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b))


def model_checks(dev: torch.device) -> None:
    for name, model in _models():
        for p in model.parameters():  # away from adaLN-Zero so that every branch carries gradient
            torch.nn.init.normal_(p, std=0.05)
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            m = model.to(dev, dtype).eval()
            x, t = torch.randn(4, 32, 8, 8, device=dev, dtype=dtype), torch.rand(4, device=dev, dtype=dtype)
            y, w = torch.tensor([0, 3, 9, 1], device=dev), torch.randn(4, 32, 8, 8, device=dev)
            off = torch.autocast(dev.type, enabled=False)
            out, grads = _run(m, x, t, y, w, off)
            with fused.disabled():
                out_ref, grads_ref = _run(m, x, t, y, w, off)
            err = max(_worst([out], [out_ref]), _worst(grads, grads_ref))
            check(f"{name} {str(dtype)[6:]} fused vs plain", err < tol and len(grads) > 10, f"(worst relative {err:.1e})")
        m = model.to(dev, torch.float32)  # eval: training mode drops labels at random
        x, t = torch.randn(4, 32, 8, 8, device=dev), torch.rand(4, device=dev)
        bf16 = torch.autocast(dev.type, dtype=torch.bfloat16)
        ref, _ = _run(m, x, t, y, w, torch.autocast(dev.type, enabled=False))
        out, grads = _run(m, x, t, y, w, bf16)
        with fused.disabled():
            out_plain, grads_plain = _run(m, x, t, y, w, bf16)
        finite = all(torch.isfinite(g_).all() for g_ in grads)
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        check(f"{name} bf16 autocast", finite and rel < 0.05, f"(velocity vs float32: {rel:.1e} of max)")
        err = _worst(grads, grads_plain)
        check(f"{name} bf16 fused vs plain", err < 0.05, f"(worst gradient relative {err:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    dev = torch.device(ap.parse_args().device)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}")
    gradchecks(dev)
    model_checks(dev)
    print(f"{len(FAILED)} failed" + (f": {', '.join(FAILED)}" if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
