"""One-pass reconstruction evaluation: load -> encode -> decode -> every metric.

Per batch: uint8 originals (N, 3, R, R) -> float [0, 1] -> ``tokenizer.encode`` -> ``decode`` ->
per-image finiteness check -> clamp and round to uint8 (what a PNG of the reconstruction holds;
every metric sees 8-bit images, as external evaluators do) -> each requested feature extractor runs
once on originals and once on reconstructions -> every metric updates from the shared batch.

Images whose latents or reconstructions contain NaN/Inf are excluded from all metrics and counted
per tokenizer (``nonfinite`` in the rows), never averaged in. Unreadable files are skipped, counted
and listed. Rows are written only when the whole evaluation finished.

The run's configuration and metric options are in :mod:`raebench.eval_config`, the metrics and their
shared extractors in :mod:`raebench.evaluator`; this module drives one run (sharding, resume, rows).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from raebench import distributed
from raebench.distributed import rank_world, shard
from raebench.data import ResolvedData, resolve_data
from raebench.folders import Skip
from raebench.images import to_float, to_uint8
from raebench.loaders import ImageDataset, default_workers, make_loader
from raebench.errors import RaebenchError
from raebench.eval_config import (EvalConfig, Planned, _autocast, build_tokenizer_from_config, check_config,
                                  check_data_counts, parse_options, resolve_device)
from raebench.eval_progress import WorkState
from raebench.evaluator import Evaluator, ReferenceSet
from raebench.preempt import STOP_SIGNALS, Preempted, StopOnSignal, of_rank
from raebench.results import ResultRow, check_writable, new_run_id, write_rows

log = logging.getLogger(__name__)


@dataclass
class EvalOutcome:
    rows: list[ResultRow]
    skipped: list[Skip] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    seconds: float = 0.0
    n_images: int = 0
    #: metric -> why it has no row (too few usable images left after unreadable or NaN ones)
    failed: dict[str, str] = field(default_factory=dict)


def _metric_options(cfg: EvalConfig) -> dict[str, dict[str, str]] | None:
    return None if cfg.metric_options is None else parse_options(list(cfg.metric_options))


def _content_id(path: str | None) -> str | None:
    """A local weights path by its content (moving a folder keeps the progress made with it); a Hub
    repo id, or a path not found (its loader says so), as given."""
    from raebench.metrics.extractors import fingerprint_path

    return fingerprint_path(path) if path is not None and Path(path).exists() else path


def _run_key(cfg: EvalConfig, data: ResolvedData, tok, metric_versions: list[str]) -> str:
    """Identity of an evaluation for resuming: everything that changes a number, nothing that
    doesn't (batch size, workers and device may change between the crash and the re-run)."""
    from raebench.eval_progress import work_key

    return work_key({
        "tokenizer": tok.name, "weights": getattr(tok, "weights_id", "none"), "config": cfg.tokenizer_config,
        "data": data.images.fingerprint(), "dataset": data.name, "resolution": cfg.resolution, "seed": data.seed_of(cfg.seed),
        "metrics": sorted(metric_versions), "precision": cfg.precision,
        "opts": [_content_id(p) for p in (cfg.weights, cfg.decoder, cfg.stats)],
        "metric_options": sorted(cfg.metric_options or ()) or os.environ.get("RAEBENCH_METRIC_OPTIONS", ""),
    })


def resume_key(cfg: EvalConfig, data: ResolvedData, tok, plan: Planned) -> str:
    """The ``results/.work`` folder name of this evaluation's resume state (:func:`_run_key`)."""
    # options and the metric networks' weights are in the key: progress made with other ones is not resumed
    return _run_key(cfg, data, tok, sorted(set(plan.versions.values())) + [json.dumps(plan.weights, sort_keys=True)])


def evaluate(
    cfg: EvalConfig,
    tokenizer=None,
    on_progress: Callable[[int, int], None] | None = None,
    data: ResolvedData | None = None,
    save_every: int = 20,
) -> EvalOutcome:
    """Run one evaluation; writes rows to ``cfg.results_dir`` when ``cfg.write``.

    Under torchrun (an initialised process group) each rank takes a contiguous shard and the
    metric states are merged exactly on rank 0, which alone writes rows. Progress is saved every
    ``save_every`` batches; re-running the same evaluation after a crash continues from there and
    gives the same numbers. ``on_progress(done_images, total_images)`` is called after each batch
    (this rank's shard).
    """
    import torch.distributed as td

    from raebench.metrics import higher_is_better

    t0 = time.perf_counter()
    rank, world = rank_world()
    check_config(cfg)
    if cfg.write:
        check_writable(cfg.results_dir)
    data = data or resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    check_data_counts(cfg, data)
    device = resolve_device(cfg.device)
    tok = tokenizer if tokenizer is not None else build_tokenizer_from_config(cfg, device)
    reference = ReferenceSet(f"{data.images.fingerprint()}|adm-center-crop@{cfg.resolution}", data.n)
    ev = Evaluator(tuple(cfg.metrics), device, reference=reference, options=_metric_options(cfg))
    plan = ev.planned()  # weights resolved once: checked here, and part of the resume key below
    ev.check_weights(plan)

    lo, hi = shard(data.n, rank, world)
    work = WorkState(cfg.results_dir, resume_key(cfg, data, tok, plan), rank) if cfg.write else None
    skipped: list[Skip] = list(data.images.skipped) if rank == 0 else []
    upscaled: list[str] = []
    nonfinite: list[str] = []
    done = n_used = 0
    # the run's identity is kept in its resume state: a job killed after writing its rows but before
    # removing that state rewrites the same run file when resumed, instead of adding a duplicate run
    run_id = new_run_id()
    if work is not None:
        try:
            work.acquire()
            busy = None
        except RaebenchError as e:  # another job evaluates this configuration (holds this rank's progress)
            busy = str(e)
        if world > 1:  # one verdict for the job: any rank's progress busy stops every rank, rank 0 says so once
            busy = next((m for m in distributed.gather_to_rank0(busy) or [] if m), None)
        try:
            distributed.refuse(busy)
        except RaebenchError:
            work.release(remove=False)
            raise
        st = work.load()
        if st is not None and st.get("shard") == [lo, hi] and len(st["metrics"]) == len(ev.metrics):
            ev.merge(st["metrics"])
            done, n_used = st["done"], st["n_used"]
            skipped = [Skip(p, r) for p, r in st["skipped"]]
            upscaled, nonfinite = list(st["upscaled"]), list(st["nonfinite"])
            t0 -= float(st.get("seconds", 0.0))  # the row's seconds count the work before the crash too
            run_id = str(st.get("run_id", run_id))
            log.info("resuming %s on %s: %d of %d images already evaluated", tok.name, data.name, done, hi - lo)

    def checkpoint() -> None:
        if work is not None:
            work.save({
                "shard": [lo, hi], "done": done, "n_used": n_used, "metrics": ev.states(),
                "skipped": [(s.path, s.reason) for s in skipped], "upscaled": upscaled, "nonfinite": nonfinite,
                "seconds": time.perf_counter() - t0, "run_id": run_id,
            })

    ds = ImageDataset(data.images, cfg.resolution)
    workers = default_workers(cfg.num_workers, device)
    loader = make_loader(ds, cfg.batch_size, workers, pin_memory=device.type == "cuda",
                         indices=range(lo + done, hi))
    try:  # the stop signals only set a flag, read after each batch (only where there is progress to save)
        with StopOnSignal(STOP_SIGNALS if work is not None else ()) as preempt:
            for i, batch in enumerate(loader):
                skipped.extend(batch["skipped"])
                upscaled.extend(batch["upscaled"])
                if batch["image"].shape[0]:
                    ref = batch["image"].to(device, non_blocking=True)  # (N, 3, R, R) uint8
                    with torch.no_grad(), _autocast(device, cfg.precision):
                        z = tok.encode(to_float(ref))
                        rec = tok.decode(z)
                    z, rec = z.float(), rec.float()
                    if rec.shape != ref.shape:
                        raise RaebenchError(
                            f"{tok.name} reconstructs {tuple(ref.shape[-2:])} inputs as {tuple(rec.shape[-2:])} images; "
                            f"its input size is fixed, so pass --resolution {rec.shape[-1]} (or a tokenizer built for "
                            f"{ref.shape[-1]} px).")
                    ok = torch.isfinite(z.flatten(1)).all(1) & torch.isfinite(rec.flatten(1)).all(1)  # (N,)
                    if not bool(ok.all()):
                        bad = (~ok).nonzero().flatten().tolist()
                        nonfinite.extend(batch["path"][j] for j in bad)
                        log.warning("%s: %d image(s) with NaN/Inf latents or reconstructions excluded", tok.name, len(bad))
                    # every original goes to the reference extractors (for the feature cache); only the
                    # finite reconstructions and their originals reach the metrics
                    ev.update(ref, to_uint8(rec[ok]), index=batch["index"], keep=ok)
                    n_used += int(ok.sum())
                done += len(batch["skipped"]) + batch["image"].shape[0]
                if on_progress:
                    on_progress(done, hi - lo)
                signum = preempt.local()  # SIGTERM/SIGUSR1: this batch is done; save and stop (each rank on its own)
                if (i + 1) % save_every == 0 or signum:
                    checkpoint()
                if signum:
                    raise Preempted.saved(signum, f"after {done} of {hi - lo} images{of_rank(rank, world)}")
    except BaseException:
        if work is not None:  # keep saved progress for a resume; a run that saved none leaves nothing
            work.release(remove=not work.path.exists())
        raise

    ev.finish()  # cache the reference features if this process extracted all of them
    states = None  # with several ranks: every rank's metric states, in rank order
    if world > 1:  # metric states to rank 0, which alone merges and computes (below); counts to every rank
        checkpoint()
        states = distributed.gather_to_rank0(ev.states())
        mine = {"n_used": n_used, "skipped": [(s.path, s.reason) for s in skipped], "upscaled": upscaled,
                "nonfinite": nonfinite}
        gathered: list = [None] * world
        td.all_gather_object(gathered, mine)
        n_used, skipped, upscaled, nonfinite = 0, [], [], []
        for g in gathered:
            n_used += g["n_used"]
            skipped += [Skip(p, r) for p, r in g["skipped"]]
            upscaled += g["upscaled"]
            nonfinite += g["nonfinite"]

    if n_used == 0:
        if work is not None:
            work.release(remove=True)
        reason = "no image was readable" if not nonfinite else "every reconstruction contained NaN/Inf"
        raise RaebenchError(f"Nothing to evaluate for {tok.name!r} on {data.name!r}: {reason} ({len(skipped)} skipped).")
    if upscaled and rank == 0:
        log.warning("%d image(s) were smaller than %d px and were upscaled by the crop", len(upscaled), cfg.resolution)

    def final() -> tuple:
        merged = ev
        if world > 1:  # a fresh evaluator holding the states of all ranks, merged in rank order
            merged = Evaluator(tuple(cfg.metrics), device, reference=reference, options=_metric_options(cfg))
            for per_rank in states:
                merged.merge(per_rank)
        values, versions, notes = merged.compute()
        return values, versions, notes, merged.weights_ids(), dict(merged.failed)

    values, versions, notes, metric_weights, failed = distributed.on_rank0(final)
    if not values:
        if work is not None:
            work.release(remove=True)
        raise RaebenchError(f"Nothing to write for {tok.name!r} on {data.name!r}: {'; '.join(failed.values())}.")
    seconds = time.perf_counter() - t0
    rows = [
        ResultRow(
            tokenizer=tok.name,
            weights_id=getattr(tok, "weights_id", "none"),
            dataset=data.name,
            split=data.split,
            domain=data.domain,
            resolution=cfg.resolution,
            n_images=n_used,
            metric=name,
            value=value,
            higher_is_better=higher_is_better(name),
            metric_version=versions[name],
            seed=data.seed_of(cfg.seed),
            data_fingerprint=data.images.fingerprint(),
            skipped=len(skipped),
            nonfinite=len(nonfinite),
            seconds=round(seconds, 3),
            device=str(device) + (f" x{world}" if world > 1 else ""),
            notes=notes[name],
            run_id=run_id,
            precision=cfg.precision,
            extra={
                "skipped_files": [f"{s.path}: {s.reason}" for s in skipped][:1000],
                "upscaled": len(upscaled),
                "nonfinite_files": nonfinite[:1000],
                "precision": cfg.precision,
                "limit": cfg.limit if data.sampled else None,
                "world_size": world,
                "metric_weights": metric_weights,
            },
        )
        for name, value in values.items()
    ]
    if cfg.write and rank == 0:
        write_rows(rows, cfg.results_dir, run_id)
    if world > 1:
        td.barrier()  # rows are written before any rank removes its resume state
    if work is not None:
        work.release(remove=True)
    return EvalOutcome(rows, skipped, upscaled, nonfinite, seconds, n_used, failed)
