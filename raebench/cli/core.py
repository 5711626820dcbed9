"""Core commands: ``eval``, ``compare``, ``leaderboard``, ``ls``."""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from raebench.errors import RaebenchError, printable

DEFAULT_METRICS = "psnr,ssim"
GENERATION_METRICS = "fid,sfid,is,precision"  # eval --samples without --metrics (gFID and friends)


def _progress() -> Progress:
    from raebench.cli import err_console

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )


#: without a terminal (a batch job's log, ``2> file``) rich draws a bar only when the work ends, so
#: progress is a plain line this often instead
PROGRESS_LINE_EVERY_S = 30.0


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class ProgressLines:
    """Progress as a line every ``every`` seconds (and one when a stage ends), for logs:
    ``eval rae-dinov2-b: 1200/50000 (2 %) · 0:10:00 elapsed, ~6:46:40 left``. A new label (the next
    tokenizer of compare) starts a new count; nothing prints before the first update."""

    def __init__(self, label: str, emit: Callable[[str], None], every: float = PROGRESS_LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.emit, self.every, self.clock = label, emit, every, clock
        self.t0 = clock()
        self.first: tuple[float, int] | None = None  # (time, done) of the label's first update: the rate's origin
        self.state: tuple[int, int] | None = None  # (done, total) of the last update
        self.last_line = self.t0
        self.pending = False  # an update not yet printed

    def update(self, done: int, total: int, label: str | None = None) -> None:
        now = self.clock()
        if label and label != self.label:
            self.finish()
            self.label, self.t0, self.first, self.state = label, now, None, None
        if self.first is None:
            self.first = (now, done)
        self.state, self.pending = (done, total), True
        if now - self.last_line >= self.every:
            self._line(now)

    def finish(self) -> None:
        if self.pending:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        done, total = self.state
        text = f"{self.label}: {done}/{total}" + (f" ({100 * done // total} %)" if total else "")
        text += f" · {_hms(now - self.t0)} elapsed"
        t1, d1 = self.first
        if d1 < done < total and now > t1:
            text += f", ~{_hms((now - t1) / (done - d1) * (total - done))} left"
        self.emit(text)
        self.last_line, self.pending = now, False


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[..., None]]:
    """A progress bar on the main rank, as a callback ``update(done, total, label=None)`` (a new
    label replaces the description); on the other ranks the callback does nothing. The bar shows
    from the first update, so an error before any work (too few images, a missing weight) prints
    as one sentence without a half-drawn bar. Without a terminal, :class:`ProgressLines`."""
    from raebench import distributed
    from raebench.cli import err_console

    if not distributed.is_main():
        yield lambda done, total, label=None: None
        return
    if not err_console.is_terminal:
        lines = ProgressLines(label, lambda text: err_console.print(text, highlight=False, markup=False, soft_wrap=True))
        try:
            yield lines.update
        finally:
            lines.finish()
        return
    prog = _progress()
    task = prog.add_task(label, total=None)
    started = False

    def update(done: int, total: int, label: str | None = None) -> None:
        nonlocal started
        if not started:
            prog.start()
            started = True
        prog.update(task, completed=done, total=total, **({"description": label} if label else {}))

    try:
        yield update
    finally:
        if started:
            prog.stop()


def _split_metrics(metrics: str) -> tuple[str, ...]:
    from raebench.metrics import METRICS

    names = tuple(m.strip() for m in metrics.split(",") if m.strip())
    if not names:
        raise RaebenchError("--metrics is empty; give a comma-separated list such as psnr,ssim.")
    return tuple(METRICS.canonical(n) for n in names)


def _fmt(v) -> str:
    from raebench.leaderboard import _fmt as f

    return f(v)


def _decimals(v) -> int | None:
    """The decimals :func:`_fmt` shows ``v`` with; None for a value it shows otherwise (missing, inf, 1.2e-05)."""
    s = _fmt(v)
    if not isinstance(v, (int, float)) or "e" in s or not math.isfinite(v):
        return None
    return len(s.partition(".")[2])


def delta_text(table):
    """``table`` (:func:`raebench.leaderboard.compare_table`) with each ``Δ <tok>`` cell as text, shown with the
    decimals of the two values it is the difference of (the fewer of the two): -2.38 beside 76.41 and 74.03,
    where the value's own size gave -2.3820. For the terminal, Markdown and LaTeX; CSV keeps the numbers."""
    import pandas as pd

    from raebench.leaderboard import REPORTED_SUFFIX

    plain = [c for c in table.columns if not str(c).startswith("Δ ") and not str(c).endswith(REPORTED_SUFFIX)
             and c not in ("best", "best (reported)", "protocol")]
    deltas = [c for c in table.columns if str(c).startswith("Δ ") and str(c)[2:] in table.columns]
    if not plain or not deltas:
        return table
    base, out = plain[0], table.copy()  # Δ columns are against the first tokenizer's column
    for c in deltas:
        cells = []
        for d, b, v in zip(table[c], table[base], table[str(c)[2:]]):
            shown = [n for n in (_decimals(b), _decimals(v)) if n is not None]
            ok = isinstance(d, (int, float)) and math.isfinite(d) and len(shown) == 2
            cells.append(f"{d:.{min(shown)}f}" if ok else _fmt(d))
        out[c] = pd.Series(cells, index=table.index, dtype=object)
    return out


def write_output(out: Path, text: str) -> None:
    """Write an export atomically; a path that cannot be written is one sentence. As ``>`` does, a
    symbolic link is written through to its target (a dangling one creates it), and a file that
    exists keeps its permissions: the atomic rename would otherwise replace the link itself with a
    file and leave its target as it was, and give a ``chmod 600`` file the umask's mode."""
    import os

    from raebench.cli import console
    from raebench.results import atomic_write_bytes

    if out.is_dir():
        raise RaebenchError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'leaderboard.md')!r}.")
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    try:
        mode = target.stat().st_mode & 0o7777 if target.is_file() else None  # a private file stays private
    except OSError:
        mode = None
    try:
        atomic_write_bytes(target, text.encode(), mode=mode)
    except OSError as e:
        raise RaebenchError(f"Cannot write --out {str(out)!r} ({e.strerror or e}); give a writable file path.") from None
    console.print(f"wrote {out}")


def not_computed_error(failed: dict[str, str], rows, written: bool) -> RaebenchError:
    """The one sentence for metrics that got no value while the others did (shown after the table)."""
    kept = ", ".join(dict.fromkeys(r.metric for r in rows))
    return RaebenchError(f"Not computed: {'; '.join(failed.values())}; the rows of {kept} "
                         f"{'were written' if written else 'are above (not written)'}.")


def run_eval_with_progress(cfg, label: str, recompute: bool = False):
    """-> (the outcome of measuring the metrics with no stored row, or None when every row is stored,
    :class:`raebench.compare.EvalReuse`): ``eval`` reuses stored rows as ``compare`` does."""
    from dataclasses import replace

    from raebench import distributed
    from raebench.compare import eval_reuse
    from raebench.data import resolve_data
    from raebench.eval_config import build_tokenizer_from_config, check_config, check_data_counts, resolve_device
    from raebench.evaluate import evaluate
    from raebench.results import check_writable

    check_config(cfg)  # bad flags, too few images and an unwritable results folder fail before any model loads
    unwritable = None
    if cfg.write:
        try:
            check_writable(cfg.results_dir)
        except RaebenchError as e:  # a shared read-only folder may hold every row asked for: fail only if one is missing
            if recompute or not any((Path(cfg.results_dir) / "runs").glob("*.jsonl")):  # none stored: before any model
                raise
            unwritable = e
    data = resolve_data(cfg.data, cfg.dataset, cfg.limit, cfg.seed, cfg.domain)
    check_data_counts(cfg, data)
    # build first: a missing weight is one sentence, without a half-drawn progress bar; and the stored rows
    # are of these weights by content, known only once they are found
    tok = build_tokenizer_from_config(cfg, resolve_device(cfg.device))
    reuse = eval_reuse(cfg, tok, data, recompute=recompute)
    if not reuse.todo:  # every row stored: no metric network loads, no image is read
        return None, reuse
    if unwritable is not None:
        raise unwritable
    cfg = replace(cfg, metrics=reuse.todo)
    if not distributed.is_main():
        return evaluate(cfg, tokenizer=tok, data=data), reuse
    # the bar starts with the first finished batch, so an error while building the metrics'
    # networks (a missing Inception file, say) prints as one sentence without a half-drawn bar
    with progress_bar(label) as cb:
        return evaluate(cfg, tokenizer=tok, on_progress=cb, data=data), reuse


def _report_outcome(out, reuse=None, results_dir: str = "results", written: bool = True) -> None:
    """The table of one ``eval``: the rows measured now (``out``) and those reused (``reuse.rows``), in
    the order asked, with a line saying which values are stored ones, of which run; the last line names
    the run file of the rows measured now."""
    import pandas as pd
    from rich.markup import escape  # a tokenizer or folder named "[x]" is text, not rich markup

    from raebench.cli import err_console, print_table

    shown = {r.metric: (r.metric, r.value, r.higher_is_better, r.notes) for r in (out.rows if out else [])}
    old = reuse.rows if reuse is not None else None
    if old is not None and not old.empty:
        for _, r in old.iterrows():
            hib = None if pd.isna(r["higher_is_better"]) else bool(r["higher_is_better"])
            shown.setdefault(r["metric"], (r["metric"], float(r["value"]), hib, str(r["notes"] or "")))
    order = list(reuse.order) if reuse is not None else []
    rows = [shown[m] for m in order if m in shown] + [v for m, v in shown.items() if m not in order]
    first = out.rows[0] if out else old.iloc[0]
    n = out.n_images if out else _most(old, "n_images")
    t = Table(title=escape(f"{first.tokenizer} on {first.dataset} ({first.domain}) · {first.resolution}px · n={n}"))
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("better", justify="center")
    notes = any(r[3] for r in rows)  # e.g. KID's subset size below 1000, FID's N < d
    if notes:
        t.add_column("notes")
    for metric, value, hib, note in rows:
        t.add_row(metric, _fmt(value), {True: "↑", False: "↓"}.get(hib, ""), *([escape(note)] if notes else []))
    print_table(t)
    if out and out.skipped:
        err_console.print(f"[yellow]{len(out.skipped)} file(s) skipped[/] (listed in the run record):")
        for s in out.skipped[:10]:
            err_console.print(f"  {printable(s.path)}: {s.reason}", highlight=False)
        if len(out.skipped) > 10:
            err_console.print(f"  … and {len(out.skipped) - 10} more")
    elif not out and _most(old, "skipped"):
        err_console.print(f"[yellow]{_most(old, 'skipped')} file(s) were skipped[/] when these were measured "
                          "(listed in the run record).")
    nonfinite = out.nonfinite if out else _most(old, "nonfinite")
    if nonfinite:
        err_console.print(f"[red]{len(nonfinite) if out else nonfinite} image(s) gave NaN/Inf and were excluded "
                          "from every metric.[/]")
    if out:
        err_console.print(run_line(out.seconds, first.run_id, results_dir, written), highlight=False, soft_wrap=True)
    if reuse is not None and reuse.reused:
        runs = ", ".join(f"run {r} ({d})" for r, d in reuse.runs)
        what = "these are stored values" if not out else f"{', '.join(reuse.reused)}: stored values"
        err_console.print(f"{what} of {runs}, not measured again (same weights, data and settings); "
                          "--recompute measures them again.", highlight=False)


def _most(rows, column: str) -> int:
    """The largest count in ``column`` of stored rows (0 where rows of older versions lack it)."""
    import pandas as pd

    return int(pd.to_numeric(rows[column], errors="coerce").fillna(0).max())


def run_line(seconds: float, run_id: str, results_dir: str | Path, written: bool) -> str:
    """The last line of eval and score: the time, the run id and the file its rows are in."""
    from rich.markup import escape

    from raebench.results import run_file

    where = f" → {escape(printable(str(run_file(results_dir, run_id))))}" if written else " (not written)"
    return f"{seconds:.1f} s · run {run_id}{where}"


def _hib(table, *frames) -> dict:
    """higher_is_better for the metric of every column (registry first, then the rows' own flag)."""
    from raebench.metrics import higher_is_better

    out = {}
    for col in table.columns:
        m = str(col).split("/")[-1]
        h = higher_is_better(m)
        for f in frames:
            if h is None and f is not None and not f.empty:
                v = f.loc[f["metric"] == m, "higher_is_better"].dropna()
                h = bool(v.iloc[0]) if len(v) else None
        out[m] = h
    return out


def _hib_metrics(metrics) -> dict:
    from raebench.metrics import higher_is_better

    return {m: higher_is_better(m) for m in set(metrics)}


def _rich_table(table, title: str, bold: set):
    """``table`` for the terminal, ``bold`` cells bold green. Every text is escaped: rich reads
    ``[...]`` as markup, which swallowed ``[variant]``, ``[not re-verified]`` and ``[bf16]``."""
    from rich.markup import escape

    t = Table(title=escape(title), show_lines=False)
    names = [n or "" for n in table.index.names]
    for c in [*names, *map(str, table.columns)]:
        t.add_column(escape(c), justify="left" if c in (*names, "best", "best (reported)", "protocol") else "right",
                     overflow="fold")
    for label, row in table.iterrows():
        labs = list(label) if isinstance(label, tuple) else [label]
        cells = []
        for c in table.columns:
            v = row[c]
            s = escape(_fmt(v) if isinstance(v, float) else str(v))
            if (label, c) in bold:
                s = f"[bold green]{s}[/]"
            cells.append(s)
        t.add_row(*(escape(str(x)) for x in labs), *cells)
    return t


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help="Registered tokenizer name (raebench ls tokenizers)."),
        tokenizer_config: Optional[Path] = typer.Option(None, "--tokenizer-config", help="Official RAE YAML instead of a name."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder (recursive)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Named dataset (raebench ls datasets); default: the embedded photos."),
        domain: Optional[str] = typer.Option(None, "--domain", help="Domain tag: in-domain or open-domain (with --samples: of the reference, default open-domain, as score)."),
        metrics: Optional[str] = typer.Option(None, "--metrics", "-m", help=f"Comma-separated metric names (default {DEFAULT_METRICS}; with --samples {GENERATION_METRICS})."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r", help="Crop size (default 256; with --samples: ADM-center-crop folder images to R px, default as they are)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate a seeded random subset of N images."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the --limit subset (default 0)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per batch (default 16; with --samples 32, as score)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 (tokenizer forward only; default fp32)."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes (default: 0 on CPU, min(8, cores) on GPU)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results folder."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file/folder for the tokenizer."),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="RAE: a decoder checkpoint to use instead of the released one."),
        stats: Optional[str] = typer.Option(None, "--stats", help="RAE: latent statistics file (stat.pt)."),
        option: Optional[list[str]] = typer.Option(None, "--option", help="Metric/extractor option NAME.KEY=VALUE, e.g. inception.dtype=float64 (repeatable; default $RAEBENCH_METRIC_OPTIONS)."),
        recompute: bool = typer.Option(False, "--recompute", help="Measure every metric again instead of showing the rows stored for the same weights, data and settings (--samples always measures)."),
        samples: Optional[str] = typer.Option(None, "--samples", help="Generation mode: samples (.npz arr_0 or folder) to score against --reference."),
        reference: Optional[str] = typer.Option(None, "--reference", help="With --samples: an ADM reference batch .npz or an image folder."),
    ) -> None:
        """Reconstruct a dataset with a tokenizer and score it (one pass, all metrics).

        With --samples and --reference it scores generated samples instead, exactly as
        `raebench score --references REF --candidates SAMPLES` (default metrics fid,sfid,is,precision)."""
        from raebench import distributed
        from raebench.eval_config import EvalConfig

        if samples or reference:
            if not (samples and reference):
                raise RaebenchError("Generation mode needs both --samples SAMPLES.npz and --reference REF.npz.")
            given = {"--tokenizer": tokenizer, "--tokenizer-config": tokenizer_config, "--data": data, "--dataset": dataset,
                     "--limit": limit, "--seed": seed, "--precision": precision, "--num-workers": num_workers,
                     "--weights": weights, "--decoder": decoder, "--stats": stats}
            unused = [flag for flag, v in given.items() if v is not None]
            if unused:
                raise RaebenchError(f"--samples/--reference score existing images as `raebench score` does, where "
                                    f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect; drop "
                                    f"{'it' if len(unused) == 1 else 'them'} (or drop --samples to evaluate a tokenizer).")
            from raebench.cli.metrics_cmds import run_score

            passed = {"domain": domain, "resolution": resolution, "batch_size": batch_size}  # unset: score's defaults
            run_score(reference, samples, _split_metrics(GENERATION_METRICS if metrics is None else metrics), device=device, option=option,
                      results=results, flags=("--reference", "--samples"), **{k: v for k, v in passed.items() if v is not None})
            return
        distributed.init(device)
        device = distributed.local_device(device)
        if not tokenizer and not tokenizer_config:
            raise RaebenchError("Give --tokenizer NAME (see `raebench ls tokenizers`) or --tokenizer-config official.yaml.")
        if tokenizer and tokenizer_config:
            raise RaebenchError("Give --tokenizer or --tokenizer-config, not both (one tokenizer per eval; "
                                "`raebench compare` evaluates several).")
        if tokenizer:
            from raebench.tokenizers import get_tokenizer_spec

            tokenizer = get_tokenizer_spec(tokenizer).name  # unknown names fail here, with suggestions
        unset = {"resolution": resolution, "seed": seed, "batch_size": batch_size, "precision": precision}  # None: EvalConfig's default
        cfg = EvalConfig(
            tokenizer=tokenizer or "official-config", metrics=_split_metrics(DEFAULT_METRICS if metrics is None else metrics), data=data,
            dataset=dataset, domain=domain, limit=limit, device=device, num_workers=num_workers, results_dir=str(results),
            weights=weights, decoder=decoder, stats=stats, tokenizer_config=str(tokenizer_config) if tokenizer_config else None,
            metric_options=tuple(option) if option else None, **{k: v for k, v in unset.items() if v is not None},
        )
        out, reuse = run_eval_with_progress(cfg, f"eval {tokenizer or tokenizer_config}", recompute=recompute)
        main = distributed.is_main()
        if main:
            _report_outcome(out, reuse, cfg.results_dir, cfg.write)
        distributed.finish()
        if main and out is not None and out.failed:
            raise not_computed_error(out.failed, out.rows, written=cfg.write)

    @app.command("compare")
    def compare_cmd(
        tokenizer: list[str] = typer.Option(..., "--tokenizer", "-t", help="Repeat for each tokenizer."),
        data: Optional[str] = typer.Option(None, "--data", help="Image folder (recursive; class labels from first-level subfolders)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Named dataset (raebench ls datasets); with --data, your copy of it."),
        metrics: str = typer.Option(DEFAULT_METRICS, "--metrics", "-m", help="Comma-separated metric names (raebench ls metrics)."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Crop size in px (ADM center crop)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="A seeded random subset of N images."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset (recorded only when a subset is drawn)."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per batch."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available) | cpu | cuda | cuda:N."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes (default: 0 on the CPU, min(8, cores) on a GPU; 0: in the main process)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results folder."),
        reported: str = typer.Option("weights", "--reported", help="Published numbers to show: weights (for the weights loaded) | all (variants too) | none."),
        format: Optional[str] = typer.Option(None, "--format", "-f", help="Export instead of the terminal table: csv | md | latex."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the export to this file."),
        weights: list[str] = typer.Option([], "--weights", help="NAME=PATH: local weights for one tokenizer (repeatable)."),
        recompute: bool = typer.Option(False, "--recompute", help="Measure every metric again instead of reusing stored rows."),
    ) -> None:
        """Measured values beside published ones (with their protocol), plus the open/in-domain gap."""
        from raebench import distributed
        from raebench.cli import console, err_console, print_table
        from raebench.compare import compare
        from raebench.export import render
        from raebench.leaderboard import compare_bold, gap_table, row_best

        distributed.init(device)  # under torchrun each evaluation is sharded; rank 0 writes rows and prints
        device = distributed.local_device(device)
        if format not in (None, "csv", "md", "latex"):
            raise RaebenchError(f"Unknown --format {format!r}; use csv, md or latex.")
        names = _split_metrics(metrics)
        local = {}
        for w in weights:
            name, sep, path = w.partition("=")
            if not sep or not name or not path:
                raise RaebenchError(f"--weights {w!r} should read NAME=PATH, e.g. --weights sd-vae-ft-ema=/models/sd-vae-ft-ema.")
            local[name.strip()] = path.strip()
        kwargs = dict(data=data, dataset=dataset, resolution=resolution, limit=limit, seed=seed, batch_size=batch_size,
                      device=device, num_workers=num_workers, results_dir=str(results), reported=reported, weights=local,
                      recompute=recompute)
        if not distributed.is_main():
            compare(tokenizer, names, **kwargs)
            distributed.finish()
            return
        with progress_bar("compare") as bar:
            res = compare(tokenizer, names, **kwargs, on_progress=lambda label, d, t: bar(d, t, label))
        distributed.finish()
        table, computed, gap = res.table, res.computed, res.gap
        if table.empty:
            raise RaebenchError("Nothing to compare: no measured or reported values for these tokenizers and metrics.")
        skipped = f", {res.unreadable} unreadable file(s) skipped" if res.unreadable else ""
        title = (f"compare on {res.dataset} (n={res.n_images}{skipped}) · {resolution}px · computed now: "
                 f"{', '.join(computed) or 'nothing (all reused)'}")
        gtable = gap_table(gap, explicit=bool(format))  # an export says each gap's n and resolution
        gbold = row_best(gtable, _hib_metrics(gtable.index.get_level_values("metric")) if not gtable.empty else {})
        bold = compare_bold(table)  # on the numbers, before the Δ cells become text
        shown = delta_text(table)
        if format:
            text = render(table if format == "csv" else shown, format, bold=bold, caption=title)
            gtext = render(gtable, format, bold=gbold, caption="open-domain minus in-domain (measured)") if not gtable.empty else ""
            if format == "csv" and gtext:  # one CSV file holds one table: the gaps go to a file of their own
                if out:
                    gout = out.with_name(f"{out.stem}-gaps{out.suffix or '.csv'}")
                    write_output(gout, gtext)
                    err_console.print(f"domain gaps written to {gout}")
                else:
                    err_console.print("domain gaps left out of the CSV on standard output (one table per CSV); "
                                      "give --out NAME.csv to also write them to NAME-gaps.csv")
                gtext = ""
            if gtext:
                text += "\n" + gtext
            if out:
                write_output(out, text)
            else:
                console.print(text, markup=False, highlight=False, soft_wrap=True)
            return
        print_table(_rich_table(shown, title, bold))
        if not gtable.empty:
            print_table(_rich_table(gtable, "domain gap: open-domain minus in-domain (measured; largest n of each)",
                                      gbold))

    @app.command("leaderboard")
    def leaderboard_cmd(
        format: str = typer.Option("md", "--format", "-f", help="csv | md | latex | rows (every measurement behind the "
                                   "table, one CSV line each with all its provenance: weights, data fingerprint, n, seed, "
                                   "metric version, versions, git hash, date)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file (default: print)."),
        results: Path = typer.Option(Path("results"), "--results", help="Results folder."),
        reported: str = typer.Option("weights", "--reported", help="Published numbers as extra columns: weights | all | none."),
        gaps: bool = typer.Option(True, "--gaps/--no-gaps", help="Add open-minus-in-domain gap columns."),
    ) -> None:
        """Export results as a leaderboard: tokenizers x (dataset, n, source)/metric, best in bold."""
        from raebench.cli import console
        from raebench.export import render
        from raebench.leaderboard import pivot
        from raebench.results import load

        if format not in ("csv", "md", "latex", "rows"):
            raise RaebenchError(f"Unknown --format {format!r}; use csv, md, latex or rows.")
        if reported not in ("weights", "all", "none"):
            raise RaebenchError(f"--reported must be weights, all or none, not {reported!r}.")
        df = load(results)
        rep = None
        if reported != "none":
            from raebench.baselines import reported_frame

            rep = reported_frame(sorted(df["tokenizer"].unique()) if not df.empty else [], include_variants=reported == "all")
        if df.empty and (rep is None or rep.empty):
            raise RaebenchError(f"No results under {str(results)!r}; run `raebench eval` first.")
        if format == "rows":  # the citable record: one line per measurement (and published number) shown
            from raebench.export import rows_csv

            text = rows_csv(df, rep)
        else:
            from raebench.leaderboard import leaderboard_caption

            # a CSV has no caption: each of its columns names its resolution and n
            table = pivot(df, reported=rep, gaps=gaps, explicit=format == "csv")
            text = render(table, format, _hib(table, df, rep), caption=leaderboard_caption(df) if not df.empty else None)
        if out:
            write_output(out, text)
        else:
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    @app.command("ls")
    def ls_cmd(what: str = typer.Argument(..., help="tokenizers | metrics | datasets | references")) -> None:
        """List registered tokenizers, metrics, datasets or analysis reference encoders (no weights are loaded)."""
        from raebench.cli import print_table

        what = what.lower().rstrip("s")
        if what == "tokenizer":
            from raebench.tokenizers import TOKENIZERS

            t = Table(title="tokenizers")
            for c in ("name", "family", "latent (at px)", "dims", "params", "resolutions", "weights"):
                # names whole, weights folded rather than cut to `hf://face…`
                t.add_column(c, no_wrap=c == "name", overflow="fold" if c in ("weights", "version", "how to supply") else None)
            for s in TOKENIZERS:
                px = 256 if 256 in s.native_resolutions else s.native_resolutions[0]  # one it accepts
                shape = s.latent_shape(px)
                aliases = TOKENIZERS.aliases_of(s.name)
                params = "–" if s.params is None else (f"{s.params / 1e6:.1f}M" if s.params else "0")
                t.add_row(
                    s.name + (f" ({', '.join(aliases)})" if aliases else ""), s.family, "×".join(map(str, shape)) + f" @{px}",
                    str(math.prod(shape)), params, ",".join(map(str, s.native_resolutions)),
                    "\n".join(str(w) for w in s.weights) or "none",
                )
        elif what == "metric":
            from raebench.metrics import METRICS

            t = Table(title="metrics")
            for c in ("name", "kind", "better", "version", "description"):
                t.add_column(c, no_wrap=c == "name", overflow="fold" if c in ("weights", "version", "how to supply") else None)
            for s in METRICS:
                t.add_row(s.name, s.kind, "↑" if s.higher_is_better else "↓", s.version, s.description)
        elif what == "dataset":
            from raebench.data import DATASETS

            t = Table(title="datasets")
            for c in ("name", "domain", "split", "description", "how to supply"):
                t.add_column(c, no_wrap=c == "name", overflow="fold" if c in ("weights", "version", "how to supply") else None)
            for s in DATASETS:
                how = "bundled" if s.resolve_root else f"--dataset {s.name} --data DIR, or ${s.env_var}: {s.layout}"
                t.add_row(s.name, s.domain, s.split, s.description, how)
        elif what == "reference":
            from raebench.analysis.references import REFERENCES

            t = Table(title="reference encoders (raebench analyze --reference)")
            t.add_column("name", no_wrap=True)
            t.add_column("description", ratio=3)
            t.add_column("version", overflow="fold", ratio=2)
            t.add_column("weights", overflow="fold", ratio=2)
            for s in REFERENCES:
                if s.extractor is not None:
                    weights = f"as the {s.extractor} extractor of raebench eval"
                elif s.arch is not None:
                    weights = f"{s.weights or 'none registered'}; or --reference-weights {s.name}=PATH"
                else:
                    weights = "none"
                t.add_row(s.name, s.description, s.version, weights)
        else:
            raise RaebenchError(f"Unknown list {what!r}; use tokenizers, metrics, datasets or references.")
        print_table(t)
