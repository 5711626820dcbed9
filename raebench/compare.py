"""``raebench compare``: reuse rows that exist, compute only what is missing, tabulate.

A stored row is reused when tokenizer, dataset, resolution, seed, metric version and the data
fingerprint (the exact image list, see ``ImageList.fingerprint``) all match, so a different
``--limit`` or a changed folder is recomputed, never mixed in silently.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd

from raebench.data import resolve_data
from raebench.evaluate import EvalConfig, evaluate
from raebench.leaderboard import compare_table
from raebench.results import load


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
    num_workers: int = 0,
    results_dir: str = "results",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Returns (table from :func:`compare_table`, names of tokenizers evaluated now)."""
    from raebench.tokenizers import TOKENIZERS, get_tokenizer_spec

    names = [get_tokenizer_spec(t).name for t in tokenizers]  # canonical names; unknown -> suggestions
    del TOKENIZERS
    resolved = resolve_data(data, dataset, limit, seed)
    fp = resolved.images.fingerprint()
    computed = []
    for name in names:
        todo = missing_metrics(load(results_dir), name, metrics, resolved.name, fp, resolution, seed)
        if not todo:
            continue
        cfg = EvalConfig(tokenizer=name, metrics=todo, data=data, dataset=dataset, resolution=resolution, limit=limit,
                         seed=seed, batch_size=batch_size, device=device, num_workers=num_workers, results_dir=results_dir)
        cb = (lambda d, t, n=name: on_progress(f"eval {n}", d, t)) if on_progress else None
        evaluate(cfg, on_progress=cb, data=resolved)
        computed.append(name)
    df = load(results_dir)
    df = df[(df["dataset"] == resolved.name) & (df["data_fingerprint"] == fp) & (df["seed"] == seed)
            & df["metric"].isin(_result_names(metrics))]
    return compare_table(df, names, resolution), computed


def _result_names(metrics: tuple[str, ...]) -> list[str]:
    from raebench.metrics import METRICS

    out = []
    for m in metrics:
        spec = METRICS.get(m)
        out += [spec.name, *[o for o, _ in spec.outputs]]
    return out
