"""One tokenizer's measurements after the pass of ``raebench analyze``, and the result rows they make.

:func:`measure` computes every part a run asked for from the pass's accumulated state (spectrum,
linear probe and kNN, alignment with each reference, decoder robustness and interpolation, the
diffusability probe) into a :class:`TokenizerReport`; :func:`result_rows` turns the report into
result rows, writing each expected row the data could not give as NaN with the notes that say why
(so that a re-run reuses it instead of measuring again). The pass itself is in
:mod:`raebench.analysis.run`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raebench.analysis import alignment as al
from raebench.analysis.config import AnalyzeConfig
from raebench.analysis.diagnostics import (
    InterpolationResult, RobustnessCurve, decoder_robustness, interpolation_pairs, interpolation_smoothness,
    rmse_distance,
)
from raebench.analysis.diffusability import ProbeResult, diffusability_probe
from raebench.analysis.reuse import ALIGN_METRICS, SPECTRUM_METRICS, higher_is_better, part_of, sigma_tag
from raebench.analysis.spectrum import TOPK_ENERGY, SpectrumSummary
from raebench.analysis.stream import Accumulator
from raebench.folders import Skip
from raebench.errors import NonFiniteError
from raebench.results import ResultRow


MUTUAL_CHANCE_NOTE = 0.05  # a mutual-kNN chance level k / (N - 1) above this is said in the rows' notes


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


def probe_key(cfg: AnalyzeConfig, tok, data) -> str:
    """The diffusability run folder's name: the same analysis finds (and resumes) the same run."""
    ident = [tok.name, getattr(tok, "weights_id", "none"), data.images.fingerprint(), cfg.resolution,
             cfg.probe_images, cfg.seed, cfg.probe.version] + ([cfg.precision] if cfg.precision != "fp32" else [])
    return f"{tok.name}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}"


def measure(cfg: AnalyzeConfig, acc: Accumulator, todo: set[str], y, n_classes, feats, refs, distance,
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
            if why := al.feature_issue(pooled[tr]):  # a constant representation would score the majority class
                rep.probe["linear"] = math.nan
                rep.notes.append(f"linear probe is NaN: the training latents {why}")
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
    chance = cfg.mutual_k / (rep.n_align - 1) if rep.n_align > 1 else math.nan
    if rep.alignment and chance > MUTUAL_CHANCE_NOTE:  # at N = k + 1 every feature set scores 1
        rep.notes.append(f"mutual-kNN on {rep.n_align} images with k = {cfg.mutual_k}: unrelated features score "
                         f"k / (N - 1) = {chance:.3g} in expectation (raise --align-images or lower --mutual-k)")

    # --- decoder diagnostics on the kept subset ----------------------------------------------------
    diag = acc.diag.payloads()
    if diag:
        if on_progress:
            on_progress(f"diagnose {tok.name}", 0, 1)
        imgs = torch.stack([img for img, _ in diag])  # (K, 3, R, R) uint8
        z = torch.stack([lat for _, lat in diag])
        # finite latents (the pass kept only those) that decode to NaN/Inf, e.g. with noise 100 times the
        # latents' spread in bf16: the part is NaN with a note (to_uint8 refuses them), the others go on
        if "robust" in todo:
            try:
                rep.robustness = decoder_robustness(
                    tok, imgs, z, cfg.sigmas, rep.spectrum.latent_std, distance=distance, distance_name=dist_name,
                    seed=cfg.seed, batch_size=cfg.batch_size, keep=6,
                )
                rep.grid = {k: v for k, v in rep.robustness.examples.items() if k != "original"}
                if rep.robustness.note:
                    rep.notes.append(rep.robustness.note)
            except NonFiniteError as e:
                rep.notes.append(f"decoder robustness is NaN: the decoder gave NaN/Inf images ({e})")
        pairs = interpolation_pairs(z.shape[0], cfg.interp_pairs, cfg.seed)
        if pairs and "interp" in todo:
            try:
                rep.interpolation = interpolation_smoothness(
                    tok, z, pairs, steps=cfg.interp_steps, distance=distance or rmse_distance,
                    distance_name=dist_name or "rmse", batch_size=cfg.batch_size,
                )
            except NonFiniteError as e:
                rep.notes.append(f"interpolation is NaN: the decoder gave NaN/Inf images ({e})")
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
        except (ValueError, NonFiniteError) as e:
            rep.notes.append(f"diffusability probe is NaN: {e}")
    return rep


def fill_from_rows(rep: TokenizerReport, rows: list[ResultRow]) -> None:
    """Put the stored probe and alignment values of ``rows`` (parts not measured now) into ``rep``,
    which the figures are drawn from; the other parts' figures need what rows do not hold."""
    for r in rows:
        part = part_of(r.metric)
        if part == "probe":
            rep.probe.setdefault("linear" if r.metric == "probe-linear-top1" else "knn", r.value)
        elif part.startswith("align:"):
            ref = part.split(":", 1)[1]
            m = r.metric[len("align-"): -len(f"-{ref}")]
            rep.alignment.setdefault(ref, {}).setdefault(m, r.value)


def _spectrum_values(s: SpectrumSummary) -> dict[str, float]:
    vals = {"latent-erank": s.effective_rank, "latent-participation-ratio": s.participation_ratio,
            **{f"latent-pca-top{k}-energy": s.topk_energy[k] for k in TOPK_ENERGY},
            "latent-kurtosis-mean": s.kurtosis_mean, "latent-kurtosis-max": s.kurtosis_max,
            "latent-hoyer-sparsity": s.hoyer_sparsity, "latent-near-zero-frac": s.near_zero_frac,
            "latent-token-norm-mean": s.token_norm_mean, "latent-std": s.latent_std}
    assert tuple(vals) == SPECTRUM_METRICS  # the names reruns look for (raebench.analysis.reuse)
    return vals


def _part_n(part: str, cfg: AnalyzeConfig, rep: TokenizerReport, n: int) -> int:
    """The n_images a measured row of ``part`` records (see :func:`result_rows`' ``add`` calls)."""
    from raebench.analysis.diagnostics import interpolation_pairs

    n_diag = min(cfg.n_diag, n)
    if part.startswith("align:"):
        return rep.n_align
    if part == "robust":
        return n_diag
    if part == "interp":
        return 2 * len(interpolation_pairs(n_diag, cfg.interp_pairs, cfg.seed))
    if part == "diffuse":
        return min(cfg.probe_images, n)
    return n


def result_rows(cfg: AnalyzeConfig, rep: TokenizerReport, data, device, world: int, versions, dist_version, ref_versions: dict[str, str],
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
                # n as a measured row of its part would say (not 0), so the NaN sits in their column
                add(metric, math.nan, version, _part_n(part, cfg, rep, n), unmeasured=True)
    return out
