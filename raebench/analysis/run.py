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
all stored is not encoded, and one with some parts missing writes only those. A part measured writes
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
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from raebench.analysis import alignment as al
from raebench.analysis.diagnostics import (
    DEFAULT_INTERP_STEPS, DEFAULT_SIGMAS, InterpolationResult, RobustnessCurve, decoder_robustness,
    interpolation_pairs, interpolation_smoothness, rmse_distance,
)
from raebench.analysis.diffusability import ProbeConfig, ProbeResult, diffusability_probe
from raebench.analysis.reuse import (
    ALIGN_METRICS, SPECTRUM_METRICS, expected_rows, higher_is_better, missing_parts, part_of, reusable_rows, sigma_tag,
    stored_rows,
)
from raebench.analysis.spectrum import NEAR_ZERO_REL, TOPK_ENERGY, SpectrumSummary
from raebench.analysis.stream import Accumulator, Keep
from raebench.data import ImageDataset, Skip, make_loader, resolve_data
from raebench.errors import MissingWeightsError, RaebenchError
from raebench.results import ResultRow, atomic_write_bytes, check_writable, new_run_id, write_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeConfig:
    """Everything that defines one analysis (the CLI flags, one to one)."""

    tokenizers: tuple[str, ...]
    tokenizer_configs: tuple[str, ...] = ()  # official RAE YAMLs, analysed beside the named tokenizers
    # per-tokenizer options, (tokenizer name, local path), as eval's --weights / --decoder / --stats
    weights: tuple[tuple[str, str], ...] = ()
    decoder: tuple[tuple[str, str], ...] = ()
    stats: tuple[tuple[str, str], ...] = ()
    precision: str = "fp32"  # or "bf16": autocast around the tokenizer's encode/decode only
    recompute: bool = False  # measure every row again instead of reusing stored ones
    references: tuple[str, ...] = ("dinov2-b",)
    reference_weights: tuple[tuple[str, str], ...] = ()  # (reference name, local file)
    data: str | None = None
    dataset: str | None = None
    domain: str | None = None
    resolution: int = 256
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    num_workers: int = 0
    results_dir: str = "results"
    write: bool = True
    plots: bool = True
    # semantic alignment
    probe_method: str = "lbfgs"
    probe_batchnorm: bool = True
    knn_k: int = al.KNN_K
    mutual_k: int = al.MUTUAL_K
    cka_debiased: bool = False
    align_images: int = 1024  # mutual-kNN / CKNNA / CKA on a seeded subset of this many (N x N kernels)
    # decoder diagnostics
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    n_diag: int = 16
    interp_pairs: int = 4
    interp_steps: int = DEFAULT_INTERP_STEPS
    perceptual: str = "auto"
    # diffusability probe (off by default: it trains a model)
    diffusability: bool = False
    probe_images: int = 512
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class TokenizerReport:
    """Everything measured for one tokenizer (what rows and plots are made from)."""

    name: str
    weights_id: str
    latent_shape: tuple[int, ...]
    n_images: int
    nonfinite: int
    n_align: int = 0  # images behind the alignment scores
    spectrum: SpectrumSummary | None = None
    probe: dict[str, float] = field(default_factory=dict)  # "linear" / "knn" -> accuracy in [0, 1]
    alignment: dict[str, dict[str, float]] = field(default_factory=dict)  # reference -> metric -> value
    robustness: RobustnessCurve | None = None
    interpolation: InterpolationResult | None = None
    diffusability: ProbeResult | None = None
    grid: dict[str, torch.Tensor] = field(default_factory=dict)  # row label -> uint8 (K, 3, H, W)
    rows: list[ResultRow] = field(default_factory=list)  # measured now (and written)
    reused: list[ResultRow] = field(default_factory=list)  # stored rows of the parts not measured again
    computed: tuple[str, ...] = ()  # the parts measured now (raebench.analysis.reuse)
    notes: list[str] = field(default_factory=list)


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
        from raebench.evaluate import _autocast

        with _autocast(self._device, self._precision):
            return self.tok.encode(x).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        from raebench.evaluate import _autocast

        with _autocast(self._device, self._precision):
            return self.tok.decode(z).float()


# ---------------------------------------------------------------------------------------------
# Metric versions: one place, everything that changes a value
# ---------------------------------------------------------------------------------------------


def _versions(cfg: AnalyzeConfig) -> dict[str, str]:
    bn = "bn" if cfg.probe_batchnorm else "nobn"
    versions = {
        "probe": f"probe-{cfg.probe_method}-{bn}-l2{al.PROBE_L2:g}-meanpool-strat50-seed{cfg.seed}-v1",
        "knn": f"knn-cos-k{cfg.knn_k}-t{al.KNN_TEMPERATURE:g}-meanpool-strat50-seed{cfg.seed}-v1",
        "mknn": f"mknn-k{cfg.mutual_k}-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "cknna": f"cknna-k{cfg.mutual_k}-hsicu-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "cka": f"cka-linear-{'debiased' if cfg.cka_debiased else 'biased'}-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "spectrum": f"latent-spectrum-tokens-f64-nz{NEAR_ZERO_REL:g}tokenrms-v1",
        # v2: the diagnostic images are the first n_diag readable ones of a seeded permutation
        "robust": f"robust-u8-gauss-seed{cfg.seed}-n{cfg.n_diag}-v2",
        # the pairs are drawn from the n_diag kept images: n_diag changes which images are interpolated
        "interp": f"interp-lerp-S{cfg.interp_steps}-pairs{cfg.interp_pairs}-n{cfg.n_diag}-seed{cfg.seed}-v2",
        "diffuse": f"{cfg.probe.version}-img{cfg.probe_images}",
    }
    # bf16 changes every latent: its rows never stand in for fp32 ones (fp32 versions stay as they were)
    return {k: f"{v}-bf16" for k, v in versions.items()} if cfg.precision == "bf16" else versions


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------


def check_config(cfg: AnalyzeConfig) -> None:
    """Settings that cannot work, as one sentence before any data is read or any model loads."""
    from raebench.analysis.diagnostics import MAX_SIGMA, check_sigmas
    from raebench.checks import check_run

    check_run(cfg.batch_size, cfg.resolution, cfg.precision, cfg.num_workers)
    at_least = [("--knn-k", cfg.knn_k, 1), ("--mutual-k", cfg.mutual_k, 1), ("--interp-steps", cfg.interp_steps, 1),
                ("--n-diag", cfg.n_diag, 0), ("--interp-pairs", cfg.interp_pairs, 0)]
    for flag, value, low in at_least:
        if value < low:
            raise RaebenchError(f"{flag} must be at least {low}, got {value}.")
    if cfg.references and cfg.align_images < max(4, cfg.mutual_k + 1):
        raise RaebenchError(f"--align-images must be at least 4 and more than --mutual-k ({cfg.mutual_k}), "
                            f"got {cfg.align_images}.")
    try:
        check_sigmas(cfg.sigmas)
    except ValueError:
        raise RaebenchError(f"--sigmas takes comma-separated numbers in (0, {MAX_SIGMA:g}] such as 0.1,0.25,0.5,1; "
                            f"got {','.join(map(str, cfg.sigmas)) or 'none'}.") from None
    tags = [sigma_tag(s) for s in cfg.sigmas]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise RaebenchError(f"--sigmas lists {', '.join(t[1:] for t in dup)} more than once; give each noise level once.")
    if cfg.diffusability:
        _check_probe(cfg)


def probe_model(name: str) -> str:
    """The canonical stage-2 model name of ``--probe-preset`` (aliases resolved, so the metric
    version names one model one way)."""
    from raebench.stage2.models import MODELS

    if name.strip().lower() not in MODELS:
        raise RaebenchError(f"Unknown --probe-preset {name!r}; it takes a stage-2 model name: {', '.join(MODELS.names())}.")
    return MODELS.canonical(name)


def _check_probe(cfg: AnalyzeConfig) -> None:
    probe_model(cfg.probe.preset)
    at_least = [("--probe-steps", cfg.probe.steps, 1), ("--probe-batch-size", cfg.probe.batch_size, 1),
                ("--probe-samples", cfg.probe.n_samples, 2), ("--probe-sample-steps", cfg.probe.sample_steps, 2)]
    for flag, value, low in at_least:
        if value < low:
            raise RaebenchError(f"{flag} must be at least {low}, got {value}.")
    if cfg.probe_images < cfg.probe.batch_size:
        raise RaebenchError(f"--probe-images {cfg.probe_images} is fewer than one batch of the diffusability probe "
                            f"(--probe-batch-size {cfg.probe.batch_size}); raise it or lower the batch size.")


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
    from raebench.evaluate import EvalConfig, build_tokenizer_from_config

    opts = {"weights": dict(cfg.weights), "decoder": dict(cfg.decoder), "stats": dict(cfg.stats)}
    for flag, given in opts.items():
        stray = sorted(set(given) - set(cfg.tokenizers))
        if stray:
            raise RaebenchError(f"--{flag} is given for {', '.join(stray)}, which is not among the analysed tokenizers (--tokenizer).")
    toks = [build_tokenizer_from_config(EvalConfig(tokenizer=n, resolution=cfg.resolution,
                                                   **{k: v.get(n) for k, v in opts.items()}), device)
            for n in cfg.tokenizers]
    toks += [build_tokenizer_from_config(EvalConfig(tokenizer="official-config", tokenizer_config=c, resolution=cfg.resolution), device)
             for c in cfg.tokenizer_configs]
    return toks


def _from_rank0(obj, world: int):
    import torch.distributed as td

    if world == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def _plan(cfg: AnalyzeConfig, toks: list, data, expected: dict, rank: int, world: int) -> tuple[list[set[str]], list[list]]:
    """Per tokenizer: the parts to measure (decided on rank 0, the same on every rank) and, on rank
    0, the stored rows of the others."""
    from raebench.results import load

    todo: list[set[str]] = []
    reused: list[list] = []
    if rank == 0:
        df = None if cfg.recompute else load(cfg.results_dir)
        fp = data.images.fingerprint()
        for tok in toks:
            if df is None:
                todo.append(set(expected))
                reused.append([])
                continue
            have = stored_rows(df, tok.name, getattr(tok, "weights_id", "none"), data.name, fp, cfg.resolution, cfg.seed)
            todo.append(missing_parts(expected, have))
            reused.append(reusable_rows(have, expected, todo[-1]))
    return _from_rank0(todo, world), reused


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
    from raebench.analysis.perceptual import build_distance
    from raebench.distributed import rank_world, shard
    from raebench.evaluate import resolve_device

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
    distance, dist_name, dist_version, dist_reason = build_distance(cfg.perceptual, device, cfg.resolution)
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
    versions = _versions(cfg)
    n_classes = len(data.images.classes)
    expected = expected_rows(cfg, versions, ref_versions, n_classes, data.n, dist_name, dist_version)
    todo, reused = _plan(cfg, toks, data, expected, rank, world)
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
        loader = make_loader(ImageDataset(data.images, cfg.resolution), cfg.batch_size, cfg.num_workers,
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
    with contextlib.ExitStack() as stack:  # without --results writes, probe runs go to a temporary folder
        if world > 1:
            stack.enter_context(_solo())
        probe_root = (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raebench-probe-")))
                      if cfg.diffusability and not cfg.write else Path(cfg.results_dir) / "analysis" / "probes")
        for i, tok in enumerate(toks):
            if i not in accs:
                rows = reused[i]
                rep = TokenizerReport(tok.name, getattr(tok, "weights_id", "none"), (),
                                      max((r.n_images for r in rows), default=0), 0, reused=rows)
                rep.notes.append(f"every row reused from {cfg.results_dir!r} (--recompute measures again)")
                reports.append(rep)
                continue
            acc = accs[i]
            rep = _analyse_tokenizer(cfg, acc, todo[i], y, n_classes, feats, refs, distance, dist_name,
                                     probe_root / _probe_key(cfg, acc.tok, data), on_progress)
            if dist_reason and cfg.perceptual != "none":
                rep.notes.append(f"LPIPS left out: {dist_reason}")
            rep.computed, rep.reused = tuple(sorted(todo[i])), reused[i]
            rows = _rows(cfg, rep, data, device, world, versions, dist_version, ref_versions, ref_ids, skipped,
                         time.perf_counter() - t0, {p: expected[p] for p in todo[i]})
            rep.rows = [r for r in rows if part_of(r.metric) in todo[i]]
            if rep.reused:  # said on screen, not stored in the new rows
                rep.notes.append(f"reused stored rows for {', '.join(sorted(set(expected) - todo[i]))}")
            reports.append(rep)
    out_dir: Path | None = None
    plots: list[Path] = []
    stamp = new_run_id()
    if cfg.write and active:
        for rep in reports:
            if rep.rows:
                write_rows(rep.rows, cfg.results_dir, f"{stamp}-{rep.name}")
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


def _probe_key(cfg: AnalyzeConfig, tok, data) -> str:
    """The diffusability run folder's name: the same analysis finds (and resumes) the same run."""
    ident = [tok.name, getattr(tok, "weights_id", "none"), data.images.fingerprint(), cfg.resolution,
             cfg.probe_images, cfg.seed, cfg.probe.version] + ([cfg.precision] if cfg.precision != "fp32" else [])
    return f"{tok.name}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}"


def _analyse_tokenizer(cfg, acc: Accumulator, todo: set[str], y, n_classes, feats, refs, distance,
                       dist_name, probe_dir: Path, on_progress) -> TokenizerReport:
    """Every part in ``todo`` from the pass's accumulated state (the spectrum always: the robustness
    σ grid is relative to its per-element std)."""
    tok = acc.tok
    valid = torch.cat(acc.valid)
    pooled = torch.cat(acc.pooled)[valid]  # (N_ok, C)
    yv = y[valid]
    rep = TokenizerReport(tok.name, getattr(tok, "weights_id", "none"), acc.latent_shape, int(valid.sum()), acc.nonfinite)
    if rep.n_images == 0:
        rep.notes.append("every image gave NaN/Inf latents; nothing measured")
        return rep
    rep.spectrum = acc.stats.summary()

    # --- semantic alignment (a part the data cannot give is NaN with a note, see _rows) ----------
    if n_classes < 2:
        rep.notes.append("linear probe and kNN skipped: they need at least two class subfolders")
    elif "probe" in todo:
        tr, te = al.stratified_split(yv, 0.5, cfg.seed)
        n_train_classes = int(yv[tr].unique().numel())
        if not te.numel() or n_train_classes < 2:
            rep.notes.append(f"linear probe and kNN are NaN: the per-class 50/50 split of {yv.numel()} valid images "
                             f"leaves {te.numel()} to test and {n_train_classes} class(es) to train on (they need 1 and 2)")
        else:
            rep.probe["linear"] = al.linear_probe(pooled[tr], yv[tr], pooled[te], yv[te], method=cfg.probe_method,
                                                  batchnorm=cfg.probe_batchnorm)
            rep.probe["knn"] = al.knn_accuracy(pooled[tr], yv[tr], pooled[te], yv[te], k=cfg.knn_k)
            if why := al.feature_issue(pooled[tr], directions=True):
                rep.notes.append(f"kNN accuracy is NaN: the training latents {why}")
            elif tr.numel() < cfg.knn_k:
                rep.notes.append(f"kNN used k = {tr.numel()} (only {tr.numel()} training images)")
    sub = torch.arange(rep.n_images)
    if rep.n_images > cfg.align_images:  # the kNN metrics depend on N: a fixed-size seeded subset
        sub = torch.randperm(rep.n_images, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.align_images].sort().values
    rep.n_align = int(sub.numel())
    for name in [n for n in refs if f"align:{n}" in todo]:
        a, f = pooled[sub], feats[name][valid][sub]
        if rep.n_align <= cfg.mutual_k or rep.n_align < 4:
            rep.notes.append(f"alignment with {name} is NaN: {rep.n_align} valid images, it needs more than "
                             f"--mutual-k {cfg.mutual_k} (and at least 4)")
            continue
        rep.alignment[name] = {
            "mutual-knn": al.mutual_knn(a, f, cfg.mutual_k),
            "cknna": al.cknna(a, f, cfg.mutual_k),
            "cka": al.linear_cka(a, f, debiased=cfg.cka_debiased),
        }
        for what, x in (("the latents", a), (f"the {name} features", f)):
            if why := al.feature_issue(x):  # implies the test on directions
                rep.notes.append(f"alignment with {name} is NaN: {what} {why}")
            elif why := al.feature_issue(x, directions=True):
                rep.notes.append(f"alignment with {name}: mutual-kNN and CKNNA are NaN: {what} {why}")

    # --- decoder diagnostics on the kept subset ----------------------------------------------------
    diag = acc.diag.payloads()
    if diag:
        if on_progress:
            on_progress(f"diagnose {tok.name}", 0, 1)
        imgs = torch.stack([img for img, _ in diag])  # (K, 3, R, R) uint8
        z = torch.stack([lat for _, lat in diag])
        if "robust" in todo:
            rep.robustness = decoder_robustness(
                tok, imgs, z, cfg.sigmas, rep.spectrum.latent_std, distance=distance, distance_name=dist_name,
                seed=cfg.seed, batch_size=cfg.batch_size, keep=6,
            )
            rep.grid = {k: v for k, v in rep.robustness.examples.items() if k != "original"}
            if rep.robustness.note:
                rep.notes.append(rep.robustness.note)
        pairs = interpolation_pairs(z.shape[0], cfg.interp_pairs, cfg.seed)
        if pairs and "interp" in todo:
            rep.interpolation = interpolation_smoothness(
                tok, z, pairs, steps=cfg.interp_steps, distance=distance or rmse_distance,
                distance_name=dist_name or "rmse", batch_size=cfg.batch_size,
            )
        if on_progress:
            on_progress(f"diagnose {tok.name}", 1, 1)

    # --- diffusability -----------------------------------------------------------------------------
    probe_latents = [lat for (lat,) in acc.probe.payloads()]
    if "diffuse" in todo and probe_latents:
        if on_progress:
            on_progress(f"diffusability {tok.name}", 0, 1)
        encs = {n: (enc, feats[n]) for n, (_, enc) in refs.items()}
        try:
            rep.diffusability = diffusability_probe(tok, torch.stack(probe_latents), cfg.probe, probe_dir, encs,
                                                    cfg.batch_size)
        except ValueError as e:
            rep.notes.append(f"diffusability probe is NaN: {e}")
    return rep


def _spectrum_values(s: SpectrumSummary) -> dict[str, float]:
    vals = {"latent-erank": s.effective_rank, "latent-participation-ratio": s.participation_ratio,
            **{f"latent-pca-top{k}-energy": s.topk_energy[k] for k in TOPK_ENERGY},
            "latent-kurtosis-mean": s.kurtosis_mean, "latent-kurtosis-max": s.kurtosis_max,
            "latent-hoyer-sparsity": s.hoyer_sparsity, "latent-near-zero-frac": s.near_zero_frac,
            "latent-token-norm-mean": s.token_norm_mean, "latent-std": s.latent_std}
    assert tuple(vals) == SPECTRUM_METRICS  # the names reruns look for (raebench.analysis.reuse)
    return vals


def _rows(cfg, rep: TokenizerReport, data, device, world: int, versions, dist_version, ref_versions: dict[str, str],
          ref_ids: dict[str, str | None], skipped: list[Skip], seconds, expected: dict[str, list[tuple[str, str]]],
          ) -> list[ResultRow]:
    """The rows of ``rep``; every row of ``expected`` (the parts measured now) that the data could
    not give is written as NaN with the report's notes, so that a re-run reuses it."""
    out: list[ResultRow] = []
    notes = "; ".join(rep.notes)
    skipped_files = [f"{x.path}: {x.reason}" for x in skipped][:1000]

    def add(metric: str, value: float, version: str, n: int, **extra) -> None:
        out.append(ResultRow(
            tokenizer=rep.name, weights_id=rep.weights_id, dataset=data.name, split=data.split, domain=data.domain,
            resolution=cfg.resolution, n_images=n, metric=metric, value=float(value), higher_is_better=higher_is_better(metric),
            metric_version=version, seed=cfg.seed, data_fingerprint=data.images.fingerprint(), skipped=len(skipped),
            nonfinite=rep.nonfinite, seconds=round(seconds, 3), device=str(device) + (f" x{world}" if world > 1 else ""),
            notes=notes, extra={"analysis": True, "latent_shape": list(rep.latent_shape), "precision": cfg.precision,
                                "world_size": world, "skipped_files": skipped_files, **extra},
        ))

    n = rep.n_images
    for k, metric in (("linear", "probe-linear-top1"), ("knn", "probe-knn-top1")):
        if k in rep.probe:
            add(metric, rep.probe[k], versions["probe" if k == "linear" else "knn"], n)
    for ref, vals in rep.alignment.items():
        for m, key in ALIGN_METRICS:
            add(f"align-{m}-{ref}", vals[m], f"{versions[key]}-ref:{ref_versions[ref]}", rep.n_align, reference=ref,
                reference_weights=ref_ids[ref])
    s = rep.spectrum
    if s is not None:
        for metric, value in _spectrum_values(s).items():
            add(metric, value, versions["spectrum"], n, channels=s.channels)
    c = rep.robustness
    if c is not None:
        v = versions["robust"]
        for i, sig in enumerate(c.sigmas):
            tag = sigma_tag(sig)
            add(f"robust-psnr-vs-decode-{tag}", c.psnr_vs_decode[i], v, c.n_images, sigma=sig, latent_std=c.latent_std)
            add(f"robust-psnr-vs-image-{tag}", c.psnr_vs_image[i], v, c.n_images, sigma=sig, latent_std=c.latent_std)
            if c.dist_vs_decode:
                dv = f"{v}-{dist_version}"
                add(f"robust-{c.distance_name}-vs-decode-{tag}", c.dist_vs_decode[i], dv, c.n_images, sigma=sig)
                add(f"robust-{c.distance_name}-vs-image-{tag}", c.dist_vs_image[i], dv, c.n_images, sigma=sig)
    it = rep.interpolation
    if it is not None:
        v = f"{versions['interp']}-{dist_version or 'rmse-u8-v1'}"
        n_pairs = it.step_dist.shape[0]
        add(f"interp-{it.distance_name}-step-mean", it.step_mean, v, 2 * n_pairs)
        add(f"interp-{it.distance_name}-step-relvar", it.step_relvar, v, 2 * n_pairs)
        add(f"interp-{it.distance_name}-path-ratio", it.path_ratio, v, 2 * n_pairs)
    d = rep.diffusability
    if d is not None:
        v = versions["diffuse"]
        n_train = min(cfg.probe_images, n)
        add("diffuse-latent-fd", d.latent_fd, v, n_train, final_loss=d.final_loss, train_seconds=d.seconds_train)
        for ref, fd in d.reference_fd.items():
            add(f"diffuse-fd-{ref}", fd, f"{v}-ref:{ref_versions[ref]}", n_train, reference_weights=ref_ids[ref])
    made = {(r.metric, r.metric_version) for r in out}
    for part, rows in expected.items():
        for metric, version in rows:
            if (metric, version) not in made:  # the data could not give it: the notes say why
                add(metric, math.nan, version, 0, unmeasured=True)
    return out


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
