"""One DiT-DH training step: raebench vs the official RAE implementation, same config, same weights.

    python bench/bench_stage2_step.py [--official-src /tmp/rae-official] [--steps 15] [--threads 1] [--compile]
    python bench/bench_stage2_step.py --preset xl --device cuda --precision bf16   # on a GPU

The official code is read at bench time only, from a checkout of the official RAE repository (or a
bare git mirror of it): ``src/stage2/models/{DDT,lightningDiT,model_utils}.py`` (needs einops, timm,
transformers), ``src/stage2/transport/*.py`` (needs torchdiffeq) and ``update_ema`` from
``src/utils/train_utils.py``. They are copied into a temporary package, never into raebench.

Both models get the same weights (a strict load of our state dict, which also checks key
compatibility). The script first checks that they compute the same function (velocity, loss and
gradients), then times, interleaved, and reports median CPU and wall time per step for:

1. **model step**: the same loss code (raebench's transport), ``clip_grad_norm_`` and fused AdamW
   around each model: the networks alone.
2. **training step**: each implementation's own step as its trainer runs it. Official (``src/train.py``):
   ``transport.training_losses`` -> backward -> ``clip_grad_norm_`` -> fused AdamW -> ``update_ema``.
   raebench: :func:`raebench.stage2.train.train_step` (loss, backward, clip folded into the fused
   AdamW kernel, ``_foreach_lerp_`` EMA). Latents are given (no encoder) on both sides.

The ratio official / raebench > 1 means raebench is faster. GPU runs also print model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gc
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from raebench.distributed import no_buffer_sync
from raebench.stage2.models import DiTDH, count_params
from raebench.stage2.train import make_optimizer, train_step
from raebench.stage2.transport import Transport

SMALL = dict(input_size=8, in_channels=96, hidden_size=[192, 384], depth=[4, 2], num_heads=[4, 4])
XL = dict(input_size=16, in_channels=768, hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16])
MODEL_FILES = ("DDT.py", "lightningDiT.py", "model_utils.py")
TRANSPORT_FILES = ("__init__.py", "integrators.py", "path.py", "transport.py", "utils.py")


def _read(root: Path, rel: str) -> str:
    """A file of the official repository from a checkout, a folder of loose files, or a bare mirror."""
    for cand in (root / rel, root / Path(rel).name):
        if cand.is_file():
            return cand.read_text()
    return subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{rel}"],
                          check=True, capture_output=True, text=True).stdout


def load_official(src: str) -> types.SimpleNamespace:
    """The official DiTwDDTHead, create_transport and update_ema, imported from a temporary package."""
    root = Path(src)
    if not root.exists():
        sys.exit(f"official RAE sources not found at {src}; clone the official RAE repository there "
                 "or pass --official-src / set RAE_OFFICIAL_SRC")
    pkg = Path(tempfile.mkdtemp()) / "rae_official_stage2"
    (pkg / "transport").mkdir(parents=True)
    for f in MODEL_FILES:
        (pkg / f).write_text(_read(root, f"src/stage2/models/{f}"))
    for f in TRANSPORT_FILES:
        (pkg / "transport" / f).write_text(_read(root, f"src/stage2/transport/{f}"))
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    ns = types.SimpleNamespace(DiTwDDTHead=importlib.import_module("rae_official_stage2.DDT").DiTwDDTHead)
    try:
        ns.create_transport = importlib.import_module("rae_official_stage2.transport").create_transport
    except ImportError as e:  # torchdiffeq missing: the training-step comparison is skipped
        print(f"official transport not importable ({e}); training-step comparison skipped")
        ns.create_transport = None
    # update_ema alone: train_utils.py imports omegaconf/torchvision for other functions
    tree = ast.parse(_read(root, "src/utils/train_utils.py"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "update_ema")
    scope = {"OrderedDict": collections.OrderedDict, "torch": torch}
    exec(compile(ast.Module([fn], type_ignores=[]), "official_train_utils", "exec"), scope)
    ns.update_ema = torch.no_grad()(scope["update_ema"])
    return ns


def model_step(fwd, model, opt, transport, x, y, autocast):
    """The shared harness: raebench's loss, clip_grad_norm_, the optimizer (networks compared alone)."""
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = transport.loss(fwd, x, y).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())
    return step


def official_train_step(fwd, model, ema, opt, official, x, y, autocast):
    """The step of the official src/train.py (grad_accum 1, no scaler), with its own transport and EMA."""
    transport = official.create_transport("Linear", "velocity", None, None, None, "logit-normal_0_1", 1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = transport.training_losses(fwd, x, dict(y=y))["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        official.update_ema(ema, model, decay=0.9995)
        return loss.item()
    return step


def raebench_train_step(fwd, model, ema, opt, x, y, autocast):
    """raebench's trainer step (raebench.stage2.train.train_step) with the same settings."""
    cfg = types.SimpleNamespace(grad_accum=1, clip_grad=1.0, ema_decay=0.9995)
    transport = Transport("logit-normal", 0.0, 1.0, shift=1.0)

    def step():
        return train_step(fwd, model, ema, opt, transport, x, y, cfg, autocast)
    return step


def timed(steps: dict, n: int, cuda: bool) -> tuple[dict, dict]:
    """Median wall and CPU seconds per step; contenders interleaved so load changes hit both alike."""
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}  # process CPU time: robust to other jobs on a shared machine
    for _ in range(n):
        for name, fn in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t, c0 = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def report(title: str, wall: dict, cpu: dict, n: int) -> None:
    print(f"-- {title}")
    for k in wall:
        print(f"   {k:9s} {wall[k] * 1000:8.1f} ms/step wall, {cpu[k] * 1000:8.1f} ms/step CPU (median of {n})")
    for k in wall:
        if k != "raebench":
            print(f"   speed-up {k}/raebench: {wall[k] / wall['raebench']:.2f}x wall, "
                  f"{cpu[k] / cpu['raebench']:.2f}x CPU time")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-src", default=os.environ.get("RAE_OFFICIAL_SRC", "/tmp/rae-official"),
                    help="official RAE checkout, folder with its files, or bare git mirror; 'none': time raebench alone")
    ap.add_argument("--preset", choices=["small", "xl"], default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="1 is the most stable on a shared CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (the official --compile flag)")
    ap.add_argument("--profile", action="store_true", help="print each training step's top operators (torch.profiler)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    params = dict(SMALL if args.preset == "small" else XL, num_classes=1000)

    official = None if args.official_src == "none" else load_official(args.official_src)
    torch.manual_seed(0)
    ours = DiTDH(**params).to(dev)
    for p in ours.parameters():  # leave adaLN-Zero so every layer does real work in the backward
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    models = {"raebench": ours}
    if official is not None:
        theirs = official.DiTwDDTHead(**params).to(dev)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        models["official"] = theirs
    for m in models.values():  # both trainers train every tensor, the sin-cos positions and the time embedding's
        m.requires_grad_(True)  # frequencies included (the official src/train.py: model.requires_grad_(True))

    c, s = params["in_channels"], params["input_size"]
    x = torch.randn(args.batch, c, s, s, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    opt_cfg = types.SimpleNamespace(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    # 1. the same function: velocity, then loss and every gradient after one step from the same RNG
    with torch.no_grad(), autocast:
        t = torch.rand(args.batch, device=dev)
        v = {k: m.eval()(x, t, y).float() for k, m in models.items()}
    if official is not None:
        print(f"velocity max |raebench - official| = {(v['raebench'] - v['official']).abs().max().item():.2e}")
    transport = Transport(shift=1.0)
    fwds = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    steps, losses, grads = {}, {}, {}
    for k, m in models.items():
        m.train()
        opt = make_optimizer(m, opt_cfg)
        steps[k] = model_step(fwds[k], m, opt, transport, x, y, autocast)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        losses[k] = steps[k]()
        grads[k] = [p.grad.float() for p in m.parameters() if p.grad is not None]
        print(f"{k}: first step (incl. compilation) {time.perf_counter() - t0:.1f} s")
    if official is not None:
        worst = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12)
                    for a, b in zip(grads["raebench"], grads["official"]))
        print(f"first-step loss  raebench {losses['raebench']:.6f}  official {losses['official']:.6f}; "
              f"largest gradient difference {worst:.1e} of the tensor's max")
    print(f"config {args.preset} {params}  batch {args.batch}  {args.precision}  compile {args.compile}  device {dev}  "
          f"threads {args.threads}  params {count_params(ours) / 1e6:.1f}M")
    if dev.type == "cpu":  # the official model runs PyTorch's own (MKL) GEMMs; see raebench/stage2/cpu_gemm.py
        from raebench.stage2 import cpu_gemm

        print(f"raebench's float32 CPU GEMMs: {'oneDNN' if cpu_gemm.use_onednn() else 'PyTorch (MKL)'} "
              f"(RAEBENCH_CPU_GEMM={os.environ.get('RAEBENCH_CPU_GEMM', 'auto')}; 'torch' compares like with like)")

    cuda = dev.type == "cuda"
    wall, cpu = timed(steps, args.steps, cuda)
    report("model step (same loss code, clip_grad_norm_, fused AdamW around each network)", wall, cpu, args.steps)
    med = wall

    if official is None or official.create_transport is not None:
        # the model-step optimizers and gradients go first: DiT-DH-XL's AdamW states are 6.7 GB a
        # model, and keeping them beside the trainers' (and the DDP twin's) ran an 80 GB H100 out of
        # memory at batch 32 (2026-11-26)
        steps.clear()
        grads.clear()
        opt = None
        for m in models.values():
            m.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        emas = {k: _ema_copy(m) for k, m in models.items()}
        trainer = {"raebench": raebench_train_step(fwds["raebench"], ours, emas["raebench"], make_optimizer(ours, opt_cfg),
                                                   x, y, autocast)}
        if official is not None:
            trainer["official"] = official_train_step(fwds["official"], theirs, emas["official"],
                                                      make_optimizer(theirs, opt_cfg), official, x, y, autocast)
            # src/train.py wraps the model in DDP unconditionally (it runs under torchrun only), so a
            # one-process run of the official trainer pays DDP's gradient buckets; raebench wraps
            # only when world > 1. A copy of the model, so that DDP's hooks stay off the others.
            twin = _ema_copy(theirs).requires_grad_(True).train()
            ddp = _ddp_world1(twin, dev)
            trainer["official+DDP"] = official_train_step(torch.compile(ddp) if args.compile else ddp, twin,
                                                          _ema_copy(twin), make_optimizer(twin, opt_cfg),
                                                          official, x, y, autocast)
        for fn in trainer.values():
            fn()
        wall, cpu = timed(trainer, args.steps, cuda)
        report("training step (each trainer's own step: loss, backward, clip, AdamW, EMA; 'official+DDP': as "
               "src/train.py runs it in one process, under DDP)", wall, cpu, args.steps)
        if args.profile:
            for k, fn in trainer.items():
                profile(k, fn, cuda)
    if cuda:
        flops = train_flops(ours, args.batch, s * s)
        name = torch.cuda.get_device_name(dev)
        peak = {"bf16": 989e12, "fp32": 67e12}[args.precision] if ("H100" in name or "H200" in name) else None  # dense
        mfu = f"MFU {flops / med['raebench'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (datasheet)" if peak else "MFU: peak unknown"
        measured = matmul_rate(dev, torch.bfloat16 if args.precision == "bf16" else torch.float32)
        print(f"{name}: {flops / 1e12:.2f} TFLOP per step, {flops / med['raebench'] / 1e12:.0f} TFLOP/s, {mfu}, "
              f"{flops / med['raebench'] / measured:.1%} of the {measured / 1e12:.0f} TFLOP/s an 8192^3 matmul "
              f"reaches here; peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB (both models); "
              f"{args.batch / med['raebench']:.0f} images/s (model step)")
        with torch.no_grad(), autocast:  # sampling: one velocity evaluation per step and image
            fwd = {k: m.eval() for k, m in models.items()}
            wall, _ = timed({k: (lambda m=m: m(x, t, y)) for k, m in fwd.items()}, args.steps, cuda)
        for k in wall:
            print(f"   sampling forward {k:9s} {wall[k] * 1000:7.1f} ms at batch {args.batch}: "
                  f"{args.batch / wall[k] / 50:.1f} images/s for 50 Euler steps without guidance")


def profile(name: str, step, cuda: bool, rows: int = 15) -> None:
    """The operators that take a training step's device (or CPU) time, self time, one step."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=acts) as p:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"-- {name}: top operators by {key}")
    print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n^3 matmul on random data (mean of 10 after 3 warm-ups): the attainable peak."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t)


def train_flops(model: DiTDH, batch: int, tokens: int) -> float:
    """Matmul + attention FLOPs of one training step (forward + backward = 3 x forward).

    The backbone's adaLN projections and the time embedding act once per sample, every other
    weight once per token; attention adds 4 L^2 d per layer forward (Q K^T and A V).
    """
    per_sample = 0
    for n, p in model.named_parameters():
        if n.startswith("y_embedder."):
            continue  # a table lookup
        if n.startswith("t_embedder.") or (n.startswith("blocks.") and ".adaLN_modulation." in n
                                           and int(n.split(".")[1]) < model.num_encoder_blocks):
            per_sample += p.numel()
    per_token = count_params(model) - per_sample - model.y_embedder.embedding_table.weight.numel()
    attn = sum(4 * tokens * tokens * b.attn.heads * b.attn.head_dim for b in model.blocks)
    return 6.0 * batch * (tokens * per_token + per_sample) + 3.0 * batch * attn


def _ddp_world1(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in DDP as the official trainer wraps it, in a one-process group (gloo, or nccl on CUDA)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="bench-ddp-")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)
        import atexit

        # torch warns "destroy_process_group() was not called" at exit otherwise (bench/logs/h100-*-call{1,2,4}.log)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index or 0] if dev.type == "cuda" else None,
        find_unused_parameters=False, **no_buffer_sync())


def _ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


if __name__ == "__main__":
    main()
