"""``raebench compare``: reuse rows that exist, compute only what is missing, tabulate.

A stored row is reused when tokenizer, dataset, resolution, seed, metric version and the data
fingerprint (the exact image list, see ``ImageList.fingerprint``) all match, so a different
``--limit`` or a changed folder is recomputed, never mixed in silently.

Beside the measured values the table shows what the tokenizers' baseline cards report
(``raebench.baselines``), each in its own ``(reported)`` column with its n, reference and source in
the ``protocol`` column; and, from every measured row stored for these tokenizers, the gap between
open-domain and in-domain values (:func:`raebench.leaderboard.domain_gap`).

Under ``torchrun`` every rank runs ``compare``: rank 0 decides what is missing (so all ranks take
the same branches around the collectives of :func:`raebench.evaluate.evaluate`, even if another run
writes rows meanwhile), each evaluation is sharded across the ranks, and rank 0 alone writes rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from raebench.data import resolve_data
from raebench.evaluate import EvalConfig, evaluate
from raebench.leaderboard import compare_table, domain_gap
from raebench.metrics.base import sharing_networks
from raebench.results import load

#: which reported numbers ``compare`` shows: those for the weights the tokenizer loads, all of them
#: (variants such as a decoder trained without noise too), or none
REPORTED_CHOICES = ("weights", "all", "none")


@dataclass
class CompareResult:
    table: pd.DataFrame  # from compare_table
    computed: list[str]  # tokenizers evaluated now
    gap: pd.DataFrame = field(default_factory=pd.DataFrame)  # from domain_gap, all stored measured rows
    dataset: str = ""
    n_images: int = 0

    def __iter__(self):  # (table, computed) = compare(...) keeps working
        return iter((self.table, self.computed))


def _from_rank0(obj):
    """Rank 0's ``obj`` on every rank of an initialised process group (``obj`` itself otherwise)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def missing_metrics(df: pd.DataFrame, tokenizer: str, metrics: tuple[str, ...], dataset: str, fingerprint: str,
                    resolution: int, seed: int) -> tuple[str, ...]:
    from raebench.metrics import METRICS

    have = df[
        (df["tokenizer"] == tokenizer) & (df["dataset"] == dataset) & (df["resolution"] == resolution)
        & (df["seed"] == seed) & (df["data_fingerprint"] == fingerprint)
        & (df["source"].fillna("measured") == "measured")
    ] if not df.empty else df
    out = []
    for m in metrics:
        spec = METRICS.get(m)
        if have.empty or not ((have["metric"] == m) & (have["metric_version"] == spec.version)).any():
            out.append(m)
    return tuple(out)


def compare(
    tokenizers: list[str],
    metrics: tuple[str, ...],
    *,
    data: str | None = None,
    dataset: str | None = None,
    resolution: int = 256,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    num_workers: int | None = None,
    results_dir: str = "results",
    reported: str = "weights",
    weights: dict[str, str] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CompareResult:
    """Evaluate what is missing, then tabulate measured values beside reported ones.

    ``weights``: tokenizer name -> local weights path (``--weights NAME=DIR``), as ``eval --weights``.
    """
    from raebench.tokenizers import get_tokenizer_spec

    if reported not in REPORTED_CHOICES:
        from raebench.errors import RaebenchError

        raise RaebenchError(f"--reported must be one of {', '.join(REPORTED_CHOICES)}, not {reported!r}.")
    names = [get_tokenizer_spec(t).name for t in tokenizers]  # canonical names; unknown -> suggestions
    local = {get_tokenizer_spec(k).name: v for k, v in (weights or {}).items()}
    stray = sorted(set(local) - set(names))
    if stray:
        from raebench.errors import RaebenchError

        raise RaebenchError(f"--weights given for {', '.join(stray)}, which is not among the compared tokenizers.")
    resolved = resolve_data(data, dataset, limit, seed)
    fp = resolved.images.fingerprint()
    computed = []
    with sharing_networks():  # the metric networks load once for all tokenizers
        for name in names:
            todo = _from_rank0(missing_metrics(load(results_dir), name, metrics, resolved.name, fp, resolution, seed))
            if not todo:
                continue
            cfg = EvalConfig(tokenizer=name, metrics=todo, data=data, dataset=dataset, resolution=resolution,
                             limit=limit, seed=seed, batch_size=batch_size, device=device, num_workers=num_workers,
                             results_dir=results_dir, weights=local.get(name))
            cb = (lambda d, t, n=name: on_progress(f"eval {n}", d, t)) if on_progress else None
            evaluate(cfg, on_progress=cb, data=resolved)
            computed.append(name)
    everything = load(results_dir)
    df = everything[(everything["dataset"] == resolved.name) & (everything["data_fingerprint"] == fp)
                    & (everything["seed"] == seed) & everything["metric"].isin(_result_names(metrics))]
    rep = None
    if reported != "none":
        from raebench.baselines import reported_frame

        rep = reported_frame(names, include_variants=reported == "all")
    gap = domain_gap(everything, names, resolution) if not everything.empty else pd.DataFrame()
    return CompareResult(compare_table(df, names, resolution, reported=rep), computed, gap, resolved.name, resolved.n)


def _result_names(metrics: tuple[str, ...]) -> list[str]:
    from raebench.metrics import METRICS

    out = []
    for m in metrics:
        spec = METRICS.get(m)
        out += [spec.name, *[o for o, _ in spec.outputs]]
    return out
