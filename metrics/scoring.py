"""Scoring image sets that already exist: reconstructions or samples vs references, no tokenizer.

Two protocols, chosen by the metrics asked for:

* paired (any paired metric: psnr, ssim, lpips-*, dreamsim*, ms-ssim): reference and candidate
  images are matched by relative path without extension (folder vs folder, so ``val/x.JPEG`` pairs
  with ``recon/x.png``) or by position (when a side is an ``.npz``); the distribution metrics see
  the same pairs, in one pass (rFID of existing reconstructions).
* unpaired (only distribution metrics): the two sets may differ in size; references are streamed
  only when some metric still needs their features, i.e. when neither the feature cache nor the
  statistics stored in an ADM reference batch supply them (gFID of 50k samples against
  ``VIRTUAL_imagenet256_labeled.npz``: FID/sFID from its ``mu``/``sigma``/``mu_s``/``sigma_s``,
  precision/recall from its images, as the ADM evaluator does).

Result rows name the candidate set as the "tokenizer" (``--name``) and the reference set as the
dataset; ``extra`` records both fingerprints and the protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from raebench.errors import DataError, RaebenchError
from raebench.preempt import STOP_SIGNALS, Preempted, StopOnSignal, of_rank
from raebench.eval_progress import WorkState
from raebench.metrics.sources import ADM_STATS_KEYS, ImageSource, npz_images_shape, npz_members, open_source


log = logging.getLogger(__name__)


@dataclass
class ScoreOutcome:
    rows: list
    paired: bool
    n_references: int
    n_candidates: int
    seconds: float
    skipped: list = field(default_factory=list)
    upscaled: list = field(default_factory=list)  # paths smaller than --resolution, upscaled by the crop
    #: metric -> why it has no row (too few readable images); the other rows are written
    failed: dict[str, str] = field(default_factory=dict)


def pair_order(ref: ImageSource, cand: ImageSource, flags: tuple[str, str] = ("--references", "--candidates")) -> list[int]:
    """For each reference i, the index of its candidate: by name (two folders) or by position.
    ``flags`` name the two sides in errors as the user gave them."""
    if ref.kind == "dir" and cand.kind == "dir":
        where: dict[str, list[int]] = {}
        for i, n in enumerate(cand.names):
            where.setdefault(n, []).append(i)
        wanted = set(ref.names)
        missing = [n for n in ref.names if n not in where]
        extra = [cand.images.paths[i] for n, ix in where.items() if n not in wanted for i in ix]
        twice = [cand.images.paths[i] for n, ix in where.items() if len(ix) > 1 for i in ix]
        refs_at: dict[str, list[int]] = {}
        for i, n in enumerate(ref.names):
            refs_at.setdefault(n, []).append(i)
        ref_twice = [ref.images.paths[i] for ix in refs_at.values() if len(ix) > 1 for i in ix]
        if missing or extra or twice or ref_twice:
            found = [f"{len(missing)} of {ref.n} references have none (e.g. {missing[:3]})" if missing else "",
                     f"{len(extra)} candidate(s) match no reference (e.g. {extra[:3]})" if extra else "",
                     f"{len(twice)} candidates share a name with another (e.g. {twice[:3]})" if twice else "",
                     f"{len(ref_twice)} references share a name with another (e.g. {ref_twice[:3]})" if ref_twice else ""]
            raise DataError("Paired metrics need exactly one candidate per reference with the same relative name "
                            "(extension aside): " + "; ".join(f for f in found if f) + ".")
        return [where[n][0] for n in ref.names]
    if ref.n != cand.n:
        raise DataError(f"Paired metrics need as many images in {flags[1]} as in {flags[0]} ({cand.n} vs {ref.n}).")
    return list(range(ref.n))


def numeric_names_note(ref: ImageSource, cand: ImageSource) -> str:
    """A warning for pairing a folder with an ``.npz`` by position when every file of the folder has
    an integer name and text order (how folders are read) is not numeric order (``0, 1, 10, 11, 2``):
    row i of the .npz then meets the i-th name as text, not file i. "" when that is not the case."""
    if {ref.kind, cand.kind} != {"dir", "npz"}:
        return ""
    folder = ref if ref.kind == "dir" else cand
    names = folder.names
    if not names or not all(n.isascii() and n.isdigit() for n in names) or sorted(names, key=int) == names:
        return ""
    return (f"pairs by position: the numeric file names of {folder.path.name} are read in text order "
            f"({', '.join(names[:4])}, ...), not numeric order; if .npz row i is file i, the pairs are wrong "
            f"(name the files zero-padded, 000000.png)")


def size_mismatch(ref: ImageSource, cand: ImageSource, ref_hw: tuple, cand_hw: tuple) -> DataError:
    """The error for pairs of different sizes, with advice that can work: --resolution crops folders,
    never an ``.npz``."""
    if ref.kind == "npz" and cand.kind == "npz":
        fix = "an .npz cannot be resized, so write both at one size"
    elif "npz" in (ref.kind, cand.kind):
        h, w = ref_hw if ref.kind == "npz" else cand_hw
        fix = (f"pass --resolution {h} to crop the folder to the .npz's size" if h == w else
               "an .npz cannot be resized and --resolution crops folders square, so write both at one size")
    else:
        fix = "pass --resolution R to crop both"
    return DataError(f"Reference and candidate images differ in size ({ref_hw} vs {cand_hw}); {fix}.")


def check_pair_sizes(ref: ImageSource, cand: ImageSource) -> None:
    """Two ``.npz`` files paired image by image must hold one image size (known from their headers,
    so refused before any model loads)."""
    if ref.kind == "npz" and cand.kind == "npz" and ref.n and cand.n:
        a, b = npz_images_shape(ref.path)[1:3], npz_images_shape(cand.path)[1:3]
        if a != b:
            raise size_mismatch(ref, cand, a, b)


def score(
    references: str,
    candidates: str,
    metrics: tuple[str, ...],
    *,
    name: str | None = None,
    domain: str = "open-domain",
    resolution: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    options: dict[str, dict[str, str]] | None = None,
    results_dir: str = "results",
    write: bool = True,
    on_progress: Callable[[str, int, int], None] | None = None,
    save_every: int = 20,
    flags: tuple[str, str] = ("--references", "--candidates"),
    num_workers: int | None = None,
) -> ScoreOutcome:
    """Score ``candidates`` against ``references`` (folders or ``.npz``) and write result rows.

    Resumable when writing rows: every ``save_every`` batches each rank saves its metric states and
    position under ``<results>/.work/`` (as :func:`raebench.evaluate.evaluate` does); re-running the
    same scoring after a crash continues there and gives the same numbers, at any batch size.
    ``flags`` name the two inputs in errors; ``num_workers`` decode image folders (None: 0 on the CPU,
    min(8, cores) on a GPU, as eval).
    """
    from raebench.checks import check_domain, check_image_counts, check_sizes
    from raebench.loaders import default_workers
    from raebench.distributed import rank_world
    from raebench.eval_config import resolve_device
    from raebench.evaluator import Evaluator, ReferenceSet
    from raebench.metrics import METRICS
    from raebench.results import check_writable, new_run_id

    t0 = time.perf_counter()
    rank, world = rank_world()  # under torchrun: contiguous shards, states merged in rank order on every rank
    specs = [METRICS.get(m) for m in metrics]
    check_sizes(batch_size, resolution, tuple(s.name for s in specs))
    check_domain(domain)
    if write:
        check_writable(results_dir)
    ref, cand = open_source(references, resolution), open_source(candidates, resolution)
    for src in (ref, cand):  # the image size from headers (an .npz's arr_0, a folder's first image), before any model
        side = src.short_side()
        if side is not None:
            check_sizes(batch_size, None, tuple(s.name for s in specs), side, resizable=src.kind != "npz")
    pair_note = ""
    if any(s.kind == "paired" for s in specs):
        check_pair_sizes(ref, cand)
        pair_note = numeric_names_note(ref, cand)
        if pair_note and rank == 0:
            log.warning("%s", pair_note)
    if cand.n == 0:
        why = "its arr_0 is empty" if cand.kind == "npz" and npz_images_shape(cand.path) else \
            f"an .npz needs arr_0, (N, H, W, 3) uint8; its arrays: {', '.join(map(repr, npz_members(cand.path))) or 'none'}"
        raise DataError(f"{candidates!r} holds no images ({why}).")
    if ref.n == 0 and any(s.kind == "paired" for s in specs):
        raise DataError(f"{references!r} holds no images (an .npz needs arr_0); paired metrics "
                        f"({', '.join(s.name for s in specs if s.kind == 'paired')}) compare image to image.")
    stats = ref.stats(*_stats_wanted(specs))  # checked (dtype, shape, finite) before any model loads
    cand_note = candidate_stats_note(cand, flags)
    if cand_note and rank == 0:
        log.warning("%s", cand_note)
    if stats and rank == 0:  # a reference batch with some statistics: say which metrics read its images instead
        for s in specs:
            if s.reference_stats_keys and not _stats_used(s, stats):
                missing = "/".join(k for k in s.reference_stats_keys if k not in stats)
                log.warning("%s holds %s but no %s: %s is computed from its %d images, not from stored statistics",
                            ref.path.name, "/".join(stats), missing, s.name, ref.n)
    unserved = [s.name for s in specs if s.reads_references(stats)]
    if ref.n == 0 and unserved:
        raise DataError(f"{references!r} holds no images (arr_0) and its statistics do not cover "
                        f"{', '.join(unserved)}; only fid/sfid can use stored statistics.")
    check_image_counts(tuple(s.name for s in specs), ref.n, cand.n, stats=tuple(stats),
                       where=(f"{flags[0]} {references!r}", f"{flags[1]} {candidates!r}"))
    dev = resolve_device(device)
    ev = Evaluator(tuple(s.name for s in specs), dev, options=options, reference=ReferenceSet(ref.id, ref.n) if ref.n else None)
    ev.check_weights()
    if stats:
        ev.set_reference_stats(stats)
    paired = any(s.kind == "paired" for s in specs)
    # resume state: metric states, this rank's position per phase, skips and upscales so far
    work = WorkState(results_dir, _score_key(ref, cand, ev, resolution, options), rank) if write else None
    pos: dict[str, int] = {}
    count = {"n": 0}  # candidates used so far (a dict: _stream updates it, checkpoint() saves it)
    saved_skips: list[tuple[str, str]] = []
    saved_upscaled: list[str] = []
    # kept in the resume state, as eval does: a job killed between writing its rows and removing the
    # state rewrites the same run file when resumed, instead of adding a duplicate run
    run_id = new_run_id()
    if work is not None:
        work.acquire()
        st = work.load()
        if st is not None and st.get("world") == world and len(st["metrics"]) == len(ev.metrics):
            ev.merge(st["metrics"])
            pos, count["n"] = dict(st["pos"]), int(st["n_cand"])
            saved_skips, saved_upscaled = [tuple(x) for x in st["skipped"]], list(st["upscaled"])
            t0 -= float(st.get("seconds", 0.0))
            run_id = str(st.get("run_id", run_id))
            log.info("resuming the scoring of %s: %s already done", candidates,
                     ", ".join(f"{n} {k}" for k, n in pos.items()))

    def checkpoint() -> None:
        if work is not None:
            work.save({"world": world, "pos": pos, "n_cand": count["n"], "metrics": ev.states(),
                       "skipped": saved_skips + [(x.path, x.reason) for x in ref.skipped + cand.skipped],
                       "upscaled": saved_upscaled + ref.upscaled + cand.upscaled, "seconds": time.perf_counter() - t0,
                       "run_id": run_id})

    try:
        # the stop signals only set a flag, read after each batch (only where there is progress to save)
        with StopOnSignal(STOP_SIGNALS if work is not None else ()) as preempt:
            def batch_done(k: int) -> None:  # after batch k (0-based) of a phase: the periodic save, or a stop
                signum = preempt.local()
                if (k + 1) % save_every == 0 or signum:
                    checkpoint()
                if signum:
                    where = ", ".join(f"{n} {phase}" for phase, n in pos.items())
                    raise Preempted.saved(signum, f"after {where}{of_rank(rank, world)}")

            _stream(ev, ref, cand, specs, paired, batch_size, rank, world, pos, count, on_progress, batch_done,
                    flags, default_workers(num_workers, dev))  # image folders decode in workers on a GPU, as in eval
        n_cand = count["n"]
        from raebench.folders import Skip

        skipped = [Skip(p, r) for p, r in saved_skips] + ref.skipped + cand.skipped
        upscaled = saved_upscaled + ref.upscaled + cand.upscaled
        ev.finish()
        states = None  # with several ranks, on rank 0: every rank's metric states, in rank order
        if world > 1:
            import torch.distributed as td

            from raebench.distributed import gather_to_rank0

            states = gather_to_rank0(ev.states())  # only rank 0 merges and computes
            mine = {"n": n_cand, "skipped": [(x.path, x.reason) for x in skipped], "upscaled": upscaled}
            gathered: list = [None] * world
            td.all_gather_object(gathered, mine)
            n_cand = sum(g["n"] for g in gathered)
            skipped = [Skip(p, r) for g in gathered for p, r in g["skipped"]]
            upscaled = [p for g in gathered for p in g["upscaled"]]

        def make_scorer():  # run by rank 0 alone (_finish): the states of all ranks merged in rank order
            if world == 1:
                return ev
            scorer = Evaluator(tuple(s.name for s in specs), dev, options=options)
            if stats:
                scorer.set_reference_stats(stats)
            for per_rank in states:
                scorer.merge(per_rank)
            return scorer

        outcome = _finish(make_scorer, ev, n_cand, skipped, upscaled, ref, cand, references, candidates, name, domain,
                          resolution, dev, world, paired, stats, t0, write, rank, results_dir, run_id, pair_note,
                          cand_note)
        if world > 1:
            td.barrier()  # rank 0 has written the rows before any rank removes its resume state
    except BaseException:
        if work is not None:  # keep saved progress for a resume; a run that saved none leaves nothing
            work.release(remove=not work.path.exists())
        raise
    if work is not None:
        work.release(remove=True)
    return outcome


def candidate_stats_note(cand: ImageSource, flags: tuple[str, str] = ("--references", "--candidates")) -> str:
    """A warning for candidates in an ``.npz`` that also holds ADM statistics (``mu``/``sigma``...):
    raebench scores candidates from their images only, where the ADM evaluator would take a sample
    file's stored ``mu``/``sigma`` instead; such a file is most often the reference batch given on
    the wrong side. "" when the candidates hold none."""
    if cand.kind != "npz":
        return ""
    held = [k for k in ADM_STATS_KEYS if k in npz_members(cand.path)]
    if not held:
        return ""
    return (f"{flags[1]} {cand.path.name} holds stored statistics ({', '.join(held)}), which are not used: candidates "
            f"are scored from their images (the ADM evaluator would use a sample file's mu/sigma instead); if it is "
            f"the reference batch, swap {flags[1]} and {flags[0]}")


def _stats_used(spec, stats: dict) -> tuple[str, ...]:
    """The stored-statistics keys that stand in for ``spec``'s reference features (() when none)."""
    keys = tuple(spec.reference_stats_keys)
    return keys if keys and set(keys) <= set(stats) else ()


def stats_digest(stats: dict, keys: tuple[str, ...]) -> str:
    """SHA-256 (16 hex digits) of the stored statistics ``keys`` as used (float64, C order), for
    provenance: the ``.npz`` fingerprint covers only its size and first and last MiB."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for k in keys:
        a = np.ascontiguousarray(stats[k], dtype=np.float64)
        h.update(f"{k}:{a.shape}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _stats_wanted(specs) -> tuple[tuple[str, ...], dict[str, int]]:
    """The stored-statistics keys the metrics ``specs`` can use, and the feature width each mean
    must have (``mu``: 2048, Inception pool3), from the extractor specs, without building anything."""
    from raebench.metrics import EXTRACTORS

    keys: list[str] = []
    widths: dict[str, int] = {}
    for s in specs:
        if not s.reference_stats_keys:
            continue
        keys += [k for k in s.reference_stats_keys if k not in keys]
        ext, out = s.reference_inputs[0].split("/")
        d = EXTRACTORS.get(ext).dim(out)
        if d is not None:
            widths[s.reference_stats_keys[0]] = d
    return tuple(keys), widths


def _score_key(ref: ImageSource, cand: ImageSource, ev, resolution: int | None, options) -> str:
    """Identity of a scoring for resuming: both image sets, the metric versions, resolution and
    metric options; not the batch size or device."""
    from raebench.eval_progress import work_key

    return "score-" + work_key({"references": ref.id, "candidates": cand.id, "metrics": sorted(s.version for s in ev.specs),
                                "resolution": resolution, "options": options, "kind": "score"})


def _rank_views(done: int | None, needs: bool, cached: bool, world: int) -> list[tuple[int | None, bool, bool]]:
    """Every rank's ``(saved reference position, needs reference features, reads them from the
    cache)`` (one process: its own). Each rank looks at the feature cache when it gets here, so
    another job that publishes the cache meanwhile can leave the ranks of one run seeing it or not."""
    if world == 1:
        return [(done, needs, cached)]
    from raebench.distributed import from_rank0, gather_to_rank0

    return [tuple(v) for v in from_rank0(gather_to_rank0((done, needs, cached)))]


def _reference_plan(done: int | None, views: list[tuple[int | None, bool, bool]]) -> str:
    """How this rank gets its references: ``"cache"`` (rank 0 feeds every cached feature), ``"stream"``
    (from its saved position ``done``, or 0) or ``"done"``. ``views`` is every rank's ``(position,
    needs, cached)`` (position None: no progress saved; 0: fed from the cache). The choice of the
    cache must be the same on every rank: a rank killed before its first save must stream its share
    if another rank has saved a partial stream, or rank 0 would feed every reference from a cache
    filled meanwhile while that rank streams its share again (counted twice); and the cache serves
    the run only if every rank found it (a rank that looked before another job published it streams
    its share, so the others stream theirs, served from the cache by index)."""
    partial = any(d for d, _, _ in views if d is not None)
    if done == 0:
        return "done"
    if done is None and not partial and all(c and not n for _, n, c in views):
        return "cache"
    return "stream" if done is not None or partial or any(n for _, n, _ in views) else "done"


def _stream(ev, ref, cand, specs, paired, batch_size, rank, world, pos, count, on_progress, batch_done,
            flags, workers: int = 0) -> None:
    """Feed this rank's shard to ``ev`` from the positions in ``pos``; ``pos`` and the candidates
    used, ``count["n"]``, are updated in place, and ``batch_done(k)`` after batch ``k`` of each phase
    saves them every ``save_every`` batches (or on a stop signal)."""
    from raebench.checks import check_sizes
    from raebench.distributed import shard

    if paired:
        order = pair_order(ref, cand, flags)
        partner = {c: r for r, c in enumerate(order)}
        lo, hi = shard(ref.n, rank, world)
        mine = list(range(lo, hi))[pos.get("pairs", 0):]
        # batch k of both sides covers the same pairs (a batch of unreadable files comes back empty)
        batches = zip(ref.batches(batch_size, mine, workers), cand.batches(batch_size, [order[i] for i in mine], workers),
                      strict=True)
        start = pos.get("pairs", 0)
        for k, ((ri, rimg), (ci, cimg)) in enumerate(batches):
            # a file skipped on one side drops its partner on the other
            have_c, have_r = set(ci.tolist()), set(ri.tolist())
            keep_r = torch.tensor([order[i] in have_c for i in ri.tolist()], dtype=torch.bool)
            keep_c = torch.tensor([partner[i] in have_r for i in ci.tolist()], dtype=torch.bool)
            if keep_c.any() and rimg.shape[1:] != cimg.shape[1:]:
                raise size_mismatch(ref, cand, tuple(rimg.shape[2:]), tuple(cimg.shape[2:]))
            if rimg.shape[0]:  # folders read as they are: their size is known from the first image
                check_sizes(batch_size, None, tuple(s.name for s in specs), min(rimg.shape[-2:]))
            if rimg.shape[0]:  # every readable reference reaches the feature cache, paired or not
                ev.update(rimg, cimg[keep_c], index=ri, keep=keep_r)
            count["n"] += int(keep_c.sum())
            pos["pairs"] = start + min((k + 1) * batch_size, len(mine))
            if on_progress:
                on_progress("pairs", pos["pairs"], hi - lo)
            batch_done(k)
        return
    # the cache decision is agreed by every rank (_reference_plan); only rank 0 feeds cached features.
    # pos["references"]: 0 once fed from the cache (on every rank), else the references streamed so far;
    # a resumed run that streamed part of them continues streaming even if another job has since
    # filled the cache (the cache serves their features by index): the saved states hold only those
    done = pos.get("references")
    plan = _reference_plan(done, _rank_views(done, ev.needs_reference_features, bool(ev._ref_cached), world))
    if plan == "cache":
        if rank == 0:  # in the batches a streaming run feeds, so the float64 sums round alike
            ev.references_from_cache(chunk=batch_size)
        pos["references"] = 0
    elif plan == "stream":
        lo, hi = shard(ref.n, rank, world)
        start = done or 0
        todo = list(range(lo, hi))[start:]
        for k, (ri, rimg) in enumerate(ref.batches(batch_size, todo, workers)):
            if rimg.shape[0]:
                ev.update_reference(rimg, ri)
            pos["references"] = start + min((k + 1) * batch_size, len(todo))
            if on_progress:
                on_progress("references", pos["references"], hi - lo)
            batch_done(k)
    lo, hi = shard(cand.n, rank, world)
    start = pos.get("candidates", 0)
    todo = list(range(lo, hi))[start:]
    for k, (_, cimg) in enumerate(cand.batches(batch_size, todo, workers)):
        if cimg.shape[0]:
            ev.update_candidates(cimg)
            count["n"] += cimg.shape[0]
        pos["candidates"] = start + min((k + 1) * batch_size, len(todo))
        if on_progress:
            on_progress("candidates", pos["candidates"], hi - lo)
        batch_done(k)


def _finish(make_scorer, ev, n_cand, skipped, upscaled, ref, cand, references, candidates, name, domain, resolution,
            dev, world, paired, stats, t0, write, rank, results_dir, run_id: str, pair_note: str = "",
            cand_note: str = "") -> ScoreOutcome:
    from raebench.distributed import on_rank0
    from raebench.metrics import METRICS, higher_is_better
    from raebench.results import ResultRow, write_rows

    if n_cand == 0:
        raise RaebenchError(f"Nothing to score: no readable candidate image in {candidates!r}.")

    def final() -> tuple:
        scorer = make_scorer()
        return (*scorer.compute(), dict(scorer.failed))

    values, versions, notes, failed = on_rank0(final)  # the other ranks wait for rank 0's numbers
    if pair_note:  # on the rows of the metrics that compare image to image
        paired_names = {o for s in METRICS if s.kind == "paired" for o in (s.name, *(n for n, _ in s.outputs))}
        notes = {k: "; ".join(x for x in (v, pair_note if k in paired_names else "") if x) for k, v in notes.items()}
    if not values:
        raise RaebenchError(f"Nothing to write for {candidates!r}: {'; '.join(failed.values())}.")
    # per result name, the stored statistics that stood in for its reference side: only those rows were
    # computed from them (precision/recall of the same run read the reference batch's images)
    spec_of = {o: s for s in METRICS for o in (s.name, *(n for n, _ in s.outputs))}
    used = {k: _stats_used(spec_of[k], stats) if k in spec_of else () for k in values}
    if cand_note:  # the rows where the ADM evaluator would have used the candidates' statistics
        short = "the candidates' stored statistics were not used (the ADM evaluator would use them)"
        notes = {k: "; ".join(x for x in (v, short if spec_of.get(k) is not None and spec_of[k].reference_stats_keys
                                          else "") if x) for k, v in notes.items()}
    seconds = time.perf_counter() - t0
    res = resolution or _image_size(cand)
    sampling = cand.sampling_settings()  # how raebench sample made these candidates: model, sampler, guidance, seed

    def provenance(k: str) -> dict:
        protocol = "paired" if paired else "unpaired"
        if not used[k]:
            return {"protocol": protocol}
        return {"protocol": f"{protocol}, stored reference statistics",
                "reference_statistics": {"keys": list(used[k]), "sha256": stats_digest(stats, used[k])}}

    rows = [
        ResultRow(
            tokenizer=name or cand.name, weights_id="none", dataset=ref.name, split="all", domain=domain,
            resolution=res, n_images=n_cand, metric=k, value=v, higher_is_better=higher_is_better(k),
            metric_version=versions[k], data_fingerprint=ref.id, skipped=len(skipped), seconds=round(seconds, 3),
            device=str(dev) + (f" x{world}" if world > 1 else ""), notes=notes[k], run_id=run_id,
            candidates_fingerprint=cand.id, extra={**provenance(k), "candidates": str(candidates), "candidates_fingerprint": cand.id,
                   "references": str(references), "n_references": ref.n, "metric_weights": ev.weights_ids(),
                   "skipped_files": [f"{s.path}: {s.reason}" for s in skipped][:1000], "upscaled": len(upscaled),
                   **({"sampling": sampling} if sampling else {})},
        )
        for k, v in values.items()
    ]
    if write and rank == 0:
        write_rows(rows, results_dir, run_id)
    if upscaled and rank == 0:
        log.warning("%d image(s) were smaller than %d px and were upscaled by the crop", len(upscaled), resolution)
    return ScoreOutcome(rows, paired, ref.n, n_cand, seconds, skipped, upscaled, failed)


def _image_size(src: ImageSource) -> int:
    for _, imgs in src.batches(1):
        if imgs.shape[0]:
            return int(imgs.shape[-1])
    return 0
