"""Which rows an analysis writes, grouped in parts, and which parts the results folder already holds.

A *part* is what a re-run computes or reuses as a whole: ``probe`` (linear probe and kNN),
``align:<reference>`` (mutual-kNN, CKNNA and CKA against one reference), ``spectrum``, ``robust``,
``interp`` and ``diffuse``. A part is reused when every row it would write is stored for the same
tokenizer and weights, dataset, data fingerprint (the exact image list), resolution and seed, as a
measured row with the same metric version: the rule of ``raebench compare``, with the weights
added. Metric versions carry every setting that changes a value (k, the σ grid by name, the
perceptual distance and its weights, the reference's version and weights, ``--n-diag``,
``--probe-images``, ``--precision``), so a changed setting is a missing row, never a silently
reused one. A tokenizer whose every part is stored is not encoded at all.

A part that is measured writes every row expected of it: one the data cannot give (a test split
with no image, fewer valid images than k, latents that do not vary) is written as NaN with a note
saying why, so a re-run reuses it instead of measuring it again. Parts the listing itself rules out
(no class subfolders, no diagnostic image) are not expected at all.

Figures are drawn at the end of a run, into ``<results>/analysis/<run stamp>/``, from measurements
that the rows do not hold (eigenvalue spectra, per-step interpolation distances, images). A run
killed after storing its rows but before drawing every figure leaves them undrawn: a re-run that
draws figures (:func:`undrawn_parts`) measures again each stored part whose run folder lacks a
figure the part appears in (:data:`FIGURES`), writing its rows anew under its own stamp, so its
folder holds the figures and the next re-run finds them. A run still at work (another job of an
array, storing rows as each tokenizer finishes and drawing at the end) is not a killed one: it holds
a lock on ``analysis/.<stamp>.live`` until its figures are drawn (:func:`drawing`), and its parts
are reused, not measured again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from raebench.analysis.diagnostics import interpolation_pairs
from raebench.analysis.spectrum import TOPK_ENERGY
from raebench.results import COLUMNS, ResultRow

#: (metric name part, key in the versions dict) of the alignment rows against each reference
ALIGN_METRICS = (("mutual-knn", "mknn"), ("cknna", "cknna"), ("cka", "cka"))
SPECTRUM_METRICS = (
    "latent-erank", "latent-participation-ratio", *[f"latent-pca-top{k}-energy" for k in TOPK_ENERGY],
    "latent-kurtosis-mean", "latent-kurtosis-max", "latent-hoyer-sparsity", "latent-near-zero-frac",
    "latent-token-norm-mean", "latent-std",
)
INTERP_METRICS = ("step-mean", "step-relvar", "path-ratio")
_PREFIX_PARTS = {"probe": "probe", "latent": "spectrum", "robust": "robust", "interp": "interp", "diffuse": "diffuse"}
#: the PNGs (raebench.analysis.run._plot_all) a measured row of each part appears in; align:<ref> as probe
FIGURES = {"probe": ("alignment.png",), "spectrum": ("spectra.png",), "robust": ("robustness.png", "reconstructions.png"),
           "interp": ("interpolation.png",), "diffuse": ()}


def run_file_id(stamp: str, tokenizer: str) -> str:
    """The run id of one tokenizer's rows written by the analysis run ``stamp``."""
    return f"{stamp}-{tokenizer}"


def _live_marker(analysis_dir: str | os.PathLike, stamp: str) -> Path:
    return Path(analysis_dir) / f".{stamp}.live"


@contextlib.contextmanager
def drawing(analysis_dir: str | os.PathLike, stamp: str) -> Iterator[None]:
    """Mark the run ``stamp`` as at work while it stores rows and draws figures (see
    :func:`is_live`); the marker is removed at the end, and the kernel drops the lock of a killed run."""
    from raebench.locks import open_locked

    path = _live_marker(analysis_dir, stamp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f, _ = open_locked(path, ": a concurrent analysis may measure again the parts whose figures this one is "
                                 "still to draw")
    except OSError:  # an unwritable folder fails at the first row, with its own sentence
        f = None
    try:
        yield
    finally:
        if f is not None:
            path.unlink(missing_ok=True)  # while holding it, as raebench.locks does
            f.close()


def is_live(analysis_dir: str | os.PathLike, stamp: str) -> bool:
    """True while the analysis run ``stamp`` is at work (it holds the lock of :func:`drawing`); False
    once it ended or was killed, and where the file system cannot tell (no locks)."""
    from raebench.locks import try_flock

    path = _live_marker(analysis_dir, stamp)
    try:
        with open(path, "rb") as f:
            got = try_flock(f, path)
            if got:  # its run was killed: the marker is litter (removed while locked, as raebench.locks does)
                path.unlink(missing_ok=True)
            return got is False
    except OSError:  # no marker: the run ended (or predates markers)
        return False


def figures_of(part: str) -> tuple[str, ...]:
    return FIGURES["probe"] if part.startswith("align:") else FIGURES[part]


def sigma_tag(s: float) -> str:
    """The σ in a metric name: ``s0.25``; exact (``repr``) where 6 significant digits are not."""
    short = f"{s:g}"
    return f"s{short}" if float(short) == s else f"s{float(s)!r}"


def part_of(metric: str) -> str:
    """The part an analysis row belongs to, from its metric name."""
    for m, _ in ALIGN_METRICS:
        if metric.startswith(f"align-{m}-"):
            return f"align:{metric[len(f'align-{m}-'):]}"
    prefix = metric.split("-", 1)[0]
    if prefix not in _PREFIX_PARTS:
        raise ValueError(f"{metric!r} is not an analysis metric")
    return _PREFIX_PARTS[prefix]


def higher_is_better(metric: str) -> bool | None:
    """The direction of an analysis metric (None: a description, neither better nor worse)."""
    part = part_of(metric)
    if part == "probe" or part.startswith("align:"):
        return True
    if part == "robust":
        return metric.startswith("robust-psnr-")
    if part == "interp":
        return None if metric.endswith("-step-mean") else False
    return False if part == "diffuse" else None


def expected_rows(
    cfg,
    versions: dict[str, str],
    ref_versions: dict[str, str],
    n_classes: int,
    n_images: int,
    dist_name: str | None,
    dist_version: str | None,
) -> dict[str, list[tuple[str, str]]]:
    """part -> [(metric, metric_version)] that an analysis with ``cfg`` writes for each tokenizer
    (``n_images``: the images listed; ``ref_versions``: reference -> its row version, weights
    included)."""
    out: dict[str, list[tuple[str, str]]] = {}
    if n_classes >= 2:
        out["probe"] = [("probe-linear-top1", versions["probe"]), ("probe-knn-top1", versions["knn"])]
    for ref, rv in ref_versions.items():
        out[f"align:{ref}"] = [(f"align-{m}-{ref}", f"{versions[key]}-ref:{rv}") for m, key in ALIGN_METRICS]
    out["spectrum"] = [(m, versions["spectrum"]) for m in SPECTRUM_METRICS]
    n_diag = min(cfg.n_diag, n_images)
    if n_diag:
        v = versions["robust"]
        rows = []
        for s in cfg.sigmas:
            tag = sigma_tag(s)
            rows += [(f"robust-psnr-vs-decode-{tag}", v), (f"robust-psnr-vs-image-{tag}", v)]
            if dist_name:
                rows += [(f"robust-{dist_name}-vs-{side}-{tag}", f"{v}-{dist_version}") for side in ("decode", "image")]
        out["robust"] = rows
    if interpolation_pairs(n_diag, cfg.interp_pairs, cfg.seed):
        v = f"{versions['interp']}-{dist_version or 'rmse-u8-v1'}"
        out["interp"] = [(f"interp-{dist_name or 'rmse'}-{m}", v) for m in INTERP_METRICS]
    if cfg.diffusability:
        v = versions["diffuse"]
        out["diffuse"] = [("diffuse-latent-fd", v)] + [(f"diffuse-fd-{ref}", f"{v}-ref:{rv}") for ref, rv in ref_versions.items()]
    return out


def stored_rows(df: pd.DataFrame, tokenizer: str, weights_id: str, dataset: str, fingerprint: str, resolution: int,
                seed: int) -> pd.DataFrame:
    """The measured rows of ``df`` (``raebench.results.load``) for this tokenizer, weights (by content:
    :func:`raebench.weights.same_weights`) and data."""
    from raebench.weights import same_weights

    if df.empty:
        return df
    same = df["weights_id"].map(lambda w: same_weights(w, weights_id)).astype(bool)
    return df[(df["tokenizer"] == tokenizer) & same & (df["dataset"] == dataset)
              & (df["data_fingerprint"] == fingerprint) & (df["resolution"] == resolution) & (df["seed"] == seed)
              & (df["source"].fillna("measured") == "measured")]


def missing_parts(expected: dict[str, list[tuple[str, str]]], stored: pd.DataFrame) -> set[str]:
    """The parts of ``expected`` with at least one row absent from ``stored``."""
    have = set(zip(stored["metric"], stored["metric_version"])) if not stored.empty else set()
    return {part for part, rows in expected.items() if not set(rows) <= have}


def reusable_rows(stored: pd.DataFrame, expected: dict[str, list[tuple[str, str]]], todo: set[str]) -> list[ResultRow]:
    """The stored rows of the expected parts not in ``todo``, as :class:`ResultRow` (for tables)."""
    keep = {row for part, rows in expected.items() if part not in todo for row in rows}
    if stored.empty or not keep:
        return []
    recs = stored.to_dict("records")
    return [ResultRow(**{k: r[k] for k in COLUMNS}) for r in recs if (r["metric"], r["metric_version"]) in keep]


def undrawn_parts(stored: pd.DataFrame, expected: dict[str, list[tuple[str, str]]], todo: set[str], tokenizer: str,
                  analysis_dir: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """part -> (run stamp, missing PNGs) for each stored part outside ``todo`` that the run which
    wrote its rows did not draw in full (killed while drawing, or run with ``--no-plots``), unless that
    run is still at work (:func:`is_live`). Rows the
    data could not give (``unmeasured``) appear in no figure and are not checked."""
    out: dict[str, tuple[str, list[str]]] = {}
    if stored.empty:
        return out
    keys = list(zip(stored["metric"], stored["metric_version"]))
    for part, rows in expected.items():
        if part in todo or not figures_of(part):
            continue
        wanted = set(rows)
        for key, run_id, extra in zip(keys, stored["run_id"], stored["extra"]):
            if key not in wanted or (isinstance(extra, dict) and extra.get("unmeasured")):
                continue
            stamp = run_id.removesuffix(run_file_id("", tokenizer))
            missing = [f for f in figures_of(part) if not (Path(analysis_dir) / stamp / f).is_file()]
            if missing and not is_live(analysis_dir, stamp):  # a live run draws them at its end
                out[part] = (stamp, missing)
                break
    return out
