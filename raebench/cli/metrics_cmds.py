"""``raebench score``: metrics on image sets that already exist (reconstructions, 50k samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from raebench.errors import RaebenchError


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score_cmd(
        references: str = typer.Option(..., "--references", "--ref", help="Folder of images or ADM .npz (arr_0, mu/sigma, mu_s/sigma_s)."),
        candidates: str = typer.Option(..., "--candidates", "--cand", help="Folder of images or .npz (arr_0) to score."),
        metrics: str = typer.Option("fid", "--metrics", "-m", help="Comma-separated metric names (raebench ls metrics)."),
        name: Optional[str] = typer.Option(None, "--name", help="Name of the candidate set in the results (default: its folder/file name)."),
        domain: str = typer.Option("open-domain", "--domain", help="Domain tag of the references: in-domain or open-domain."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r", help="ADM-center-crop folder images to R px (default: as they are)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        option: list[str] = typer.Option([], "--option", help="NAME.KEY=VALUE for an extractor or metric, e.g. inception.dtype=float64, inception.weights=FILE, lpips-vgg.weights=FILE (default $RAEBENCH_METRIC_OPTIONS)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results folder."),
        write: bool = typer.Option(True, "--write/--no-write", help="Write result rows."),
    ) -> None:
        """Score candidates against references: paired metrics match images, distribution metrics compare the sets.

        Paired metrics match images by name, or by position when a side is an .npz; gFID against an ADM
        reference batch uses its stored statistics (mu/sigma, mu_s/sigma_s)."""
        from raebench.cli.core import _split_metrics

        run_score(references, candidates, _split_metrics(metrics), name=name, domain=domain, resolution=resolution,
                  batch_size=batch_size, device=device, option=option, results=results, write=write)


def run_score(references: str, candidates: str, names: tuple[str, ...], *, name: Optional[str] = None,
              domain: str = "open-domain", resolution: Optional[int] = None, batch_size: int = 32, device: str = "auto",
              option: list[str] | None = None, results: Path = Path("results"), write: bool = True,
              flags: tuple[str, str] = ("--references", "--candidates")) -> None:
    """Score with a progress bar and print the table (shared by ``score`` and ``eval --samples``)."""
    from raebench import distributed
    from raebench.cli import err_console, print_table
    from raebench.cli.core import _fmt, not_computed_error, progress_bar, run_line
    from raebench.eval_config import parse_options
    from raebench.metrics.scoring import score

    if name is not None and (not name.strip() or not name.isprintable()):  # a row label in every table
        raise RaebenchError(f"--name {name!r} must be non-empty printable text (no newlines or control characters).")
    distributed.init(device)
    device = distributed.local_device(device)
    # no --option: None, so the metrics read $RAEBENCH_METRIC_OPTIONS (as eval does)
    kwargs = dict(name=name, domain=domain, resolution=resolution, batch_size=batch_size, device=device,
                  options=parse_options(option) if option else None, results_dir=str(results), write=write, flags=flags)
    if not distributed.is_main():
        score(references, candidates, names, **kwargs)
        distributed.finish()
        return
    with progress_bar("score") as bar:
        out = score(references, candidates, names, on_progress=lambda label, d, t: bar(d, t, label), **kwargs)
    distributed.finish()
    r0 = out.rows[0]
    # which rows the reference batch's stored mu/sigma made, rather than its images (the rows' extra says it too)
    from_stats = [r.metric for r in out.rows if r.extra.get("reference_statistics")]
    from rich.markup import escape  # a set named "[x]" is text, not rich markup

    t = Table(title=escape(f"{r0.tokenizer} vs {r0.dataset} · {'paired' if out.paired else 'unpaired'} · "
                           f"n={out.n_candidates} candidates, {out.n_references} reference images"
                           + (f" ({', '.join(from_stats)}: the reference's stored statistics)" if from_stats else "")))
    for c in ("metric", "value", "better", "notes"):
        t.add_column(c, justify="right" if c == "value" else "left")
    for r in out.rows:
        t.add_row(r.metric, _fmt(r.value), {True: "↑", False: "↓"}.get(r.higher_is_better, ""), escape(r.notes or ""))
    print_table(t)
    if out.skipped:
        err_console.print(f"[yellow]{len(out.skipped)} file(s) skipped[/] (listed in the run record).")
    err_console.print(run_line(out.seconds, r0.run_id, results, write), highlight=False, soft_wrap=True)
    if out.failed:
        raise not_computed_error(out.failed, out.rows, written=write)
