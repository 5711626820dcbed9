"""The N²-cost final computations (precision/recall, density/coverage, CMMD) on a device vs the CPU.

    python bench/bench_knn_device.py --device cuda --features 10000 50000 --cpu-features 4000
    python bench/bench_knn_device.py --device cpu --features 1000          # a smoke run of this script

Random Gaussian features of the real sizes (Inception pool3: 2048-d; CLIP ViT-L/14@336: 768-d),
N per side, through the metrics' own ``compute()`` (float64 distances/kernels in blocks, on the
metric's device). Prints the wall time of each; the CPU is timed at ``--cpu-features`` (its cost
grows with N², so the ratio is given at that size, and the CPU time at the largest N is an
extrapolation, marked so). At equal N the device values are checked against the CPU's.
"""

from __future__ import annotations

import argparse
import time

import torch

from raebench.metrics.base import METRICS
from raebench.metrics.kernel import CMMD
from raebench.metrics.manifold import DensityCoverage, PrecisionRecall

CASES = (("precision", PrecisionRecall, 2048), ("density", DensityCoverage, 2048), ("cmmd", CMMD, 768))


def run(name: str, cls, d: int, n: int, device: str) -> tuple[float, dict[str, float]]:
    g = torch.Generator().manual_seed(n)
    m = cls(METRICS.get(name), device=device)
    m.ref = [torch.randn(n, d, generator=g)]
    m.cand = [torch.randn(n, d, generator=g) + 0.02]  # a slightly shifted copy of the distribution
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = m.compute()  # .item() inside: the device work is finished when this returns
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--features", type=int, nargs="+", default=[10000, 50000], help="N per side on --device")
    ap.add_argument("--cpu-features", type=int, default=4000, help="N per side for the CPU timing (0: none)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    for name, cls, d in CASES:
        cpu_t = cpu_out = None
        if args.cpu_features:
            cpu_t, cpu_out = run(name, cls, d, args.cpu_features, "cpu")
            print(f"{name:9s} d={d:4d} N={args.cpu_features:6d} cpu    {cpu_t:8.2f} s  {cpu_out}")
        run(name, cls, d, 512, args.device)  # warm-up (kernels, allocator)
        for n in args.features:
            t, out = run(name, cls, d, n, args.device)
            line = f"{name:9s} d={d:4d} N={n:6d} {args.device:6s} {t:8.2f} s  {out}"
            if cpu_t is not None and n == args.cpu_features:
                worst = max(abs(out[k] - cpu_out[k]) for k in out)
                line += f"  vs cpu: {cpu_t / t:.1f}x, largest difference {worst:.2e}"
            elif cpu_t is not None:
                line += f"  (cpu extrapolated x(N/{args.cpu_features})^2: {cpu_t * (n / args.cpu_features) ** 2:.0f} s)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
