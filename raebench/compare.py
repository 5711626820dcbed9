"""``raebench compare``: reuse rows that exist, compute only what is missing, tabulate.

A stored row is reused when tokenizer, weights (the ``weights_id`` of the tokenizer built now, by content:
the Hub copy and a ``--weights`` copy of the same files are the same weights), fp32
precision, dataset, resolution, seed, metric version, the metric networks' weights (resolved without
loading, :func:`raebench.eval_config.planned`) and the data fingerprint (the exact image list,
see ``ImageList.fingerprint``) all match, so other weights, a bf16 run, a different ``--limit`` or a
changed folder are recomputed, never mixed in silently; ``recompute=True`` reuses nothing. Each
tokenizer is built (its weights loaded) before that decision, since its weights identity is known
only then. A results folder that cannot be written (a shared, read-only one) is fine while every row
asked for is stored; the first tokenizer that needs a row computed stops ``compare`` with one sentence,
before any evaluation.

Beside the measured values the table shows what the tokenizers' baseline cards report
(``raebench.baselines``), each in its own ``(reported)`` column with its n, reference and source in
the ``protocol`` column; and, from every measured row stored for these tokenizers, the gap between
open-domain and in-domain values (:func:`raebench.leaderboard.domain_gap`).

Under ``torchrun`` every rank runs ``compare``: rank 0 decides what is missing (so all ranks take
the same branches around the collectives of :func:`raebench.evaluate.evaluate`, even if another run
writes rows meanwhile), each evaluation is sharded across the ranks, and rank 0 alone writes rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import pandas as pd

from raebench.data import resolve_data
from raebench.distributed import from_rank0, rank_world
from raebench.eval_config import EvalConfig, planned
from raebench.evaluate import evaluate
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
    n_images: int = 0  # images the measured values use (the data's files less unreadable ones)
    unreadable: int = 0  # files of the data skipped as unreadable

    def __iter__(self):  # (table, computed) = compare(...) keeps working
        return iter((self.table, self.computed))


def stored_rows(df: pd.DataFrame, tokenizer: str, weights_id: str, dataset: str, fingerprint: str, resolution: int,
                seed: int, precision: str = "fp32") -> pd.DataFrame:
    """The measured rows of ``df`` (``raebench.results.load``) of one tokenizer, weights (by content:
    :func:`raebench.weights.same_weights`), precision and image list."""
    if df.empty:
        return df
    return df[
        (df["tokenizer"] == tokenizer) & _same_weights(df["weights_id"], weights_id) & (df["precision"] == precision)
        & (df["dataset"] == dataset) & (df["resolution"] == resolution) & (df["seed"] == seed)
        & (df["data_fingerprint"] == fingerprint) & (df["source"].fillna("measured") == "measured")
    ]


def missing_metrics(df: pd.DataFrame, tokenizer: str, weights_id: str, metrics: tuple[str, ...], dataset: str,
                    fingerprint: str, resolution: int, seed: int, precision: str = "fp32", plan=None) -> tuple[str, ...]:
    """The metrics of ``metrics`` with no stored row for exactly this measurement. ``plan``
    (:func:`raebench.eval_config.planned`): the version a row made now would get (options included) and
    its metric networks' weights, which a stored row must match; default: the registered base version."""
    from raebench.metrics import METRICS

    have = stored_rows(df, tokenizer, weights_id, dataset, fingerprint, resolution, seed, precision)
    out = []
    for m in metrics:
        spec = METRICS.get(m)
        rows = have[have["metric"] == spec.name] if not have.empty else have
        if plan is None:
            ok = not rows.empty and (rows["metric_version"] == spec.version).any()
        else:
            ok = any(plan.row_matches(spec.name, v, e) for v, e in zip(rows["metric_version"], rows["extra"]))
        if not ok:
            out.append(m)
    return tuple(out)


@dataclass
class EvalReuse:
    """What ``raebench eval`` takes from the results folder instead of measuring (:func:`eval_reuse`)."""

    todo: tuple[str, ...]  # metrics to measure now (all of them with recompute)
    reused: tuple[str, ...]  # metrics whose stored rows stand
    rows: pd.DataFrame  # those rows (newest per result name, kid-std and the like included), in the order asked
    order: tuple[str, ...]  # every result name asked for, in order: the table's rows

    @property
    def runs(self) -> list[tuple[str, str]]:
        """(run id, date) of the stored rows, oldest first."""
        if self.rows.empty:
            return []
        return list(dict.fromkeys(zip(self.rows["run_id"], self.rows["date"])))


def eval_reuse(cfg: EvalConfig, tok, data, recompute: bool = False) -> EvalReuse:
    """Which metrics of ``cfg`` an ``eval`` re-run measures: those with no stored row of exactly this
    measurement, by the rule of :func:`compare` (:func:`missing_metrics`: the built tokenizer's weights by
    content, ``cfg.precision``, the data's name and fingerprint, resolution, seed, metric versions with
    options, the metric networks' weights), and which stored rows stand for the others; ``recompute``:
    every metric. Nothing is loaded but the results folder. Under torchrun rank 0 decides for all ranks.
    An evaluation killed after writing its rows but before removing its resume state left that state:
    when every row is reused it is removed (:func:`drop_finished_progress`)."""
    import os

    from raebench.eval_config import check_options, parse_options

    metrics = tuple(dict.fromkeys(cfg.metrics))
    options = parse_options(os.environ.get("RAEBENCH_METRIC_OPTIONS") if cfg.metric_options is None
                            else list(cfg.metric_options))
    check_options(options)  # a mistyped option is an error even when nothing is measured
    plan = planned(metrics, options)
    wid = getattr(tok, "weights_id", "none")
    fp, seed = data.images.fingerprint(), data.seed_of(cfg.seed)
    decided = None
    if rank_world()[0] == 0:
        df = load(cfg.results_dir)
        todo = metrics if recompute else missing_metrics(df, tok.name, wid, metrics, data.name, fp, cfg.resolution, seed,
                                                         cfg.precision, plan=plan)
        reused = tuple(m for m in metrics if m not in todo)
        have = stored_rows(df, tok.name, wid, data.name, fp, cfg.resolution, seed, cfg.precision) if reused else df.iloc[:0]
        if not have.empty:  # the newest row of each result name of a reused metric, measured as a row made now would be
            names = _result_names(reused)
            ok = [m in names and plan.row_matches(m, v, e) for m, v, e in zip(have["metric"], have["metric_version"],
                                                                               have["extra"])]
            have = have[pd.Series(ok, index=have.index, dtype=bool)].drop_duplicates("metric", keep="last")
        order = tuple(_result_names(metrics))
        have = have.set_index("metric", drop=False).reindex([m for m in order if m in set(have["metric"])])
        decided = (todo, reused, have.reset_index(drop=True), order)
    todo, reused, have, order = from_rank0(decided)
    out = EvalReuse(tuple(todo), tuple(reused), have, tuple(order))
    if not out.todo:
        drop_finished_progress(cfg, data, tok, plan, {r for r, _ in out.runs})
    return out


def drop_finished_progress(cfg: EvalConfig, data, tok, plan, run_ids: set[str]) -> None:
    """Remove the resume state of this evaluation (every metric of ``cfg``) when it belongs to a finished
    run, one whose rows are stored (``run_ids``): ``evaluate`` keeps its run id in that state, so a run
    killed between writing its rows and removing the state is known by it. Rank 0's state decides (only
    rank 0 writes rows, under its run id; a rank-0 state already gone means the rows were written). Any
    other state, a ``--recompute`` killed mid-way say, is left for that command to resume; a state whose
    evaluation is running (its lock held), or in a folder that cannot be written, is left alone."""
    from raebench.checkpoint import load_state
    from raebench.errors import CheckpointError, RaebenchError
    from raebench.eval_progress import WorkState
    from raebench.evaluate import resume_key

    rank = rank_world()[0]
    work = WorkState(cfg.results_dir, resume_key(cfg, data, tok, plan), rank)
    finished = False
    if rank == 0 and work.dir.is_dir():
        try:  # the small skeleton file only: the metric states lie in segment files beside it
            st = load_state(work.path) if work.path.exists() else {}
            finished = not work.path.exists() or (isinstance(st, dict) and str(st.get("run_id")) in run_ids)
        except CheckpointError:
            finished = False
    if not from_rank0(finished) or not work.dir.is_dir():
        return
    try:
        work.acquire()
    except RaebenchError:  # held by a job at work on it
        return
    except OSError:  # a read-only folder (which serves stored rows): the stale state stays, harmless
        return
    work.release(remove=True)


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
    recompute: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CompareResult:
    """Evaluate what is missing (everything with ``recompute``), then tabulate measured values
    beside reported ones.

    ``weights``: tokenizer name -> local weights path (``--weights NAME=DIR``), as ``eval --weights``.
    """
    from raebench.eval_config import build_tokenizer_from_config, resolve_device
    from raebench.errors import RaebenchError
    from raebench.results import check_writable
    from raebench.tokenizers import get_tokenizer_spec
    from raebench.weights import named_flags

    if reported not in REPORTED_CHOICES:
        raise RaebenchError(f"--reported must be one of {', '.join(REPORTED_CHOICES)}, not {reported!r}.")
    names = [get_tokenizer_spec(t).name for t in tokenizers]  # canonical names; unknown -> suggestions
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise RaebenchError(f"{', '.join(twice)} is given more than once; compare each tokenizer once.")
    local = {get_tokenizer_spec(k).name: v for k, v in (weights or {}).items()}
    stray = sorted(set(local) - set(names))
    if stray:
        raise RaebenchError(f"--weights given for {', '.join(stray)}, which is not among the compared tokenizers.")
    try:
        check_writable(results_dir)  # before any model loads
        unwritable = None
    except RaebenchError as e:
        if recompute:
            raise
        unwritable = str(e)  # a shared read-only folder may hold every row asked for: fail only if one is missing
    unwritable = from_rank0(unwritable)
    resolved = resolve_data(data, dataset, limit, seed)
    fp = resolved.images.fingerprint()
    computed = []
    wids: dict[str, str] = {}
    with sharing_networks():  # the metric networks load once for all tokenizers
        # the versions rows made now get (options from $RAEBENCH_METRIC_OPTIONS) and the metric networks'
        # weights, resolved without loading them: reuse and the table take only rows measured so
        plan = planned(tuple(metrics))
        for name in names:
            cfg = EvalConfig(tokenizer=name, metrics=metrics, data=data, dataset=dataset, resolution=resolution,
                             limit=limit, seed=seed, batch_size=batch_size, device=device, num_workers=num_workers,
                             results_dir=results_dir, weights=local.get(name))
            with named_flags("raebench compare", name, ("--weights",)):  # its --weights reads NAME=DIR
                tok = build_tokenizer_from_config(cfg, resolve_device(device))
            wids[name] = getattr(tok, "weights_id", "none")
            todo = metrics if recompute else missing_metrics(load(results_dir), name, wids[name], metrics, resolved.name,
                                                             fp, resolution, resolved.seed_of(seed), plan=plan)
            todo = from_rank0(todo)
            if todo and unwritable:  # before any evaluation: nothing computed would be lost
                raise RaebenchError(f"{name} needs {', '.join(todo)} computed (no stored row of these weights, images "
                                    f"and settings), which cannot be stored: {unwritable[0].lower()}{unwritable[1:-1]} "
                                    "(a writable copy of this folder keeps its rows).")
            if todo:
                cb = (lambda d, t, n=name: on_progress(f"eval {n}", d, t)) if on_progress else None
                evaluate(replace(cfg, metrics=todo), tokenizer=tok, on_progress=cb, data=resolved)
                computed.append(name)
            del tok
    everything = load(results_dir)
    df = everything[(everything["dataset"] == resolved.name) & (everything["data_fingerprint"] == fp)
                    & (everything["seed"] == resolved.seed_of(seed)) & everything["metric"].isin(_result_names(metrics))
                    & (everything["precision"] == "fp32")] if not everything.empty else everything
    if not df.empty:  # each tokenizer's rows of the weights it has now, of the versions decided on (reported rows pass)
        from raebench.weights import same_weights

        mine = [same_weights(w, wids.get(t)) for t, w in zip(df["tokenizer"], df["weights_id"])]
        made_so = [plan.row_matches(m, v, e) for m, v, e in zip(df["metric"], df["metric_version"], df["extra"])]
        df = df[(df["source"] == "reported") | (pd.Series(mine, index=df.index) & pd.Series(made_so, index=df.index))]
    rep = None
    if reported != "none":
        from raebench.baselines import reported_frame

        from raebench.weights import LOCAL_LABELS

        # "weights": published numbers are for the released weights, not for weights the user supplied (a
        # --weights copy, a diffusers-format folder, an official YAML's files)
        shown = names if reported == "all" else [n for n in names if not wids.get(n, "").startswith(LOCAL_LABELS)]
        rep = reported_frame(shown, include_variants=reported == "all")
    gap = domain_gap(everything, names, resolution) if not everything.empty else pd.DataFrame()
    meas = df[df["tokenizer"].isin(names) & (df["source"].fillna("measured") == "measured")] if not df.empty else df
    n_used = int(meas["n_images"].max()) if not meas.empty else resolved.n
    unreadable = int(pd.to_numeric(meas["skipped"], errors="coerce").max()) if not meas.empty else 0
    return CompareResult(compare_table(df, names, resolution, reported=rep), computed, gap, resolved.name, n_used,
                         unreadable)


def _same_weights(ids: pd.Series, weights_id: str) -> pd.Series:
    from raebench.weights import same_weights

    return ids.map(lambda w: same_weights(w, weights_id)).astype(bool)


def _result_names(metrics: tuple[str, ...]) -> list[str]:
    from raebench.metrics import METRICS

    out = []
    for m in metrics:
        spec = METRICS.get(m)
        out += [spec.name, *[o for o, _ in spec.outputs]]
    return out
