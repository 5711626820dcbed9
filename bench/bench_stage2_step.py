"""One DiT-DH training step: raebench vs the official RAE implementation, same config, same weights.

    python bench/bench_stage2_step.py [--official-src /tmp/rae-official] [--steps 15] [--threads 1] [--compile]
    python bench/bench_stage2_step.py --preset xl --device cuda --precision bf16   # on a GPU

The official model code is read at bench time only, from a checkout of the official RAE repository
(``src/stage2/models/{DDT,lightningDiT,model_utils}.py``; it needs ``einops``); it is copied into a
temporary package and never into raebench. Both models get the same weights (strict load of our state
dict, which also checks key compatibility), the same inputs, loss and optimizer (AdamW); the script
checks that both produce the same loss, then reports the median step time of each and the ratio
official / ours (> 1 means raebench is faster). GPU runs also print model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raebench.stage2.models import DiTDH, count_params
from raebench.stage2.transport import Transport

SMALL = dict(input_size=8, in_channels=96, hidden_size=[192, 384], depth=[4, 2], num_heads=[4, 4])
XL = dict(input_size=16, in_channels=768, hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16])
FILES = ("DDT.py", "lightningDiT.py", "model_utils.py")


def load_official(src: str):
    """Import the official DiTwDDTHead from a repo checkout, a plain folder, or a bare git mirror."""
    if not Path(src).exists():
        sys.exit(f"official RAE sources not found at {src}; clone the official RAE repository there "
                 "or pass --official-src / set RAE_OFFICIAL_SRC")
    pkg = Path(tempfile.mkdtemp()) / "rae_official_stage2"
    pkg.mkdir()
    root = Path(src)
    for f in FILES:
        for cand in (root / "src/stage2/models" / f, root / f):
            if cand.is_file():
                shutil.copy(cand, pkg / f)
                break
        else:  # a bare mirror: read the file from HEAD
            text = subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:src/stage2/models/{f}"],
                                  check=True, capture_output=True, text=True).stdout
            (pkg / f).write_text(text)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("rae_official_stage2.DDT").DiTwDDTHead


def step_fn(fwd, model, opt, transport, x, y, autocast):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = transport.loss(fwd, x, y).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-src", default=os.environ.get("RAE_OFFICIAL_SRC", "/tmp/rae-official"),
                    help="official RAE checkout, folder with the three model files, or bare git mirror")
    ap.add_argument("--preset", choices=["small", "xl"], default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="1 is the most stable on a shared CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (the official trainer always compiles)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    params = dict(SMALL if args.preset == "small" else XL, num_classes=1000)

    Official = load_official(args.official_src)
    torch.manual_seed(0)
    ours = DiTDH(**params).to(dev)
    for p in ours.parameters():  # leave adaLN-Zero so every layer does real work in the backward
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    theirs = Official(**params).to(dev)
    theirs.load_state_dict(ours.state_dict(), strict=True)

    c, s = params["in_channels"], params["input_size"]
    x = torch.randn(args.batch, c, s, s, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    transport = Transport(shift=1.0)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    fused = dict(fused=True)
    steps = {}
    for name, m in (("raebench", ours), ("official", theirs)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), **fused)
        fwd = torch.compile(m) if args.compile else m
        steps[name] = step_fn(fwd, m, opt, transport, x, y, autocast)

    # same weights, same RNG -> same loss (checks that we benchmark the same computation)
    losses = {}
    for name in steps:
        torch.manual_seed(1)
        t = time.perf_counter()
        losses[name] = steps[name]()
        print(f"{name}: first step (incl. compilation) {time.perf_counter() - t:.1f} s", flush=True)
    print(f"first-step loss  raebench {losses['raebench']:.6f}  official {losses['official']:.6f}")

    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}  # process CPU time: robust to other jobs on a shared machine
    for _ in range(args.steps):  # interleaved so that load changes hit both alike
        for name, fn in steps.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t, c0 = time.perf_counter(), time.process_time()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"config {args.preset} {params}  batch {args.batch}  {args.precision}  compile {args.compile}  device {dev}  "
          f"threads {args.threads}  params {count_params(ours) / 1e6:.1f}M")
    for k in med:
        print(f"{k:9s} {med[k] * 1000:8.1f} ms/step wall, {med_cpu[k] * 1000:8.1f} ms/step CPU (median of {args.steps})")
    print(f"speed-up official/raebench: {med['official'] / med['raebench']:.2f}x wall, "
          f"{med_cpu['official'] / med_cpu['raebench']:.2f}x CPU time")
    if dev.type == "cuda":
        tokens = s * s
        flops = 6 * args.batch * tokens * count_params(ours)  # matmul FLOPs (fwd+bwd), attention excluded
        peak = 989e12 if args.precision == "bf16" else 67e12  # H100 SXM dense
        print(f"MFU (raebench): {flops / med['raebench'] / peak:.1%}")


if __name__ == "__main__":
    main()
