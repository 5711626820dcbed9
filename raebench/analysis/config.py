"""The settings of ``raebench analyze``: one frozen config, the metric versions it implies, its checks.

:class:`AnalyzeConfig` holds every CLI flag one to one. :func:`metric_versions` turns the settings
that change a value into the rows' metric versions (a re-run with other settings finds its rows
missing instead of reusing stale ones, :mod:`raebench.analysis.reuse`). :func:`check_config` refuses
settings that cannot work, as one sentence, before any data is read or any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raebench.analysis import alignment as al
from raebench.analysis.diagnostics import DEFAULT_INTERP_STEPS, DEFAULT_SIGMAS
from raebench.analysis.diffusability import ProbeConfig
from raebench.analysis.reuse import sigma_tag
from raebench.analysis.spectrum import NEAR_ZERO_REL
from raebench.errors import RaebenchError


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
    num_workers: int | None = None  # None: 0 on the CPU, min(8, cores) on a GPU
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


# ---------------------------------------------------------------------------------------------
# Metric versions: one place, everything that changes a value
# ---------------------------------------------------------------------------------------------


def metric_versions(cfg: AnalyzeConfig) -> dict[str, str]:
    """Part -> metric version of its rows: every setting that changes a value is in it."""
    bn = "bn" if cfg.probe_batchnorm else "nobn"
    versions = {
        # v2: the logistic fit is solved in standardised coordinates (it reaches the optimum without batchnorm
        # for feature scales spanning ~6 decades; beyond, a warning says it stopped at its iteration cap)
        "probe": f"probe-{cfg.probe_method}-{bn}-l2{al.PROBE_L2:g}-meanpool-strat50-seed{cfg.seed}-v2",
        "knn": f"knn-cos-k{cfg.knn_k}-t{al.KNN_TEMPERATURE:g}-meanpool-strat50-seed{cfg.seed}-v1",
        # v2: neighbours with equal cosines (duplicate images) go to the lower index in both feature sets
        "mknn": f"mknn-k{cfg.mutual_k}-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v2",
        "cknna": f"cknna-k{cfg.mutual_k}-hsicu-l2norm-meanpool-max{cfg.align_images}-seed{cfg.seed}-v2",
        "cka": f"cka-linear-{'debiased' if cfg.cka_debiased else 'biased'}-meanpool-max{cfg.align_images}-seed{cfg.seed}-v1",
        # v2: all-zero tokens count as near zero and stay out of the Hoyer mean (v1: dense, sparsity 0)
        "spectrum": f"latent-spectrum-tokens-f64-nz{NEAR_ZERO_REL:g}tokenrms-v2",
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
    from raebench.checks import check_domain, check_run

    check_run(cfg.batch_size, cfg.resolution, cfg.precision, cfg.num_workers)
    check_domain(cfg.domain)
    # --mutual-k 2 at least: CKNNA is undefined for k = 1 (the platonic-rep code refuses it too)
    at_least = [("--knn-k", cfg.knn_k, 1), ("--mutual-k", cfg.mutual_k, 2), ("--interp-steps", cfg.interp_steps, 1),
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
