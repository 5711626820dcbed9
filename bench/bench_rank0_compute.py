"""The final metric computation under torchrun: every rank (before) vs rank 0 alone (now).

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/bench_rank0_compute.py --features 4000

After the gather, `eval` and `score` used to merge every rank's metric states and compute the
metrics on every rank; now rank 0 alone does (`raebench.distributed.on_rank0`) and the others wait.
This times the two on the k-NN metrics (precision/recall, density/coverage) over random Inception-
sized features (N per side, d = 2048), interleaved, and prints wall and per-rank CPU time. torchrun
gives each rank one thread unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as td

from raebench import distributed
from raebench.metrics.base import METRICS
from raebench.metrics.manifold import DensityCoverage, PrecisionRecall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=4000, help="features per side (all ranks together)")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    distributed.init("cpu")
    rank, world = distributed.rank_world()
    lo, hi = distributed.shard(args.features, rank, world)
    g = torch.Generator().manual_seed(rank)
    mine = [(PrecisionRecall, METRICS.get("precision")), (DensityCoverage, METRICS.get("density"))]
    states = []
    for cls, spec in mine:  # this rank's shard of both sides, as a metric state
        m = cls(spec)
        m.ref = [torch.randn(hi - lo, args.d, generator=g)]
        m.cand = [torch.randn(hi - lo, args.d, generator=g) + 0.1]
        states.append(m.state())
    gathered: list = [None] * world
    td.all_gather_object(gathered, states)

    def final():
        out = {}
        for i, (cls, spec) in enumerate(mine):
            m = cls(spec)
            for per_rank in gathered:
                m.merge(per_rank[i])
            out.update(m.compute())
        return out

    ways = {"every rank": final, "rank 0 alone": lambda: distributed.on_rank0(final)}
    wall = {k: [] for k in ways}
    cpu = {k: [] for k in ways}
    results = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            td.barrier()
            t, c = time.perf_counter(), time.process_time()
            results[name] = fn()
            td.barrier()  # done when the slowest rank is
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    cpus: list = [None] * world
    td.all_gather_object(cpus, {k: statistics.median(v) for k, v in cpu.items()})
    if rank == 0:
        assert results["every rank"] == results["rank 0 alone"], results
        print(f"{world} ranks, {args.features} features per side, d {args.d}, threads per rank {torch.get_num_threads()}, "
              f"median of {args.repeats}; values equal: {results['rank 0 alone']}")
        for name in ways:
            per_rank = ", ".join(f"{c[name]:.2f}" for c in cpus)
            print(f"   {name:13s} wall {statistics.median(wall[name]):6.2f} s   CPU per rank {per_rank} s")
        b, a = statistics.median(wall["every rank"]), statistics.median(wall["rank 0 alone"])
        print(f"   wall every-rank / rank-0-alone: {b / a:.2f}x; CPU of the other ranks saved: "
              f"{sum(c['every rank'] - c['rank 0 alone'] for c in cpus[1:]):.2f} s")
    distributed.finish()


if __name__ == "__main__":
    main()
