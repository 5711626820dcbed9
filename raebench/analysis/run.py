"""``raebench analyze``: one pass over a dataset for every tokenizer and reference, then diagnostics.

The pass reads each image once. Per batch of uint8 ADM crops, every reference encoder runs once and
every tokenizer encodes the batch; each tokenizer accumulates :class:`LatentStats`, its token-mean
pooled latents, and keeps the latents of two seeded subsets of images (the first readable ones of a
seeded permutation): ``n_diag`` for the decoder diagnostics and, with the diffusability probe,
``probe_images`` to train on. Images whose latents contain NaN/Inf are excluded for that tokenizer
(counted in ``nonfinite``), never averaged in.

After the pass, per tokenizer: the spectrum summary; linear probe and kNN accuracy on a stratified
50/50 split (when the data has class subfolders); mutual-kNN, CKNNA and linear CKA against every
reference; decoder robustness and interpolation smoothness on the diagnostic subset; optionally the
diffusability probe. Rows go to the results tables (one run file per tokenizer, source "measured",
a metric version per row, so they show in ``compare`` and ``leaderboard``); figures and the resolved
config go to ``<results>/analysis/<run id>/``.

Re-running computes only what is missing (:mod:`raebench.analysis.reuse`): a tokenizer whose rows are
all stored is not encoded, and one with some parts missing writes only those; a stored part whose
run did not draw its figures (killed while drawing) counts as missing when this run draws figures
(:func:`raebench.analysis.reuse.undrawn_parts`). A part measured writes
every row expected of it; a value the data cannot give (an empty test split, too few valid images for
k, features or latents that do not vary) is a NaN row whose notes say why, never a confident number.
Settings are checked (:func:`check_config`) before any data is read or any model loads.

Under ``torchrun`` each rank encodes a contiguous shard; rank 0 gathers the per-image features
(pooled latents, reference features, labels, the diagnostic subsets) in rank order, which is data
order, and merges the float64 spectrum sums exactly (:meth:`LatentStats.merge`), so every number
equals the single-process one. The process group is then released and rank 0 alone runs the rest
(the diagnostics are small; the stage-2 trainer behind the diffusability probe must not see a group
the other ranks have left) and writes rows and figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from raebench.analysis.config import AnalyzeConfig, check_config, metric_versions
from raebench.analysis.measure import TokenizerReport, fill_from_rows, measure, probe_key, result_rows
from raebench.analysis.reuse import (
    drawing, expected_rows, missing_parts, part_of, reusable_rows, run_file_id, stored_rows, undrawn_parts,
)
from raebench.analysis.stream import Accumulator, Keep
from raebench.data import resolve_data
from raebench.folders import Skip
from raebench.loaders import ImageDataset, default_workers, make_loader
from raebench.distributed import from_rank0
from raebench.errors import MissingWeightsError, RaebenchError
from raebench.results import atomic_write_bytes, check_writable, new_run_id, write_rows

log = logging.getLogger(__name__)


@dataclass
class AnalyzeOutcome:
    reports: list[TokenizerReport]
    plots: list[Path]
    out_dir: Path | None
    n_images: int
    seconds: float


class _Precision:
    """A tokenizer whose encode and decode run under ``--precision`` autocast; outputs are float32.
    Every other attribute (name, weights_id, ...) is the tokenizer's own."""

    def __init__(self, tok, device: torch.device, precision: str) -> None:
        self.__dict__.update(tok=tok, _device=device, _precision=precision)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["tok"], name)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        from raebench.eval_config import _autocast

        with _autocast(self._device, self._precision):
            return self.tok.encode(x).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        from raebench.eval_config import _autocast

        with _autocast(self._device, self._precision):
            return self.tok.decode(z).float()


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


def _reference_specs(cfg: AnalyzeConfig) -> dict:
    """name -> ReferenceSpec for ``cfg.references`` (nothing is loaded)."""
    from raebench.analysis.references import REFERENCES

    unknown = sorted(set(dict(cfg.reference_weights)) - set(cfg.references))
    if unknown:
        raise RaebenchError(f"--reference-weights names {', '.join(unknown)}, which is not among --reference {','.join(cfg.references)}.")
    specs = [REFERENCES.get(n) for n in cfg.references]
    return {sp.name: sp for sp in specs}


@contextlib.contextmanager
def _reference_hint():
    """A missing reference's weights: say how to analyse without it."""
    try:
        yield
    except MissingWeightsError as e:
        raise MissingWeightsError(f"{e} To analyse without it, leave it out of --reference (or pass --reference none).") from None


def _reference_identities(cfg: AnalyzeConfig, names: list[str], device: torch.device,
                          ) -> tuple[dict[str, str | None], dict[str, tuple]]:
    """-> (name -> fingerprint of the weights each reference resolves to (None: weightless), the
    references that had to be built to know it (spec, encoder), kept for the pass)."""
    from raebench.analysis.references import reference_identity

    local = dict(cfg.reference_weights)
    ids, built = {}, {}
    for name in names:
        with _reference_hint():
            spec, ids[name], enc = reference_identity(name, local.get(name), device)
        if enc is not None:
            built[name] = (spec, enc)
    return ids, built


def _build_references(cfg: AnalyzeConfig, names: list[str], device: torch.device,
                      built: dict[str, tuple]) -> dict[str, tuple]:
    """name -> (spec, encoder) of ``names``; ``built``: those already built (by _reference_identities)."""
    from raebench.analysis.references import build_reference

    local = dict(cfg.reference_weights)
    refs = {}
    for name in names:
        if name in built:
            refs[name] = built[name]
            continue
        with _reference_hint():
            spec, enc = build_reference(name, local.get(name), device)
        refs[spec.name] = (spec, enc)
    return refs


def _build_tokenizers(cfg: AnalyzeConfig, device: torch.device) -> list:
    from raebench.eval_config import EvalConfig, build_tokenizer_from_config
    from raebench.weights import named_flags

    opts = {"weights": dict(cfg.weights), "decoder": dict(cfg.decoder), "stats": dict(cfg.stats)}
    for flag, given in opts.items():
        stray = sorted(set(given) - set(cfg.tokenizers))
        if stray:
            raise RaebenchError(f"--{flag} is given for {', '.join(stray)}, which is not among the analysed tokenizers (--tokenizer).")
    toks = []
    for n in cfg.tokenizers:
        with named_flags("raebench analyze", n, ("--weights", "--decoder", "--stats")):  # NAME=PATH options
            toks.append(build_tokenizer_from_config(EvalConfig(tokenizer=n, resolution=cfg.resolution,
                                                               **{k: v.get(n) for k, v in opts.items()}), device))
    toks += [build_tokenizer_from_config(EvalConfig(tokenizer="official-config", tokenizer_config=c, resolution=cfg.resolution), device)
             for c in cfg.tokenizer_configs]
    return toks


def _plan(cfg: AnalyzeConfig, toks: list, data, expected: dict, rank: int, world: int,
          ) -> tuple[list[set[str]], list[list], list[list[str]]]:
    """Per tokenizer: the parts to measure (decided on rank 0, the same on every rank) and, on rank
    0, the stored rows of the others and notes on the parts measured again for their figures."""
    from raebench.results import load

    todo: list[set[str]] = []
    reused: list[list] = []
    notes: list[list[str]] = []
    if rank == 0:
        df = None if cfg.recompute else load(cfg.results_dir)
        fp = data.images.fingerprint()
        for tok in toks:
            notes.append([])
            if df is None:
                todo.append(set(expected))
                reused.append([])
                continue
            have = stored_rows(df, tok.name, getattr(tok, "weights_id", "none"), data.name, fp, cfg.resolution, cfg.seed)
            todo.append(missing_parts(expected, have))
            if cfg.write and cfg.plots:  # the figures of a run killed while drawing (reuse.undrawn_parts)
                undrawn = undrawn_parts(have, expected, todo[-1], tok.name, Path(cfg.results_dir) / "analysis")
                todo[-1] |= set(undrawn)
                by_run: dict[str, set[str]] = {}
                for stamp, files in undrawn.values():
                    by_run.setdefault(stamp, set()).update(files)
                notes[-1] += [f"measured {', '.join(sorted(p for p, (s, _) in undrawn.items() if s == stamp))} again: "
                              f"run {stamp} stored these rows but not its figures {', '.join(sorted(files))}"
                              for stamp, files in sorted(by_run.items())]
            reused.append(reusable_rows(have, expected, todo[-1]))
    return from_rank0(todo), reused, notes


def _gather(payload: dict, rank: int, world: int) -> list[dict] | None:
    """Every rank's ``payload`` on rank 0, in rank order (None elsewhere); then the process group
    is released (see the module docstring)."""
    import torch.distributed as td

    out = [None] * world if rank == 0 else None
    td.gather_object(payload, out, dst=0)
    td.barrier()
    td.destroy_process_group()
    return out


@contextlib.contextmanager
def _solo():
    """Hide torchrun's WORLD_SIZE/RANK/LOCAL_RANK from what rank 0 runs alone after the gather: the
    stage-2 trainer behind the diffusability probe would otherwise start a new process group and
    wait for ranks that have left."""
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def analyze(
    cfg: AnalyzeConfig,
    tokenizers: list | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AnalyzeOutcome:
    """Run the analysis; ``tokenizers`` (built ones) override building ``cfg.tokenizers`` by name.

    Under torchrun, ranks other than 0 return an outcome without reports (rank 0 has them all).
    """
    from raebench.analysis.perceptual import PERCEPTUAL_CHOICES, build_distance
    from raebench.distributed import rank_world, shard
    from raebench.eval_config import resolve_device

    t0 = time.perf_counter()
    rank, world = rank_world()
    if not cfg.tokenizers and not cfg.tokenizer_configs and not tokenizers:
        raise RaebenchError("Give at least one --tokenizer (or --tokenizer-config) to analyse.")
    check_config(cfg)
    if cfg.write:
        check_writable(cfg.results_dir)
    data = resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    if cfg.diffusability and data.n < cfg.probe.batch_size:
        raise RaebenchError(f"{data.name!r} has {data.n} images, fewer than one batch of the diffusability probe "
                            f"(--probe-batch-size {cfg.probe.batch_size}); lower it or leave out --diffusability.")
    device = resolve_device(cfg.device)
    # the perceptual distance serves the decoder diagnostics only: with --n-diag 0 none is built, nor
    # are its missing weights warned about (the choice is still checked)
    if cfg.n_diag > 0 or cfg.perceptual not in PERCEPTUAL_CHOICES:
        distance, dist_name, dist_version, dist_reason = build_distance(cfg.perceptual, device, cfg.resolution)
    else:
        distance, dist_name, dist_version, dist_reason = None, None, None, None
    toks = tokenizers if tokenizers is not None else _build_tokenizers(cfg, device)
    names = [t.name for t in toks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RaebenchError(f"Two tokenizers are named {', '.join(dup)}; analyse them in separate runs.")
    if cfg.precision != "fp32":
        toks = [_Precision(t, device, cfg.precision) for t in toks]
    ref_specs = _reference_specs(cfg)
    # the reference weights are part of the rows' versions: other weights are missing rows
    ref_ids, prebuilt = _reference_identities(cfg, list(ref_specs), device)
    ref_versions = {n: sp.row_version(ref_ids[n]) for n, sp in ref_specs.items()}
    versions = metric_versions(cfg)
    n_classes = len(data.images.classes)
    expected = expected_rows(cfg, versions, ref_versions, n_classes, data.n, dist_name, dist_version)
    todo, reused, plan_notes = _plan(cfg, toks, data, expected, rank, world)
    active = [i for i, parts in enumerate(todo) if parts]
    # a pass loads the references that some part needs: the alignment rows missing, every one for the probe's FD
    needs_all_refs = any("diffuse" in todo[i] for i in active)
    ref_names = [n for n in ref_specs if needs_all_refs or any(f"align:{n}" in todo[i] for i in active)]
    refs = _build_references(cfg, ref_names, device, prebuilt) if active else {}
    del prebuilt  # the references no part needs are released before the pass

    accs = {i: Accumulator(toks[i], Keep(data.n, cfg.n_diag if todo[i] & {"robust", "interp"} else 0, cfg.seed),
                            Keep(data.n, cfg.probe_images if "diffuse" in todo[i] else 0, cfg.seed + 1))
            for i in active}
    ref_feats: dict[str, list[torch.Tensor]] = {n: [] for n in refs}
    labels: list[torch.Tensor] = []
    skipped = list(data.images.skipped) if rank == 0 else []
    lo, hi = shard(data.n, rank, world)
    if active:
        loader = make_loader(ImageDataset(data.images, cfg.resolution), cfg.batch_size, default_workers(cfg.num_workers, device),
                             pin_memory=device.type == "cuda", indices=range(lo, hi))
        done = 0
        for batch in loader:
            skipped.extend(batch["skipped"])
            done += len(batch["skipped"]) + batch["image"].shape[0]
            if batch["image"].shape[0]:
                images = batch["image"].to(device)  # (N, 3, R, R) uint8
                labels.append(batch["label"])
                with torch.no_grad():
                    for name, (_, enc) in refs.items():
                        ref_feats[name].append(enc(images).double().cpu())
                for acc in accs.values():
                    acc.update(images, batch["index"].tolist())
            if on_progress:
                on_progress("encode", done, hi - lo)
    if world > 1:  # rank 0 takes every shard, in rank order; the others are done
        gathered = _gather({"labels": labels, "feats": ref_feats, "skipped": [(x.path, x.reason) for x in skipped],
                            "accs": {i: a.state() for i, a in accs.items()}}, rank, world)
        if rank != 0:
            return AnalyzeOutcome([], [], None, 0, time.perf_counter() - t0)
        for g in gathered[1:]:
            labels += g["labels"]
            for n in ref_feats:
                ref_feats[n] += g["feats"][n]
            skipped += [Skip(*x) for x in g["skipped"]]
            for i, acc in accs.items():
                acc.merge(g["accs"][i], device)

    if active and not labels:
        raise RaebenchError(f"Nothing to analyse on {data.name!r}: no image was readable ({len(skipped)} skipped).")
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    feats = {n: torch.cat(v) for n, v in ref_feats.items()}

    reports: list[TokenizerReport] = []
    stamp = new_run_id()
    with contextlib.ExitStack() as stack:  # without --results writes, probe runs go to a temporary folder
        if world > 1:
            stack.enter_context(_solo())
        if cfg.write and cfg.plots and active:  # at work until its figures are drawn (reuse.undrawn_parts)
            stack.enter_context(drawing(Path(cfg.results_dir) / "analysis", stamp))
        probe_root = (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raebench-probe-")))
                      if cfg.diffusability and not cfg.write else Path(cfg.results_dir) / "analysis" / "probes")
        for i, tok in enumerate(toks):
            if i not in accs:
                rows = reused[i]
                rep = TokenizerReport(tok.name, getattr(tok, "weights_id", "none"), (),
                                      max((r.n_images for r in rows), default=0), 0, reused=rows)
                rep.notes.append(f"every row reused from {cfg.results_dir!r} (--recompute measures again)")
                fill_from_rows(rep, rows)
                reports.append(rep)
                continue
            acc = accs[i]
            rep = measure(cfg, acc, todo[i], y, n_classes, feats, refs, distance, dist_name,
                                     probe_root / probe_key(cfg, acc.tok, data), on_progress)
            if dist_reason and cfg.perceptual != "none":
                rep.notes.append(f"LPIPS left out: {dist_reason}")
            rep.computed, rep.reused = tuple(sorted(todo[i])), reused[i]
            rep.notes += plan_notes[i]
            fill_from_rows(rep, rep.reused)  # the figures show the stored values of the parts not measured now
            rows = result_rows(cfg, rep, data, device, world, versions, dist_version, ref_versions, ref_ids, skipped,
                         time.perf_counter() - t0, {p: expected[p] for p in todo[i]})
            rep.rows = [r for r in rows if part_of(r.metric) in todo[i]]
            if rep.reused:  # said on screen, not stored in the new rows
                rep.notes.append(f"reused stored rows for {', '.join(sorted(set(expected) - todo[i]))}")
            if cfg.write and active and rep.rows:  # stored as each tokenizer finishes: a crash loses only the one at work
                write_rows(rep.rows, cfg.results_dir, run_file_id(stamp, rep.name))
            reports.append(rep)
        out_dir: Path | None = None
        plots: list[Path] = []
        if cfg.write and active:
            out_dir = Path(cfg.results_dir) / "analysis" / stamp
            config = {**asdict(cfg), "dataset_resolved": data.name, "data_fingerprint": data.images.fingerprint(),
                      "n_images": int(y.numel()), "perceptual_resolved": dist_name, "versions": versions,
                      "reference_versions": ref_versions, "world_size": world,
                      "computed": {rep.name: list(rep.computed) for rep in reports}}
            atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=2, default=str).encode())
            if cfg.plots:
                plots = _plot_all(reports, out_dir, n_classes)
    n_seen = int(y.numel()) if active else max((r.n_images for r in reports), default=0)
    return AnalyzeOutcome(reports, plots, out_dir, n_seen, time.perf_counter() - t0)


def _plot_all(reports: list[TokenizerReport], out_dir: Path, n_classes: int) -> list[Path]:
    from raebench.analysis import plots

    originals = next((r.robustness.examples["original"] for r in reports
                      if r.robustness is not None and "original" in r.robustness.examples), None)
    made = [
        plots.plot_robustness(reports, out_dir / "robustness.png"),
        plots.plot_spectra(reports, out_dir / "spectra.png"),
        plots.plot_alignment(reports, out_dir / "alignment.png", n_classes),
        plots.plot_interpolation(reports, out_dir / "interpolation.png"),
        plots.plot_reconstructions(originals, reports, out_dir / "reconstructions.png") if originals is not None else None,
    ]
    return [p for p in made if p is not None]
