"""Data-loading throughput: decode + ADM center crop, images/s for 0, 1, 2, ... worker processes.

    python bench/bench_data.py [--n 200] [--resolution 256] [--batch-size 32]

Uses the embedded default photographs (repeated to --n files). A GPU run of `raebench eval`
starves only if this number is below the tokenizer's images/s (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from raebench.data import resolve_data
from raebench.folders import ImageList
from raebench.loaders import ImageDataset, make_loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    base = resolve_data().images
    paths = [base.paths[i % len(base.paths)] for i in range(args.n)]
    imgs = ImageList(base.root, paths, [-1] * len(paths), [])
    ds = ImageDataset(imgs, args.resolution)
    print(f"{args.n} images (embedded photos, mean {sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3:.0f} KB), "
          f"ADM crop to {args.resolution}, batch {args.batch_size}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    base_rate = None
    for workers in sorted({0, 1, 2, min(8, os.cpu_count() or 1)}):
        loader = make_loader(ds, args.batch_size, workers)
        t0 = time.perf_counter()
        n = sum(b["image"].shape[0] for b in loader)
        rate = n / (time.perf_counter() - t0)
        base_rate = base_rate or rate
        print(f"workers={workers}: {rate:7.1f} images/s  ({rate / base_rate:.2f}x vs 0 workers)")


if __name__ == "__main__":
    main()
