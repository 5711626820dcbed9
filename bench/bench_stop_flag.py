"""Cost of the stage-2 trainer's per-step stop-flag agreement (:meth:`raebench.preempt.StopOnSignal.agree`).

    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/bench_stop_flag.py [--calls 2000]

Each rank times ``agree()`` (one all-reduce of a 2-element tensor) in blocks of ``--calls``, after
a warm-up, and rank 0 prints the median microseconds per call beside the time of one tiny-preset
DiT-DH training step on the same process (the smallest step raebench trains; a DiT-DH-XL step is
~1000x longer). Stage 1 adds no collective: its flag rides in the all-reduce of the step's losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from raebench.preempt import StopOnSignal

    with StopOnSignal() as stop:
        for _ in range(200):
            stop.agree("cpu")
        per_call = []
        for _ in range(args.blocks):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.calls):
                stop.agree("cpu")
            per_call.append((time.perf_counter() - t) / args.calls)
    step = _tiny_step_seconds()
    if dist.get_rank() == 0:
        us = statistics.median(per_call) * 1e6
        print(f"agree(): {us:.1f} us per call (median of {args.blocks} x {args.calls}, gloo, {dist.get_world_size()} ranks); "
              f"one tiny-preset training step: {step * 1e3:.2f} ms (the flag costs {us / (step * 1e6) * 100:.2f}% of it)")
    dist.destroy_process_group()


def _tiny_step_seconds(n: int = 20) -> float:
    """Median time of one optimizer step of the tiny stage-2 preset (batch 64 split over the ranks), no DDP."""
    from raebench.stage2.train import build_for_training, make_optimizer, preset, train_step
    from raebench.stage2.transport import Transport

    cfg = preset("tiny", num_classes=4, shift_base=16)
    torch.manual_seed(0)
    model = build_for_training(cfg, (4, 2, 2)).eval()
    import copy

    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, cfg)
    transport = Transport(cfg.time_dist, cfg.time_mu, cfg.time_sigma, 1.0)
    b = cfg.global_batch // dist.get_world_size()
    x, y = torch.randn(b, 4, 2, 2), torch.randint(4, (b,))
    autocast = torch.autocast("cpu", enabled=False)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        train_step(model, model, ema, opt, transport, x, y, cfg, autocast)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


if __name__ == "__main__":
    main()
