"""CLI end to end on tiny data: eval -> compare -> leaderboard; user errors are one sentence."""

import os
from pathlib import Path

import pandas as pd
import pytest

from raebench.results import load
from _cli import run


def test_eval_compare_leaderboard(image_folder: Path, tmp_path: Path, capsys):
    res = tmp_path / "res"
    code, out, err = run(["eval", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "64", "--results", str(res), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "psnr" in out and "ssim" in out
    df = load(res)
    assert set(df["metric"]) == {"psnr", "ssim"} and (df["n_images"] == 8).all() and (df["dataset"] == "images").all()

    code, out, err = run(["compare", "-t", "bicubic-f8", "-t", "bicubic-f16", "-t", "pixels", "--data", str(image_folder),
                          "-r", "64", "--results", str(res), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "computed now: bicubic-f16, pixels" in out  # bicubic-f8 was reused, not recomputed
    assert len(load(res, latest=False)) == 6

    md = tmp_path / "lb.md"
    csv = tmp_path / "lb.csv"
    assert run(["leaderboard", "--format", "md", "--out", str(md), "--results", str(res)], capsys)[0] == 0
    assert run(["leaderboard", "--format", "csv", "--out", str(csv), "--results", str(res)], capsys)[0] == 0
    rows_csv = tmp_path / "rows.csv"
    assert run(["leaderboard", "--format", "rows", "--out", str(rows_csv), "--results", str(res)], capsys)[0] == 0
    rows = pd.read_csv(rows_csv)  # the citable record behind the table: every measurement with its provenance
    measured = rows[rows["source"] == "measured"]
    assert len(measured) == 6 and {"weights_id", "data_fingerprint", "n_images", "seed", "metric_version", "git_hash",
                                   "date", "resolution"} <= set(rows.columns)
    assert (measured["resolution"] == 64).all() and (measured["n_images"] == 8).all()
    table = pd.read_csv(csv, index_col=0)
    assert set(table.index) == {"bicubic-f8", "bicubic-f16", "pixels"}
    # a CSV has no caption: each column names its resolution and n (the Markdown says them above the table)
    assert list(table.columns) == ["images@64 n=8/psnr", "images@64 n=8/ssim"]
    assert table.loc["bicubic-f8", "images@64 n=8/psnr"] > table.loc["bicubic-f16", "images@64 n=8/psnr"]
    text = md.read_text()
    assert text.startswith("Measured on images (n=8); 64 px") and "\n| tokenizer |" in text and "**100.00**" in text  # pixels is best on PSNR


def test_eval_default_dataset_runs_offline(tmp_path: Path, capsys):
    code, out, err = run(["eval", "-t", "bicubic-f16", "-r", "64", "--limit", "4", "--results", str(tmp_path)], capsys)
    assert code == 0, err
    assert "skimage-photos" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "-t", "bicubic-f9"], "Did you mean 'bicubic-f8'"),
        (["eval", "-t", "pixels", "-m", "psnr,fidd"], "Unknown metric"),
        (["eval", "-t", "pixels", "--data", "/nonexistent/folder"], "does not exist"),
        (["eval", "-t", "pixels", "--decoder", "x.pt"], "takes no --decoder"),
        (["ls", "widgets"], "Unknown list"),
        (["eval", "-t", "pixels", "--domain", "foo"], "--domain takes in-domain or open-domain, not 'foo'"),
        (["score", "--references", "r", "--candidates", "c", "-m", "psnr", "--name", "a\nb"],
         "must be non-empty printable text"),
        (["eval", "-t", "pixels", "-m", ""], "--metrics is empty"),
        (["eval", "-t", "pixels", "--tokenizer-config", "x.yaml"], "not both"),
        (["compare", "-t", "pixels", "-t", "pixels"], "pixels is given more than once"),
        (["score", "--references", "a", "--candidates", "b", "--domain", "imagenet"], "--domain takes"),
    ],
)
def test_user_errors_are_one_sentence(argv, needle, tmp_path, capsys):
    code, out, err = run([*argv, *(["--results", str(tmp_path)] if argv[0] in ("eval", "compare", "score") else [])], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [(["eval", "--bogus"], "No such option: --bogus"),
                                          (["eval", "-r", "abc"], "Invalid value for '--resolution'")])
def test_usage_errors_are_click_messages_with_status_2(argv, needle, capsys):
    code, out, err = run(argv, capsys)  # typer >= 0.29 raises its vendored click's exceptions
    assert code == 2 and needle in err


def test_ls_lists_registries(capsys):
    for what in ("tokenizers", "metrics", "datasets"):
        code, out, _ = run(["ls", what], capsys)
        assert code == 0 and out.strip()


def test_eval_option_flag_reaches_the_metrics(image_folder: Path, tmp_path: Path, capsys):
    code, out, err = run(["eval", "-t", "pixels", "--data", str(image_folder), "-r", "32", "--device", "cpu",
                          "--results", str(tmp_path), "--option", "psnr.nonsense=1"], capsys)
    assert code == 2 and "takes no option nonsense" in err


def test_ctrl_c_exits_130_with_a_message(capsys):
    """typer >= 0.29 returns KeyboardInterrupt as exit code 130 instead of raising; scripts must see it."""
    from raebench.cli import app

    def boom() -> None:
        raise KeyboardInterrupt

    app.command("boom-test")(boom)
    try:
        code, out, err = run(["boom-test"], capsys)
    finally:
        app.registered_commands.pop()
    assert code == 130 and "interrupted" in err


def test_eval_at_another_size_than_a_fixed_size_tokenizer_says_which_resolution(image_folder, tmp_path, capsys):
    """An official YAML's RAE decodes at its own size: at another --resolution, one sentence naming it."""
    from test_stage2_official import ORACLE, official_yaml

    if not (ORACLE / "ditdh_ema.pt").exists():
        pytest.skip("oracle fixtures not present")
    official_yaml(tmp_path)
    code, out, err = run(["eval", "--tokenizer-config", str(tmp_path / "official.yaml"), "--data", str(image_folder),
                          "-r", "128", "-m", "psnr", "--results", str(tmp_path / "res"), "--device", "cpu"], capsys)
    assert code == 2 and "pass --resolution 64" in err and "Traceback" not in err


def test_compare_csv_holds_one_table_and_the_gaps_go_beside_it(image_folder: Path, tmp_path: Path, capsys):
    """`compare --format csv --out F` used to append the gap table, with its own header, to F (pandas
    then read that header as a data row); the gaps now go to F-gaps.csv, each file one table."""
    res = tmp_path / "res"
    common = ["--data", str(image_folder), "-r", "32", "-m", "psnr", "--results", str(res), "--device", "cpu"]
    assert run(["eval", "-t", "bicubic-f8", "--dataset", "imagenet-val", *common], capsys)[0] == 0  # the in-domain side
    out = tmp_path / "cmp.csv"
    code, _, err = run(["compare", "-t", "bicubic-f8", "-t", "pixels", *common, "--format", "csv", "--out", str(out)], capsys)
    assert code == 0, err
    assert "domain gaps written to" in " ".join(err.split())
    table = pd.read_csv(out)
    assert not table.isna().all(axis=1).any() and "pair" not in table.columns.tolist() + table.iloc[:, 0].tolist()
    gaps = pd.read_csv(tmp_path / "cmp-gaps.csv")
    assert list(gaps.columns[:3]) == ["pair", "metric", "resolution"] and gaps.loc[0, "bicubic-f8"] == 0.0  # same images
    assert gaps.loc[0, "pair"] == "images n=8 - imagenet-val n=8" and gaps.loc[0, "resolution"] == 32  # n and px said
    code, text, err = run(["compare", "-t", "bicubic-f8", "-t", "pixels", *common, "--format", "csv"], capsys)
    assert code == 0 and "pair,metric" not in text and "give --out NAME.csv to also write them to NAME-gaps.csv" in " ".join(err.split())


def test_score_help_says_how_paired_images_are_matched(capsys, monkeypatch):
    """README: paired by file name between folders, by position when a side is an .npz; the help said
    only "by name"."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(["score", "--help"], capsys)
    assert code == 0
    assert "by name, or by position when a side is an .npz" in " ".join(out.split())


def test_out_writes_through_a_symbolic_link(tmp_path: Path, capsys):
    """The atomic rename of --out replaced a link (paper/table.md -> the shared copy) with a file of
    its own and left the target stale; `>` and most tools write to the target."""
    from raebench.results import ResultRow, write_rows

    res = tmp_path / "res"
    write_rows([ResultRow(tokenizer="pixels", weights_id="none", dataset="d", split="val", domain="in-domain",
                          resolution=32, n_images=4, metric="psnr", value=30.0, higher_is_better=True,
                          metric_version="v1")], res)
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "board.md"
    target.write_text("old\n")
    link = tmp_path / "board.md"
    link.symlink_to(target)
    dangling = tmp_path / "new.md"
    dangling.symlink_to(tmp_path / "shared" / "new-target.md")
    for out in (link, dangling):
        assert run(["leaderboard", "--format", "md", "--out", str(out), "--results", str(res)], capsys)[0] == 0
        assert out.is_symlink() and "| pixels | 30.00 |" in out.resolve().read_text()
    assert "| pixels | 30.00 |" in target.read_text()


def _compare_psnr(image_folder: Path, res: Path, *extra: str) -> list[str]:
    return ["compare", "-t", "bicubic-f8", "-t", "pixels", "--data", str(image_folder), "-r", "32", "-m", "psnr",
            "--results", str(res), "--device", "cpu", *extra]


def test_compare_reads_a_read_only_results_folder_and_says_when_it_must_write(image_folder: Path, tmp_path: Path,
                                                                             capsys, monkeypatch):
    """A shared results folder on a read-only file system: compare refused it up front even when every
    row was stored (nothing to write); now it shows the table, and when a row is missing it says so in
    one sentence before any evaluation. Simulated for root, whom permissions do not stop: every file
    creation under the folder fails with EROFS, as on a read-only mount."""
    import errno
    import os
    import tempfile

    res = tmp_path / "res"
    assert run(_compare_psnr(image_folder, res), capsys)[0] == 0
    files = sorted(p for p in res.rglob("*"))
    real_mkstemp = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(res.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, out, err = run(_compare_psnr(image_folder, res), capsys)
    assert code == 0, err
    assert "computed now: nothing (all reused)" in " ".join(out.split())
    code, out, err = run(_compare_psnr(image_folder, res, "--format", "md"), capsys)
    assert code == 0 and "| images | psnr |" in out
    assert run(["leaderboard", "--results", str(res)], capsys)[0] == 0
    code, _, err = run(_compare_psnr(image_folder, res, "-t", "bicubic-f16"), capsys)
    err = " ".join(err.split())
    assert code == 2 and "bicubic-f16 needs psnr computed" in err and "Read-only file system" in err
    assert "Traceback" not in err and "eval bicubic-f16" not in err  # nothing was evaluated
    code, _, err = run(_compare_psnr(image_folder, res, "--recompute"), capsys)
    assert code == 2 and "is not writable" in err
    assert sorted(p for p in res.rglob("*")) == files


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_compare_reads_a_results_folder_without_write_permission(image_folder: Path, tmp_path: Path, capsys):
    """The same with real permissions (`chmod -R a-w`, as shared results on a cluster)."""
    import stat

    res = tmp_path / "res"
    assert run(_compare_psnr(image_folder, res), capsys)[0] == 0
    dirs = [res, *(p for p in res.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(d.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        code, out, err = run(_compare_psnr(image_folder, res), capsys)
        assert code == 0 and "nothing (all reused)" in " ".join(out.split()), err
        code, _, err = run(_compare_psnr(image_folder, res, "-t", "bicubic-f16"), capsys)
        assert code == 2 and "bicubic-f16 needs psnr computed" in " ".join(err.split())
    finally:
        for d in dirs:
            d.chmod(d.stat().st_mode | stat.S_IWUSR)


def test_out_keeps_the_permissions_of_the_file_it_replaces(tmp_path: Path, capsys):
    """The atomic rename gave a `chmod 600` export the umask's mode (readable by all); `>` keeps it."""
    from raebench.results import ResultRow, write_rows

    res = tmp_path / "res"
    write_rows([ResultRow(tokenizer="pixels", weights_id="none", dataset="d", split="val", domain="in-domain",
                          resolution=32, n_images=4, metric="psnr", value=30.0, higher_is_better=True,
                          metric_version="v1")], res)
    out = tmp_path / "private.csv"
    out.write_text("old\n")
    out.chmod(0o600)
    assert run(["leaderboard", "--format", "csv", "--out", str(out), "--results", str(res)], capsys)[0] == 0
    assert "pixels" in out.read_text() and out.stat().st_mode & 0o777 == 0o600


def test_progress_without_a_terminal_is_lines(image_folder: Path, tmp_path: Path, capsys):
    """In a batch job's log rich draws its bar only when the work ends; there progress is a line every
    PROGRESS_LINE_EVERY_S (with the time left) and one when each stage ends (compare: per tokenizer)."""
    from raebench.cli.core import ProgressLines

    now, lines = [0.0], []
    p = ProgressLines("eval x", lines.append, every=30, clock=lambda: now[0])
    for t, done in [(5, 10), (20, 20), (40, 30), (50, 40), (95, 50)]:
        now[0] = t
        p.update(done, 100)
    p.finish()  # the last update was printed already: no repeat
    now[0] = 100
    p.update(5, 10, label="eval y")
    now[0] = 101
    p.finish()
    assert lines == ["eval x: 30/100 (30 %) · 0:00:40 elapsed, ~0:02:02 left",  # 35 s for 20 since the first update
                     "eval x: 50/100 (50 %) · 0:01:35 elapsed, ~0:01:52 left",
                     "eval y: 5/10 (50 %) · 0:00:01 elapsed"]

    res = str(tmp_path / "res")
    code, _, err = run(["compare", "-t", "bicubic-f8", "-t", "pixels", "--data", str(image_folder), "-r", "32",
                        "--results", res, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "eval bicubic-f8: 8/8 (100 %)" in err and "eval pixels: 8/8 (100 %)" in err, err


def test_option_typos_are_errors_also_for_networks_this_run_does_not_use(image_folder: Path, tmp_path: Path, capsys):
    """`--option inception.dtpye=float64` in a psnr-only run was accepted without a word (options of
    networks not used now are ignored, so a typo looked as if it had worked); valid ones still pass."""
    base = ["eval", "-t", "pixels", "--data", str(image_folder), "-r", "32", "--device", "cpu", "--results", str(tmp_path)]
    code, out, err = run([*base, "--option", "inception.dtpye=float64"], capsys)
    assert code == 2 and "inception takes no option dtpye; it takes weights, dtype." in " ".join(err.split()), err
    code, out, err = run([*base, "--option", "inception.dtype=float65"], capsys)
    assert code == 2 and "dtype takes float32 or float64" in err, err
    code, out, err = run([*base, "--option", "inception.dtype=float64"], capsys)
    assert code == 0, err


def test_eval_help_shows_the_score_command_on_one_line(capsys, monkeypatch):
    """typer keeps the docstring's line breaks: the command was split after `raebench`."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(["eval", "--help"], capsys)
    assert code == 0 and "`raebench score --references REF --candidates SAMPLES`" in out


def test_tables_into_a_pipe_keep_names_and_numbers_whole(image_folder: Path, tmp_path: Path, capsys, monkeypatch):
    """Into a pipe or a log rich fitted tables to 80 columns: `ls tokenizers` cut names to `rae-dino…`
    and weights to `hf://face…`, `compare` split numbers over two lines. They are printed at their own width."""
    from raebench.cli import console
    from raebench.leaderboard import _fmt
    from raebench.metrics import METRICS
    from raebench.tokenizers import TOKENIZERS

    monkeypatch.setattr(console, "_width", 80)
    code, out, _ = run(["ls", "tokenizers"], capsys)
    assert code == 0
    for s in TOKENIZERS:
        assert f" {s.name} " in out
        for w in s.weights:
            assert str(w) in out
    code, out, _ = run(["ls", "metrics"], capsys)
    assert code == 0 and all(f" {s.name} " in out for s in METRICS)
    res = tmp_path / "res"
    code, out, err = run(["compare", "-t", "bicubic-f8", "-t", "bicubic-f16", "-t", "pixels", "--data", str(image_folder),
                          "-r", "32", "--device", "cpu", "--results", str(res)], capsys)
    assert code == 0, err
    df = load(res)
    for metric in ("psnr", "ssim"):
        values = [_fmt(df[(df.tokenizer == t) & (df.metric == metric)]["value"].iloc[0])
                  for t in ("bicubic-f8", "bicubic-f16", "pixels")]
        line = next(ln for ln in out.splitlines() if f" {metric} " in ln)
        assert all(f" {v} " in line for v in values), (values, out)


def test_ctrl_c_in_a_resuming_command_says_that_re_running_continues(image_folder: Path, tmp_path: Path, capsys,
                                                                      monkeypatch):
    import raebench.cli.core as core

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "run_eval_with_progress", stop)
    code, _, err = run(["eval", "-t", "pixels", "--data", str(image_folder), "--device", "cpu",
                        "--results", str(tmp_path)], capsys)
    assert code == 130 and "interrupted: run the same command to continue" in " ".join(err.split())


def test_a_peer_rank_stopping_is_reported_truly_when_it_printed_nothing(monkeypatch, capsys):
    """A rank SIGKILLed (the OOM killer) prints nothing, yet the surviving rank said "its error is above"; now
    it says the error is above if that rank printed one, and that torchrun's summary names the rank."""
    import raebench.cli as cli

    def collective_fails(**kw):
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(cli, "app", collective_fails)
    monkeypatch.setattr(cli, "_peer_failed", lambda e: True)  # a process group of 2 whose other rank is gone
    code, _, err = run(["eval"], capsys)
    err = " ".join(err.split())
    assert code == 1 and "another rank of this torchrun job stopped; its error, if it printed one, is above" in err, err
    assert "torchrun's summary names the rank and its exit code" in err and "(its error is above)" not in err, err


def test_eval_prints_its_title_whole_and_names_the_run_file(image_folder: Path, tmp_path: Path, capsys):
    """The title wrapped to the narrow table's width ("bicubic-f8 on imgs / (open-domain) · 256px · / n=400") and
    the last line named the run id only; now the title is one line and the last line names the run's file."""
    res = tmp_path / "res"
    code, out, err = run(["eval", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32", "-m", "psnr",
                          "--results", str(res), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "bicubic-f8 on images (open-domain) · 32px · n=8" in out.splitlines(), out
    files = list((res / "runs").glob("*.jsonl"))
    assert len(files) == 1 and f"run {files[0].stem} → {files[0]}" in err, err
    score = ["score", "--references", str(image_folder), "--candidates", str(image_folder), "-m", "psnr", "-r", "32",
             "--device", "cpu", "--results", str(res)]
    code, out, err = run(score, capsys)
    assert code == 0, err
    new = sorted(set((res / "runs").glob("*.jsonl")) - set(files))
    assert len(new) == 1 and f"→ {new[0]}" in err and any(ln.startswith("images vs images · paired") for ln in out.splitlines())
    code, _, err = run([*score, "--no-write"], capsys)
    assert code == 0 and "(not written)" in err and "→" not in err, err


def test_compare_delta_has_the_decimals_of_the_values_it_subtracts():
    """Δ was formatted by its own size: -2.3820 beside 76.41 and 74.03; now with the values' decimals (the
    fewer of the two), and as before where a value is missing or shown in scientific notation."""
    from raebench.cli.core import delta_text
    from raebench.leaderboard import MISSING

    nan = float("nan")
    idx = pd.MultiIndex.from_tuples([("d", "psnr"), ("d", "ssim"), ("d", "x"), ("d", "kid"), ("d", "y")],
                                    names=["dataset", "metric"])
    a = [76.41, 0.81234, 9.99, 2e-5, nan]
    b = [74.028, 0.80001, 12.3, 5e-4, 3.0]
    t = pd.DataFrame({"a": a, "a (reported)": [80.0, nan, nan, nan, nan], "b": b,
                      "Δ b": [y - x for x, y in zip(a, b)], "best": "", "protocol": ""}, index=idx)
    shown = delta_text(t)
    assert list(shown["Δ b"]) == ["-2.38", "-0.0123", "2.31", "4.800e-04", MISSING]
    assert shown["b"].equals(t["b"]) and t["Δ b"].dtype == float  # the other columns and the input unchanged


def test_compare_prints_delta_with_the_metric_s_decimals(image_folder: Path, tmp_path: Path, capsys):
    res = tmp_path / "res"
    argv = ["compare", "-t", "bicubic-f8", "-t", "bicubic-f16", "--data", str(image_folder), "-r", "32", "-m", "psnr",
            "--reported", "none", "--device", "cpu", "--results", str(res)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    df = load(res).set_index("tokenizer")["value"]
    assert 10 <= df["bicubic-f16"] < df["bicubic-f8"] < 100 and df["bicubic-f8"] - df["bicubic-f16"] < 10, df
    line = next(ln for ln in out.splitlines() if " psnr " in ln)
    assert f" {df['bicubic-f16'] - df['bicubic-f8']:.2f} " in line, line  # was -x.xxxx beside xx.xx
    code, text, err = run([*argv, "--format", "md"], capsys)
    assert code == 0 and f" {df['bicubic-f16'] - df['bicubic-f8']:.2f} |" in text, text


def test_table_titles_and_notes_are_text_not_rich_markup(image_folder: Path, tmp_path: Path, capsys):
    """A candidate set named "[red]mine[/]" lost its brackets in score's title (rich read them as markup; an unmatched
    "[/x]" raised a MarkupError); titles and notes are now escaped like compare's cells."""
    res = tmp_path / "res"
    for name in ("[red]mine[/]", "odd[/x]"):
        code, out, err = run(["score", "--references", str(image_folder), "--candidates", str(image_folder), "-m", "psnr",
                              "-r", "32", "--device", "cpu", "--results", str(res), "--name", name, "--no-write"], capsys)
        assert code == 0, err
        assert any(ln.startswith(f"{name} vs images · paired") for ln in out.splitlines()), out
