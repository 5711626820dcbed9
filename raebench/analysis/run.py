"""``raebench analyze``: one pass over a dataset for every tokenizer and reference, then diagnostics.

The pass reads each image once. Per batch of uint8 ADM crops, every reference encoder runs once and
every tokenizer encodes the batch; each tokenizer accumulates :class:`LatentStats`, its token-mean
pooled latents, and keeps the latents of two seeded subsets of images: ``n_diag`` for the decoder
diagnostics and, with the diffusability probe, ``probe_images`` to train on. Images whose latents
contain NaN/Inf are excluded for that tokenizer (counted in ``nonfinite``), never averaged in.

After the pass, per tokenizer: the spectrum summary; linear probe and kNN accuracy on a stratified
50/50 split (when the data has class subfolders); mutual-kNN, CKNNA and linear CKA against every
reference; decoder robustness and interpolation smoothness on the diagnostic subset; optionally the
diffusability probe. Rows go to the results tables (one run file per tokenizer, source "measured",
a metric version per row, so they show in ``compare`` and ``leaderboard``); figures and the resolved
config go to ``<results>/analysis/<run id>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
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
from raebench.analysis.spectrum import NEAR_ZERO_REL, TOPK_ENERGY, LatentStats, SpectrumSummary
from raebench.data import ImageDataset, make_loader, resolve_data, to_float
from raebench.errors import MissingWeightsError, RaebenchError
from raebench.results import ResultRow, atomic_write_bytes, check_writable, new_run_id, write_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeConfig:
    """Everything that defines one analysis (the CLI flags, one to one)."""

    tokenizers: tuple[str, ...]
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
    rows: list[ResultRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class AnalyzeOutcome:
    reports: list[TokenizerReport]
    plots: list[Path]
    out_dir: Path | None
    n_images: int
    seconds: float


class _Accumulator:
    """Per-tokenizer state of the pass."""

    def __init__(self, tok, keep_diag: set[int], keep_probe: set[int]) -> None:
        self.tok = tok
        self.stats = LatentStats()
        self.pooled: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.keep_diag, self.keep_probe = keep_diag, keep_probe
        self.diag_images: list[torch.Tensor] = []
        self.diag_latents: list[torch.Tensor] = []
        self.probe_latents: list[torch.Tensor] = []
        self.nonfinite = 0
        self.latent_shape: tuple[int, ...] = ()

    def update(self, images: torch.Tensor, index: list[int]) -> None:
        with torch.no_grad():
            z = self.tok.encode(to_float(images)).float()
        self.latent_shape = tuple(z.shape[1:])
        ok = torch.isfinite(z.flatten(1)).all(1)  # (N,)
        self.nonfinite += int((~ok).sum())
        self.valid.append(ok.cpu())
        pooled = al.pool_tokens(z).double().cpu()
        pooled[~ok.cpu()] = math.nan
        self.pooled.append(pooled)
        if bool(ok.any()):
            self.stats.update(z[ok])
        for j, i in enumerate(index):
            if not bool(ok[j]):
                continue
            if i in self.keep_diag:
                self.diag_images.append(images[j].cpu())
                self.diag_latents.append(z[j])
            if i in self.keep_probe:
                self.probe_latents.append(z[j])


# ---------------------------------------------------------------------------------------------
# Metric versions: one place, everything that changes a value
# ---------------------------------------------------------------------------------------------


def _versions(cfg: AnalyzeConfig) -> dict[str, str]:
    bn = "bn" if cfg.probe_batchnorm else "nobn"
    return {
        "probe": f"probe-{cfg.probe_method}-{bn}-l2{al.PROBE_L2:g}-meanpool-strat50-seed{cfg.seed}-v1",
        "knn": f"knn-cos-k{cfg.knn_k}-t{al.KNN_TEMPERATURE:g}-meanpool-strat50-seed{cfg.seed}-v1",
        "mknn": f"mknn-k{cfg.mutual_k}-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "cknna": f"cknna-k{cfg.mutual_k}-hsicu-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "cka": f"cka-linear-{'debiased' if cfg.cka_debiased else 'biased'}-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        "spectrum": f"latent-spectrum-tokens-f64-nz{NEAR_ZERO_REL:g}tokenrms-v1",
        "robust": f"robust-u8-gauss-seed{cfg.seed}-n{cfg.n_diag}-v1",
        "interp": f"interp-lerp-S{cfg.interp_steps}-pairs{cfg.interp_pairs}-seed{cfg.seed}-v1",
    }


def _sigma_tag(s: float) -> str:
    return f"s{s:g}"


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


def _build_references(cfg: AnalyzeConfig, device: torch.device) -> dict[str, tuple]:
    from raebench.analysis.references import build_reference

    local = dict(cfg.reference_weights)
    unknown = sorted(set(local) - set(cfg.references))
    if unknown:
        raise RaebenchError(f"--reference-weights names {', '.join(unknown)}, which is not among --reference {','.join(cfg.references)}.")
    refs = {}
    for name in cfg.references:
        try:
            spec, enc = build_reference(name, local.get(name), device)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e} To analyse without it, leave it out of --reference (or pass --reference none).") from None
        refs[spec.name] = (spec, enc)
    return refs


def analyze(
    cfg: AnalyzeConfig,
    tokenizers: list | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AnalyzeOutcome:
    """Run the analysis; ``tokenizers`` (built ones) override building ``cfg.tokenizers`` by name."""
    from raebench.analysis.perceptual import build_distance
    from raebench.evaluate import EvalConfig, build_tokenizer_from_config, resolve_device

    t0 = time.perf_counter()
    if not cfg.tokenizers and not tokenizers:
        raise RaebenchError("Give at least one --tokenizer to analyse.")
    if cfg.write:
        check_writable(cfg.results_dir)
    data = resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    device = resolve_device(cfg.device)
    distance, dist_name, dist_version, dist_reason = build_distance(cfg.perceptual, device)
    toks = tokenizers if tokenizers is not None else [
        build_tokenizer_from_config(EvalConfig(tokenizer=n, resolution=cfg.resolution), device) for n in cfg.tokenizers
    ]
    refs = _build_references(cfg, device)

    rng = random.Random(cfg.seed)
    keep_diag = set(rng.sample(range(data.n), min(cfg.n_diag, data.n)))
    keep_probe = set(random.Random(cfg.seed + 1).sample(range(data.n), min(cfg.probe_images, data.n))) if cfg.diffusability else set()
    accs = [_Accumulator(t, keep_diag, keep_probe) for t in toks]
    ref_feats: dict[str, list[torch.Tensor]] = {n: [] for n in refs}
    labels: list[torch.Tensor] = []
    skipped = list(data.images.skipped)

    loader = make_loader(ImageDataset(data.images, cfg.resolution), cfg.batch_size, cfg.num_workers,
                         pin_memory=device.type == "cuda")
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
            for acc in accs:
                acc.update(images, batch["index"].tolist())
        if on_progress:
            on_progress("encode", done, data.n)
    if not labels:
        raise RaebenchError(f"Nothing to analyse on {data.name!r}: no image was readable ({len(skipped)} skipped).")
    y = torch.cat(labels)
    feats = {n: torch.cat(v) for n, v in ref_feats.items()}
    versions = _versions(cfg)
    n_classes = len(data.images.classes)

    reports: list[TokenizerReport] = []
    with contextlib.ExitStack() as stack:  # without --results writes, probe runs go to a temporary folder
        probe_root = (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raebench-probe-")))
                      if cfg.diffusability and not cfg.write else Path(cfg.results_dir) / "analysis" / "probes")
        for acc in accs:
            rep = _analyse_tokenizer(cfg, acc, y, n_classes, feats, refs, versions, distance, dist_name, dist_version,
                                     probe_root / _probe_key(cfg, acc.tok, data), on_progress)
            if dist_reason and cfg.perceptual != "none":
                rep.notes.append(f"LPIPS left out: {dist_reason}")
            rep.rows = _rows(cfg, rep, data, device, versions, dist_version, refs, len(skipped), time.perf_counter() - t0)
            reports.append(rep)
    out_dir: Path | None = None
    plots: list[Path] = []
    stamp = new_run_id()
    if cfg.write:
        for rep in reports:
            write_rows(rep.rows, cfg.results_dir, f"{stamp}-{rep.name}")
        out_dir = Path(cfg.results_dir) / "analysis" / stamp
        config = {**asdict(cfg), "dataset_resolved": data.name, "data_fingerprint": data.images.fingerprint(),
                  "n_images": int(y.numel()), "perceptual_resolved": dist_name, "versions": versions}
        atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=2, default=str).encode())
        if cfg.plots:
            plots = _plot_all(reports, out_dir, n_classes)
    return AnalyzeOutcome(reports, plots, out_dir, int(y.numel()), time.perf_counter() - t0)


def _probe_key(cfg: AnalyzeConfig, tok, data) -> str:
    """The diffusability run folder's name: the same analysis finds (and resumes) the same run."""
    ident = [tok.name, getattr(tok, "weights_id", "none"), data.images.fingerprint(), cfg.resolution,
             cfg.probe_images, cfg.seed, cfg.probe.version]
    return f"{tok.name}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}"


def _analyse_tokenizer(cfg, acc: _Accumulator, y, n_classes, feats, refs, versions, distance, dist_name,
                       dist_version, probe_dir: Path, on_progress) -> TokenizerReport:
    tok = acc.tok
    valid = torch.cat(acc.valid)
    pooled = torch.cat(acc.pooled)[valid]  # (N_ok, C)
    yv = y[valid]
    rep = TokenizerReport(tok.name, getattr(tok, "weights_id", "none"), acc.latent_shape, int(valid.sum()), acc.nonfinite)
    if rep.n_images == 0:
        rep.notes.append("every image gave NaN/Inf latents; nothing measured")
        return rep
    rep.spectrum = acc.stats.summary()

    # --- semantic alignment --------------------------------------------------------------------
    if n_classes >= 2:
        tr, te = al.stratified_split(yv, 0.5, cfg.seed)
        if tr.numel() and te.numel():
            rep.probe["linear"] = al.linear_probe(pooled[tr], yv[tr], pooled[te], yv[te], method=cfg.probe_method,
                                                  batchnorm=cfg.probe_batchnorm)
            rep.probe["knn"] = al.knn_accuracy(pooled[tr], yv[tr], pooled[te], yv[te], k=cfg.knn_k)
            if tr.numel() < cfg.knn_k:
                rep.notes.append(f"kNN used k = {tr.numel()} (only {tr.numel()} training images)")
    else:
        rep.notes.append("linear probe and kNN skipped: they need at least two class subfolders")
    sub = torch.arange(rep.n_images)
    if rep.n_images > cfg.align_images:  # the kNN metrics depend on N: a fixed-size seeded subset
        sub = torch.randperm(rep.n_images, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.align_images].sort().values
    rep.n_align = int(sub.numel())
    for name in refs:
        a, f = pooled[sub], feats[name][valid][sub]
        if rep.n_align <= cfg.mutual_k or rep.n_align < 4:
            rep.notes.append(f"alignment with {name} skipped: needs more than k = {cfg.mutual_k} images (and at least 4)")
            continue
        rep.alignment[name] = {
            "mutual-knn": al.mutual_knn(a, f, cfg.mutual_k),
            "cknna": al.cknna(a, f, cfg.mutual_k),
            "cka": al.linear_cka(a, f, debiased=cfg.cka_debiased),
        }

    # --- decoder diagnostics on the kept subset ----------------------------------------------------
    if acc.diag_latents:
        if on_progress:
            on_progress(f"diagnose {tok.name}", 0, 1)
        z = torch.stack(acc.diag_latents)
        imgs = torch.stack(acc.diag_images)
        rep.robustness = decoder_robustness(
            tok, imgs, z, cfg.sigmas, rep.spectrum.latent_std, distance=distance, distance_name=dist_name,
            seed=cfg.seed, batch_size=cfg.batch_size, keep=6,
        )
        rep.grid = {k: v for k, v in rep.robustness.examples.items() if k != "original"}
        pairs = interpolation_pairs(z.shape[0], cfg.interp_pairs, cfg.seed)
        if pairs:
            rep.interpolation = interpolation_smoothness(
                tok, z, pairs, steps=cfg.interp_steps, distance=distance or rmse_distance,
                distance_name=dist_name or "rmse", batch_size=cfg.batch_size,
            )
        if on_progress:
            on_progress(f"diagnose {tok.name}", 1, 1)

    # --- diffusability -----------------------------------------------------------------------------
    if cfg.diffusability and acc.probe_latents:
        if on_progress:
            on_progress(f"diffusability {tok.name}", 0, 1)
        encs = {n: (enc, feats[n]) for n, (_, enc) in refs.items()}
        try:
            rep.diffusability = diffusability_probe(tok, torch.stack(acc.probe_latents), cfg.probe, probe_dir, encs,
                                                    cfg.batch_size)
        except ValueError as e:
            rep.notes.append(f"diffusability probe skipped: {e}")
    return rep


def _rows(cfg, rep: TokenizerReport, data, device, versions, dist_version, refs, n_skipped, seconds) -> list[ResultRow]:
    out: list[ResultRow] = []
    notes = "; ".join(rep.notes)

    def add(metric: str, value: float, hib: bool | None, version: str, n: int, **extra) -> None:
        out.append(ResultRow(
            tokenizer=rep.name, weights_id=rep.weights_id, dataset=data.name, split=data.split, domain=data.domain,
            resolution=cfg.resolution, n_images=n, metric=metric, value=float(value), higher_is_better=hib,
            metric_version=version, seed=cfg.seed, data_fingerprint=data.images.fingerprint(), skipped=n_skipped,
            nonfinite=rep.nonfinite, seconds=round(seconds, 3), device=str(device), notes=notes,
            extra={"analysis": True, "latent_shape": list(rep.latent_shape), **extra},
        ))

    n = rep.n_images
    for k, metric in (("linear", "probe-linear-top1"), ("knn", "probe-knn-top1")):
        if k in rep.probe:
            add(metric, rep.probe[k], True, versions["probe" if k == "linear" else "knn"], n)
    for ref, vals in rep.alignment.items():
        rv = refs[ref][0].version
        for m, key in (("mutual-knn", "mknn"), ("cknna", "cknna"), ("cka", "cka")):
            add(f"align-{m}-{ref}", vals[m], True, f"{versions[key]}-ref:{rv}", rep.n_align, reference=ref)
    s = rep.spectrum
    if s is not None:
        v = versions["spectrum"]
        add("latent-erank", s.effective_rank, None, v, n, channels=s.channels)
        add("latent-participation-ratio", s.participation_ratio, None, v, n, channels=s.channels)
        for k in TOPK_ENERGY:
            add(f"latent-pca-top{k}-energy", s.topk_energy[k], None, v, n)
        add("latent-kurtosis-mean", s.kurtosis_mean, None, v, n)
        add("latent-kurtosis-max", s.kurtosis_max, None, v, n)
        add("latent-hoyer-sparsity", s.hoyer_sparsity, None, v, n)
        add("latent-near-zero-frac", s.near_zero_frac, None, v, n)
        add("latent-token-norm-mean", s.token_norm_mean, None, v, n)
        add("latent-std", s.latent_std, None, v, n)
    c = rep.robustness
    if c is not None:
        v = versions["robust"]
        for i, sig in enumerate(c.sigmas):
            tag = _sigma_tag(sig)
            add(f"robust-psnr-vs-decode-{tag}", c.psnr_vs_decode[i], True, v, c.n_images, sigma=sig, latent_std=c.latent_std)
            add(f"robust-psnr-vs-image-{tag}", c.psnr_vs_image[i], True, v, c.n_images, sigma=sig, latent_std=c.latent_std)
            if c.dist_vs_decode:
                dv = f"{v}-{dist_version}"
                add(f"robust-{c.distance_name}-vs-decode-{tag}", c.dist_vs_decode[i], False, dv, c.n_images, sigma=sig)
                add(f"robust-{c.distance_name}-vs-image-{tag}", c.dist_vs_image[i], False, dv, c.n_images, sigma=sig)
    it = rep.interpolation
    if it is not None:
        v = f"{versions['interp']}-{dist_version or 'rmse-u8-v1'}"
        n_pairs = it.step_dist.shape[0]
        add(f"interp-{it.distance_name}-step-mean", it.step_mean, None, v, 2 * n_pairs)
        add(f"interp-{it.distance_name}-step-relvar", it.step_relvar, False, v, 2 * n_pairs)
        add(f"interp-{it.distance_name}-path-ratio", it.path_ratio, False, v, 2 * n_pairs)
    d = rep.diffusability
    if d is not None:
        v = d.config.version
        n_train = min(cfg.probe_images, n)
        add("diffuse-latent-fd", d.latent_fd, False, v, n_train, final_loss=d.final_loss, train_seconds=d.seconds_train)
        for ref, fd in d.reference_fd.items():
            add(f"diffuse-fd-{ref}", fd, False, f"{v}-ref:{refs[ref][0].version}", n_train)
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
