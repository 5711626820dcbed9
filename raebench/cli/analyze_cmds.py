"""``raebench analyze``: semantic alignment and latent diagnostics of one or more tokenizers.

Under ``torchrun --nproc_per_node N -m raebench analyze ...`` the encode pass is sharded across the
ranks (see :mod:`raebench.analysis.run`); rank 0 prints, writes rows and draws the figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from raebench.errors import RaebenchError


def _csv(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _parse_named(items: list[str], flag: str, example: str) -> tuple[tuple[str, str], ...]:
    """``["a=/x", "b=/y"]`` -> ``(("a", "/x"), ("b", "/y"))``; names lower-cased."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise RaebenchError(f"{flag} takes NAME=PATH (e.g. {example}), got {item!r}.")
        out.append((name.strip().lower(), path.strip()))
    return tuple(out)


def _parse_reference_weights(items: list[str]) -> tuple[tuple[str, str], ...]:
    return _parse_named(items, "--reference-weights", "dinov2-b=/models/dinov2.safetensors")


def _parse_tokenizer_paths(items: list[str], flag: str, example: str) -> tuple[tuple[str, str], ...]:
    from raebench.tokenizers import get_tokenizer_spec

    return tuple((get_tokenizer_spec(n).name, p) for n, p in _parse_named(items, flag, example))


def _parse_sigmas(text: str) -> tuple[float, ...]:
    """``"0.1,0.5"`` -> ``(0.1, 0.5)``: finite numbers in (0, MAX_SIGMA] (``nan``, ``inf`` and
    ``1e300`` parse as floats, so the range is checked here too)."""
    from raebench.analysis.diagnostics import MAX_SIGMA, check_sigmas

    hint = f"--sigmas takes comma-separated numbers in (0, {MAX_SIGMA:g}] such as 0.1,0.25,0.5,1; got {text!r}."
    try:
        sig = tuple(float(s) for s in text.split(",") if s.strip())
        check_sigmas(sig)
    except ValueError:
        raise RaebenchError(hint) from None
    return sig


def _provenance(cfg, shown: dict) -> list[str]:
    """What the table's probe and alignment values were computed on (its title's n counts every
    readable image; the alignment rows use a seeded subset): settings and reference encoders, as the
    rows' metric versions record them."""
    from raebench.analysis.references import REFERENCES

    rows = [r for rs in shown.values() for r in rs]
    lines = []
    probe = [r for r in rows if r.metric.startswith("probe-")]
    if probe:
        lines.append(f"probe: token-mean pooled latents, seeded per-class 50/50 split; linear {cfg.probe_method} "
                     f"({'with' if cfg.probe_batchnorm else 'without'} batchnorm), kNN k = {cfg.knn_k}")
    align = [r for r in rows if r.metric.startswith("align-")]
    if align:
        ns = "/".join(str(n) for n in sorted({int(r.n_images) for r in align}))
        refs = list(dict.fromkeys(r.extra.get("reference") for r in align if isinstance(r.extra, dict)))
        described = "; ".join(f"{n}: {REFERENCES.get(n).description}" for n in refs if n in REFERENCES)
        lines.append(f"alignment on {ns} images (seeded subset, --align-images {cfg.align_images}): token-mean pooled "
                     f"latents; mutual-kNN and CKNNA k = {cfg.mutual_k} on L2-normalised features; linear CKA "
                     f"{'debiased' if cfg.cka_debiased else 'biased'}" + (f"; {described}" if described else ""))
    return lines


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        tokenizer: list[str] = typer.Option([], "--tokenizer", "-t", help="Tokenizer to analyse; repeat or comma-separate."),
        tokenizer_config: list[Path] = typer.Option([], "--tokenizer-config", help="Official RAE YAML to analyse as a tokenizer; repeatable."),
        weights: list[str] = typer.Option([], "--weights", help="NAME=PATH: local weights for one tokenizer (as eval --weights); repeatable."),
        decoder: list[str] = typer.Option([], "--decoder", help="NAME=PATH: an RAE decoder checkpoint for one tokenizer; repeatable."),
        stats: list[str] = typer.Option([], "--stats", help="NAME=PATH: latent statistics (stat.pt) for one tokenizer; repeatable."),
        precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast around the tokenizer's encode/decode only)."),
        recompute: bool = typer.Option(False, "--recompute", help="Measure every row again instead of reusing stored ones."),
        reference: str = typer.Option("dinov2-b", "--reference", help="Comma-separated reference encoders (dinov2-b, dinov2-l, clip-b, clip-l, random-proj) or 'none'."),
        reference_weights: list[str] = typer.Option([], "--reference-weights", help="NAME=PATH: a local weights file for a reference; repeatable."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder (recursive; class subfolders enable the probes)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Named dataset (raebench ls datasets); default: the embedded photos."),
        domain: Optional[str] = typer.Option(None, "--domain", help="Domain tag for --data: in-domain or open-domain."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Crop size in px (ADM center crop)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Analyse a seeded random subset of N images."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset and of the probes' splits and training."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes (default: 0 on the CPU, min(8, cores) on a GPU)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results folder (rows, and figures under analysis/)."),
        probe_method: str = typer.Option("lbfgs", "--probe-method", help="Linear probe recipe: lbfgs (logistic) or ridge (closed form)."),
        batchnorm: bool = typer.Option(True, "--batchnorm/--no-batchnorm", help="Standardise pooled latents before the probe (BatchNorm without affine)."),
        knn_k: int = typer.Option(20, "--knn-k", help="Neighbours of the kNN classifier."),
        mutual_k: int = typer.Option(10, "--mutual-k", help="Neighbours of mutual-kNN and CKNNA."),
        cka_debiased: bool = typer.Option(False, "--cka-debiased", help="Debiased linear CKA (unbiased HSIC; N x N)."),
        align_images: int = typer.Option(1024, "--align-images", help="Alignment metrics use a seeded subset of at most this many images (CKNNA and debiased CKA hold N x N float64 matrices: ~2 GB at 10000)."),
        sigmas: str = typer.Option("0.1,0.25,0.5,1", "--sigmas", help="Latent noise levels in (0, 100], relative to the latent's per-element std; each once."),
        n_diag: int = typer.Option(16, "--n-diag", help="Images used by the decoder diagnostics (0: none)."),
        interp_pairs: int = typer.Option(4, "--interp-pairs", help="Image pairs interpolated (0: none)."),
        interp_steps: int = typer.Option(8, "--interp-steps", help="Steps per interpolation (at least 1)."),
        perceptual: str = typer.Option("auto", "--perceptual", help="auto | lpips-alex | lpips-vgg | rmse | none"),
        diffusability: bool = typer.Option(False, "--diffusability", help="Also train the stage-2 diffusability probe (slow on CPU)."),
        probe_preset: str = typer.Option("ditdh-s", "--probe-preset", help="Stage-2 model name the diffusability probe trains (ditdh-s, ditdh-b, ...; an unknown name lists them all)."),
        probe_steps: int = typer.Option(2000, "--probe-steps", help="Training steps of the diffusability probe."),
        probe_batch_size: int = typer.Option(32, "--probe-batch-size", help="Batch size of the diffusability probe's training."),
        probe_samples: int = typer.Option(256, "--probe-samples", help="Samples drawn to score the probe."),
        probe_sample_steps: int = typer.Option(50, "--probe-sample-steps", help="Euler grid points of the probe's sampler."),
        probe_images: int = typer.Option(512, "--probe-images", help="Images whose latents the probe trains on."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG figures."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved configuration and exit."),
    ) -> None:
        """Alignment with DINOv2/CLIP, probes, spectrum, robustness, smoothness (rows + PNG figures)."""
        from raebench import distributed
        from raebench.analysis.diffusability import ProbeConfig
        from raebench.analysis.references import REFERENCES
        from raebench.analysis.config import AnalyzeConfig, check_config, probe_model
        from raebench.analysis.run import analyze
        from raebench.cli import console, err_console, print_table
        from raebench.cli.core import _fmt, progress_bar
        from raebench.tokenizers import get_tokenizer_spec

        distributed.init(device)
        is_main = distributed.is_main()  # before analyze(), which releases the process group
        device = distributed.local_device(device)
        names = [get_tokenizer_spec(t).name for t in _csv(tokenizer)]  # unknown names fail here, with suggestions
        if not names and not tokenizer_config:
            raise RaebenchError("Give at least one --tokenizer NAME (see `raebench ls tokenizers`) or --tokenizer-config official.yaml.")
        if precision not in ("fp32", "bf16"):
            raise RaebenchError(f"Unknown --precision {precision!r}; use fp32 or bf16.")
        refs = [] if reference.strip().lower() == "none" else [REFERENCES.canonical(r) for r in _csv([reference])]
        if probe_method not in ("lbfgs", "ridge"):
            raise RaebenchError(f"Unknown --probe-method {probe_method!r}; use lbfgs or ridge.")
        cfg = AnalyzeConfig(
            tokenizers=tuple(names), tokenizer_configs=tuple(str(c) for c in tokenizer_config),
            weights=_parse_tokenizer_paths(weights, "--weights", "sd-vae-ft-ema=/models/sd-vae-ft-ema"),
            decoder=_parse_tokenizer_paths(decoder, "--decoder", "rae-dinov2-b=/runs/stage1/decoder"),
            stats=_parse_tokenizer_paths(stats, "--stats", "rae-dinov2-b=/models/stat.pt"),
            precision=precision, recompute=recompute,
            references=tuple(refs), reference_weights=_parse_reference_weights(reference_weights),
            data=data, dataset=dataset, domain=domain, resolution=resolution, limit=limit, seed=seed,
            batch_size=batch_size, device=device, num_workers=num_workers, results_dir=str(results),
            probe_method=probe_method, probe_batchnorm=batchnorm, knn_k=knn_k, mutual_k=mutual_k,
            cka_debiased=cka_debiased, align_images=align_images, sigmas=_parse_sigmas(sigmas), n_diag=n_diag, interp_pairs=interp_pairs,
            interp_steps=interp_steps, perceptual=perceptual, diffusability=diffusability, probe_images=probe_images,
            probe=ProbeConfig(preset=probe_model(probe_preset) if diffusability else probe_preset, steps=probe_steps, batch_size=probe_batch_size,
                              n_samples=probe_samples, sample_steps=probe_sample_steps, seed=seed),
            plots=plots,
        )
        check_config(cfg)  # before --dry-run prints it, and before any model loads
        if dry_run:
            if is_main:
                console.print_json(json.dumps(asdict(cfg), default=str))
            distributed.finish()
            return
        if not is_main:
            analyze(cfg)
            distributed.finish()
            return
        with progress_bar("analyze") as bar:
            out = analyze(cfg, on_progress=lambda label, d, t: bar(d, t, label))
        distributed.finish()

        shown = {rep.name: rep.rows + rep.reused for rep in out.reports}
        metrics = list(dict.fromkeys(r.metric for rows in shown.values() for r in rows))
        first = next((r for rows in shown.values() for r in rows), None)
        from rich.markup import escape  # a dataset or tokenizer named "[x]" is text, not rich markup

        t = Table(title=escape(f"analyze · {first.dataset if first else ''} · {resolution}px · n={out.n_images}"))
        t.add_column("metric", no_wrap=True, min_width=max(map(len, metrics), default=6))
        for rep in out.reports:
            t.add_column(escape(rep.name), justify="right")
        t.add_column("better", justify="center")
        for m in metrics:
            cells, hib = [], None
            for rep in out.reports:
                row = next((r for r in shown[rep.name] if r.metric == m), None)
                cells.append(_fmt(row.value) if row else "–")
                hib = row.higher_is_better if row is not None and isinstance(row.higher_is_better, bool) else hib
            t.add_row(m, *cells, {True: "↑", False: "↓"}.get(hib, ""))
        print_table(t)
        for line in _provenance(cfg, shown):
            console.print(line, highlight=False, soft_wrap=True)
        for rep in out.reports:
            for note in rep.notes:
                err_console.print(f"[yellow]{rep.name}:[/] {note}", highlight=False)
        if out.out_dir:
            err_console.print(f"figures and config: {out.out_dir}", highlight=False)
            for p in out.plots:
                err_console.print(f"  {p.name}", highlight=False)
        err_console.print(f"{out.seconds:.1f} s", highlight=False)
