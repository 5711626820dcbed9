"""PNG figures of an analysis: robustness curves, spectra, alignment bars, reconstructions,
interpolation speed.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so
importing this module never switches the process-wide backend and needs no display. Every axis
says what it shows and in which unit. Each function takes the per-tokenizer reports of
:mod:`raebench.analysis.measure` and writes one PNG atomically, returning its path (None when there is
nothing to draw).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from raebench.results import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from raebench.analysis.measure import TokenizerReport

DPI = 110


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_robustness(reports: Sequence["TokenizerReport"], path: Path) -> Path | None:
    """PSNR (and the perceptual distance, when measured) of decode(z + σ·std·ε) against σ."""
    reps = [r for r in reports if r.robustness is not None]
    if not reps:
        return None
    has_dist = any(r.robustness.dist_vs_decode for r in reps)
    fig = _figure(11 if has_dist else 6, 4.2)
    axes = fig.subplots(1, 2 if has_dist else 1, squeeze=False)[0]
    for r, col in zip(reps, _colors(len(reps))):
        c = r.robustness
        axes[0].plot(c.sigmas, c.psnr_vs_decode, "o-", color=col, label=f"{r.name} vs decode(z)")
        axes[0].plot(c.sigmas, c.psnr_vs_image, "s--", color=col, label=f"{r.name} vs image")
        if has_dist and c.dist_vs_decode:
            axes[1].plot(c.sigmas, c.dist_vs_decode, "o-", color=col, label=f"{r.name} vs decode(z)")
            axes[1].plot(c.sigmas, c.dist_vs_image, "s--", color=col, label=f"{r.name} vs image")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("latent noise σ (relative to the latent's per-element std)")
    axes[0].set_ylabel("PSNR (dB, 8-bit images), higher = more robust")
    axes[0].set_title(f"Decoder robustness to latent noise (n = {reps[0].robustness.n_images} images)")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    if has_dist:
        name = next(r.robustness.distance_name for r in reps if r.robustness.distance_name)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("latent noise σ (relative to the latent's per-element std)")
        axes[1].set_ylabel(f"{name.upper()} distance (unitless), lower = more robust")
        axes[1].set_title(f"Perceptual change ({name})")
        axes[1].grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7)
    return _save(fig, path)


def plot_spectra(reports: Sequence["TokenizerReport"], path: Path) -> Path | None:
    """Token-covariance eigenvalue spectrum, cumulative PCA energy and per-channel kurtosis."""
    reps = [r for r in reports if r.spectrum is not None]
    if not reps:
        return None
    fig = _figure(15, 4.2)
    ax_s, ax_c, ax_k = fig.subplots(1, 3)
    xscale = "log" if max(r.spectrum.channels for r in reps) > 16 else "linear"  # a log axis of 3 points reads badly
    for r, col in zip(reps, _colors(len(reps))):
        s = r.spectrum
        lam = s.eigvals.numpy()
        frac = lam / lam.sum() if lam.sum() > 0 else lam
        idx = np.arange(1, lam.size + 1)
        label = f"{r.name} (C={s.channels}, erank={s.effective_rank:.1f}, PR={s.participation_ratio:.1f})"
        ax_s.plot(idx, np.clip(frac, 1e-12, None), "-", color=col, label=label)
        ax_c.plot(idx, np.cumsum(frac), "-", color=col, label=r.name)
        k = np.sort(s.kurtosis.numpy()[np.isfinite(s.kurtosis.numpy())])[::-1]
        ax_k.plot(np.arange(1, k.size + 1), k, "-", color=col, label=f"{r.name} (mean {s.kurtosis_mean:.2f})")
    big_k = max(float(np.nanmax(np.abs(r.spectrum.kurtosis.numpy()), initial=0.0)) for r in reps) > 10
    ax_s.set(xscale=xscale, yscale="log", xlabel=f"principal component (rank{', log' if xscale == 'log' else ''})",
             ylabel="fraction of token variance (log)", title="Token covariance spectrum")
    ax_c.set(xscale=xscale, ylim=(0, 1.02), xlabel="number of principal components",
             ylabel="cumulative fraction of token variance", title="PCA energy")
    ax_k.set(xscale=xscale, yscale="symlog" if big_k else "linear", xlabel="channel (sorted by kurtosis)",
             ylabel=f"excess kurtosis (0 = Gaussian{', symlog' if big_k else ''})", title="Per-channel kurtosis (heavy tails)")
    for ax in (ax_s, ax_c, ax_k):
        if xscale == "linear":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_alignment(reports: Sequence["TokenizerReport"], path: Path, n_classes: int = 0) -> Path | None:
    """Grouped bars: alignment scores per reference, and probe accuracies."""
    reps = list(reports)
    groups = sorted({(ref, m) for r in reps for ref, d in r.alignment.items() for m in d})
    probes = sorted({m for r in reps for m in r.probe})
    if not groups and not probes:
        return None
    panels = ([(groups, False)] if groups else []) + ([(probes, True)] if probes else [])
    fig = _figure(max(6, 1.2 * len(groups) + 4), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[len(k) + 1 for k, _ in panels])[0]
    width = 0.8 / max(len(reps), 1)
    for ax, (keys, is_probe) in zip(axes, panels):
        x = np.arange(len(keys))
        for i, (r, col) in enumerate(zip(reps, _colors(len(reps)))):
            vals = [r.probe.get(k, math.nan) * 100 if is_probe else r.alignment.get(k[0], {}).get(k[1], math.nan)
                    for k in keys]
            pos = x + (i - (len(reps) - 1) / 2) * width
            ax.bar(pos, np.nan_to_num(vals, nan=0.0), width, color=col, label=r.name)
            for p, v in zip(pos, vals):  # an undefined value is labelled, not drawn as a zero score
                if not np.isfinite(v):
                    ax.text(p, 0, "NaN", rotation=90, ha="center", va="bottom", fontsize=7, color=col)
        if is_probe:
            ax.set_xticks(x, list(keys))
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_ylim(0, 100)
            ax.set_title("Probes on pooled latents")
            if n_classes > 1:
                ax.axhline(100 / n_classes, color="gray", ls=":", lw=1, label="chance")
        else:
            ax.set_xticks(x, [f"{m}\nvs {ref}" for ref, m in keys], fontsize=8)
            ax.set_ylabel("alignment score (unitless, 1 = identical)")
            vals = [v for r in reps for d in r.alignment.values() for v in d.values() if np.isfinite(v)]
            # CKNNA and debiased CKA can leave [0, 1] on small sets: never clip a bar
            ax.set_ylim(min([0.0, *vals]) * 1.05, max([1.0, *vals]) * 1.05)
            ax.set_title("Alignment with reference encoders")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if is_probe else "best", framealpha=0.9)
    return _save(fig, path)


def plot_reconstructions(originals: torch.Tensor, reports: Sequence["TokenizerReport"], path: Path, max_images: int = 6) -> Path | None:
    """Rows: the originals, then per tokenizer its reconstruction and a noisy decode."""
    k = min(max_images, originals.shape[0])
    if k == 0:
        return None
    rows: list[tuple[str, torch.Tensor]] = [("original", originals[:k])]
    for r in reports:
        for label, imgs in r.grid.items():
            rows.append((f"{r.name}\n{label}", imgs[:k]))
    fig = _figure(1.8 * k + 1.4, 1.8 * len(rows))
    axes = fig.subplots(len(rows), k, squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            ax.imshow(imgs[j].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"Reconstructions ({originals.shape[-1]} px; noisy rows: decode(z + σ·std·ε))", fontsize=10)
    return _save(fig, path)


def plot_interpolation(reports: Sequence["TokenizerReport"], path: Path) -> Path | None:
    """Distance per unit t between consecutive decodes along latent interpolations."""
    reps = [r for r in reports if r.interpolation is not None]
    if not reps:
        return None
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    for r, col in zip(reps, _colors(len(reps))):
        it = r.interpolation
        speed = it.speed.numpy()  # (P, S)
        t_mid = (np.arange(it.steps) + 0.5) / it.steps
        m, s = speed.mean(0), speed.std(0)
        ax.plot(t_mid, m, "o-", color=col, label=f"{r.name} (rel. var {it.step_relvar:.2g}, path ratio {it.path_ratio:.2f})")
        ax.fill_between(t_mid, m - s, m + s, color=col, alpha=0.15)
    name = reps[0].interpolation.distance_name
    ax.set_xlabel("interpolation position t (midpoint of each step)")
    ax.set_ylabel(f"{name.upper()} distance per unit t (step distance × steps)")
    ax.set_title(f"Interpolation smoothness ({reps[0].interpolation.step_dist.shape[0]} pairs, mean ± std over pairs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
