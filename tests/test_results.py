"""Results: atomic append-only storage, round trip, concurrent writers, half-written files."""

import json
import multiprocessing as mp
from pathlib import Path

import pandas as pd
import pytest

from raebench.results import COLUMNS, DERIVED_COLUMNS, SCHEMA_VERSION, ResultRow, check_writable, load, write_rows


def _row(metric="psnr", value=1.0, tok="pixels", **kw) -> ResultRow:
    return ResultRow(tokenizer=tok, weights_id="none", dataset="d", split="all", domain="open-domain", resolution=64,
                     n_images=3, metric=metric, value=value, higher_is_better=True, metric_version="v1", **kw)


def test_round_trip_with_provenance(tmp_path: Path):
    write_rows([_row("psnr", 30.5), _row("ssim", 0.9)], tmp_path)
    df = load(tmp_path)
    assert list(df.columns) == [*COLUMNS, *DERIVED_COLUMNS]
    assert sorted(df["metric"]) == ["psnr", "ssim"]
    r = df.set_index("metric").loc["psnr"]
    assert r["value"] == 30.5 and r["schema_version"] == SCHEMA_VERSION
    assert r["torch_version"] and r["raebench_version"] and r["date"] and r["run_id"]
    from importlib import metadata

    pk = r["extra"]["packages"]  # what else can change a number: decoders, SSIM, metric networks
    assert pk["numpy"] == metadata.version("numpy") and pk["pillow"] == metadata.version("pillow")
    assert pk["scikit-image"] == metadata.version("scikit-image") and pk["python"]


def test_latest_row_wins_and_full_history_kept(tmp_path: Path):
    write_rows([_row(value=1.0, date="2026-01-01T00:00:00+00:00")], tmp_path)
    write_rows([_row(value=2.0, date="2026-01-02T00:00:00+00:00")], tmp_path)
    assert load(tmp_path)["value"].tolist() == [2.0]
    assert sorted(load(tmp_path, latest=False)["value"].tolist()) == [1.0, 2.0]


def test_half_written_and_temp_files_are_ignored(tmp_path: Path):
    write_rows([_row()], tmp_path)
    (tmp_path / "runs" / "broken.jsonl").write_text('{"tokenizer": "x", "val')
    (tmp_path / "runs" / ".x.jsonl.abc.tmp").write_text("garbage")
    df = load(tmp_path)
    assert len(df) == 1


def test_a_damaged_line_costs_only_that_line(tmp_path: Path, caplog):
    """A run file whose last line was cut (or one line of junk bytes) keeps its other rows."""
    path = write_rows([_row(metric="psnr"), _row(metric="ssim")], tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"broken": \n\xff\xfe not utf-8\n')
    df = load(tmp_path)
    assert sorted(df["metric"]) == ["psnr", "ssim"]
    assert "ignoring 2 line(s)" in caplog.text


def _writer(args):
    d, i = args
    write_rows([_row(tok=f"t{i}", metric=f"m{j}") for j in range(20)], d)


def test_concurrent_writers_lose_no_rows(tmp_path: Path):
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), i) for i in range(8)])
    assert len(load(tmp_path)) == 8 * 20


def test_unwritable_results_dir_fails_before_work(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    from raebench.errors import RaebenchError

    with pytest.raises(RaebenchError, match="not writable"):
        check_writable(f)


def test_rows_are_plain_json(tmp_path: Path):
    p = write_rows([_row()], tmp_path)
    rec = json.loads(p.read_text().splitlines()[0])
    assert rec["metric"] == "psnr"
    assert isinstance(pd.read_json(p, lines=True), pd.DataFrame)


def test_rows_with_unusable_key_values_are_skipped_with_a_warning_not_fatal(tmp_path: Path, caplog):
    """A JSON-valid row whose key column holds a list or an object, a null dataset, a value too large
    for a float or an unknown source used to break load() or every leaderboard (or vanish silently);
    each is now one skipped line, counted in the warning, and the good rows still build the table."""
    from raebench.leaderboard import pivot

    path = write_rows([_row(metric="psnr", value=30.0), _row(metric="ssim", value=0.9)], tmp_path)
    good = json.loads(path.read_text().splitlines()[0])
    bad = [{**good, "n_images": [1]}, {**good, "seed": {}}, {**good, "split": ["a"]}, {**good, "dataset": None},
           {**good, "value": 10 ** 400}, {**good, "source": "imagined"}, {**good, "tokenizer": 3}]
    with open(path, "a") as f:
        for r in bad:
            f.write(json.dumps(r) + "\n")
    df = load(tmp_path)
    assert sorted(df["metric"]) == ["psnr", "ssim"] and f"ignoring {len(bad)} line(s)" in caplog.text
    assert pivot(df).loc["pixels", "d/psnr"] == 30.0
    ok = {**good, "value": 31, "n_images": None, "seed": None, "run_id": "other"}  # ints and nulls still load
    with open(path, "a") as f:
        f.write(json.dumps(ok) + "\n")
    assert 31.0 in load(tmp_path, latest=False)["value"].tolist()


def test_git_hash_is_of_the_checkout_that_tracks_raebench_not_of_an_enclosing_project(tmp_path: Path, monkeypatch):
    """raebench installed into ``myproject/.venv`` recorded myproject's commit (and its +dirty) as its own;
    so did any raebench when the caller had ``GIT_DIR`` set to another repository."""
    import subprocess

    from raebench.results import source_commit

    def git(*args):
        return subprocess.run(["git", "-C", str(proj), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    proj = tmp_path / "myproject"
    installed = proj / ".venv" / "site" / "raebench" / "results.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("# an installed copy\n")
    (proj / ".gitignore").write_text(".venv/\n")
    (proj / "train.py").write_text("print(1)\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "project")
    assert source_commit(installed) == ""  # an installed raebench: no commit of its own
    monkeypatch.setenv("GIT_DIR", str(proj / ".git"))
    assert source_commit(Path(__file__).resolve().parent.parent / "raebench" / "results.py") != git("rev-parse", "--short=12", "HEAD")
    monkeypatch.delenv("GIT_DIR")
    git("add", "-f", str(installed))  # a vendored copy the project tracks: the project's commit is its source's
    git("commit", "-qm", "vendor raebench")
    assert source_commit(installed) == git("rev-parse", "--short=12", "HEAD")
    (proj / "train.py").write_text("print(2)\n")
    assert source_commit(installed).endswith("+dirty")


def test_load_parses_each_run_file_once_and_sees_a_replaced_one(tmp_path: Path, monkeypatch):
    """``compare`` loads the folder once per tokenizer: on a 100k-row folder each load re-parsed every
    file (~6 s of a 30 s compare of three weightless tokenizers on 4 images)."""
    from raebench import results

    path = write_rows([_row("psnr", 1.0)], tmp_path)
    write_rows([_row("ssim", 0.5)], tmp_path)
    assert load(tmp_path)["value"].tolist() == [1.0, 0.5]
    parsed = []
    real = results.json.loads
    monkeypatch.setattr(results.json, "loads", lambda s, *a, **k: parsed.append(s) or real(s, *a, **k))
    assert load(tmp_path)["value"].tolist() == [1.0, 0.5] and parsed == []
    text = path.read_text().replace('"value": 1.0', '"value": 2.0')
    results.atomic_write_bytes(path, text.encode())  # never done to a run file; a new file must still be read
    assert sorted(load(tmp_path)["value"].tolist()) == [0.5, 2.0] and len(parsed) == 1


def test_rows_measured_on_a_gpu_record_its_model(tmp_path: Path, monkeypatch):
    """``device`` said only ``cuda:0``: an H100's numbers and an A100's looked alike."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA Test GPU {i}")
    write_rows([_row("psnr", device="cuda:1 x2"), _row("ssim", device="cpu")], tmp_path)
    extra = load(tmp_path).set_index("metric")["extra"]
    assert extra["psnr"]["device_name"] == "NVIDIA Test GPU 1" and "device_name" not in extra["ssim"]


def test_rows_of_a_newer_schema_load_with_a_warning(tmp_path: Path, caplog):
    """A folder shared with a newer raebench: its rows still load (unknown columns dropped), and the
    user is told that this version may not read them fully, instead of nothing."""
    write_rows([_row(metric="psnr")], tmp_path)
    newer = {**json.loads(json.dumps(_row(metric="ssim").__dict__)), "schema_version": SCHEMA_VERSION + 1, "new_column": 1}
    (tmp_path / "runs" / "future.jsonl").write_text(json.dumps(newer) + "\n")
    df = load(tmp_path)
    assert sorted(df["metric"]) == ["psnr", "ssim"]
    assert f"1 row(s) under {tmp_path / 'runs'} were written by a newer raebench (schema {SCHEMA_VERSION + 1}" in caplog.text
    caplog.clear()
    load(tmp_path)  # compare loads the folder once per tokenizer: said once
    load(tmp_path / "missing")
    assert "newer raebench" not in caplog.text


def test_a_run_file_rewritten_in_place_with_the_same_size_is_read_again(tmp_path: Path):
    import os

    path = write_rows([_row("psnr", 1.0)], tmp_path)
    assert load(tmp_path)["value"].tolist() == [1.0]
    text = path.read_bytes().replace(b'"value": 1.0', b'"value": 3.0')
    st = path.stat()
    with open(path, "r+b") as f:  # same inode, same size: only the modification time tells
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert load(tmp_path)["value"].tolist() == [3.0]


def test_reported_rows_load_and_boolean_values_are_not_numbers(tmp_path: Path, caplog):
    write_rows([_row("psnr", 1.0, source="reported")], tmp_path)
    bad = {**json.loads((tmp_path / "runs").glob("*.jsonl").__next__().read_text()), "metric": "ssim", "value": True}
    (tmp_path / "runs" / "z.jsonl").write_text(json.dumps(bad) + "\n")
    df = load(tmp_path)
    assert df["metric"].tolist() == ["psnr"] and df["source"].tolist() == ["reported"]
    assert "ignoring 1 line(s)" in caplog.text


def test_a_row_keeps_its_own_provenance_and_candidate_set(tmp_path: Path):
    write_rows([_row(date="2020-01-01T00:00:00+00:00", git_hash="abc", candidates_fingerprint="cand1")], tmp_path)
    r = load(tmp_path).iloc[0]
    assert r["date"] == "2020-01-01T00:00:00+00:00" and r["git_hash"] == "abc"  # e.g. a reported number's date
    assert r["candidates_fingerprint"] == "cand1"  # the column, even without extra["candidates_fingerprint"]


def test_a_later_dated_version1_row_is_newer_than_an_older_version2_row(tmp_path: Path):
    write_rows([_row(value=2.0, date="2026-01-01T00:00:00+00:00")], tmp_path)  # written_ns > 0
    v1 = {k: v for k, v in _row(value=1.0, date="2026-06-01T00:00:00+00:00").__dict__.items()
          if k not in ("precision", "candidates_fingerprint", "written_ns")}
    (tmp_path / "runs" / "old.jsonl").write_text(json.dumps({**v1, "schema_version": 1, "run_id": "old"}) + "\n")
    assert load(tmp_path)["value"].tolist() == [1.0]  # the date (seconds) decides first; written_ns only within one


def test_write_order_is_strict_under_a_coarse_clock(tmp_path: Path, monkeypatch):
    from raebench import results

    monkeypatch.setattr(results.time, "time_ns", lambda: 1_000_000_000)
    a, b = results._write_ns(), results._write_ns()
    assert b > a


def test_atomic_path_fsyncs_before_the_rename_and_removes_its_temporary_on_error(tmp_path: Path, monkeypatch):
    import os

    from raebench import results

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(results.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(results.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    results.atomic_write_bytes(tmp_path / "f", b"x")
    assert calls == ["fsync", "replace"] and (tmp_path / "f").read_bytes() == b"x"
    with pytest.raises(ValueError), results.atomic_path(tmp_path / "g"):
        raise ValueError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_streamed_npz_refuses_wrong_row_counts_and_shapes_and_leaves_nothing(tmp_path: Path):
    import numpy as np

    from raebench.results import save_npz_streamed_atomic

    save_npz_streamed_atomic(tmp_path / "ok.npz", "arr_0", (3, 2), np.uint8, [np.ones((2, 2)), np.zeros((1, 2))],
                             labels=np.arange(3))
    with np.load(tmp_path / "ok.npz") as z:
        assert z["arr_0"].tolist() == [[1, 1], [1, 1], [0, 0]] and z["labels"].tolist() == [0, 1, 2]
    for chunks, needle in (([np.ones((2, 2))], "2 rows written, 3 announced"),
                           ([np.ones((4, 2))], "4 rows written, 3 announced"),
                           ([np.ones((3, 3))], "does not fit")):
        with pytest.raises(ValueError, match=needle):
            save_npz_streamed_atomic(tmp_path / "bad.npz", "arr_0", (3, 2), np.uint8, chunks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]


def test_a_nearly_full_disk_is_refused_before_work(tmp_path: Path, monkeypatch):
    from raebench import results
    from raebench.errors import RaebenchError

    monkeypatch.setattr(results, "os_free_bytes", lambda p: 1000)
    with pytest.raises(RaebenchError, match="Only 1000 bytes free"):
        check_writable(tmp_path, need_bytes=1 << 20)
    check_writable(tmp_path, need_bytes=10)


def test_the_metric_networks_weights_are_part_of_a_measurement(tmp_path: Path):
    """Two FID rows that differ only in the Inception weights behind them (extra.metric_weights) used to be
    one measurement: load() kept the newer and dropped the other. Now each metric's own networks are in the
    key (``metric_networks``); a PSNR row does not depend on the run's Inception; rows that recorded no
    networks (older or published rows) load with ''."""
    def fid(value, weights, metric="fid"):
        return _row(metric, value, extra={"metric_weights": {"inception": f"fid-v1||weights={weights}"}})

    write_rows([fid(5.0, "aaaa"), fid(30.0, "aaaa", "psnr")], tmp_path)
    write_rows([fid(7.0, "bbbb"), fid(31.0, "bbbb", "psnr")], tmp_path)
    write_rows([_row("ssim", 0.5)], tmp_path)  # no metric_weights recorded
    df = load(tmp_path)
    assert sorted(df[df["metric"] == "fid"]["value"]) == [5.0, 7.0]  # both kept
    assert list(df[df["metric"] == "psnr"]["value"]) == [31.0]  # the newer PSNR replaces the older
    nets = dict(zip(df["value"], df["metric_networks"]))
    assert len(nets[5.0]) == 12 and nets[5.0] != nets[7.0] and nets[30.0 if 30.0 in nets else 31.0] == ""
    assert nets[0.5] == ""


# Each column that identifies a measurement, with a second value for it. Written out here, not read
# from KEY_COLUMNS: a column dropped from the key must make this test fail (bench/mutants.py checks it).
_KEY_VARIANTS = {
    "tokenizer": "other-tokenizer", "weights_id": "sha256:other", "precision": "bf16", "dataset": "other-data",
    "split": "val", "resolution": 256, "n_images": 4, "seed": 1, "metric": "ssim", "metric_version": "v2",
    "data_fingerprint": "fp-other", "candidates_fingerprint": "cand-other",
}


@pytest.mark.parametrize("column", sorted(_KEY_VARIANTS))
def test_rows_differing_in_any_one_key_column_are_two_measurements(tmp_path: Path, column: str):
    """latest=True keeps the newest row per measurement: two rows that differ only in one identifying
    column (another seed, another data set, another metric version ...) are both kept, while a rerun of
    the same measurement (the same key, another value) replaces the older row."""
    base = _row(value=1.0)
    other = _row(value=2.0)
    setattr(other, column, _KEY_VARIANTS[column])
    assert getattr(other, column) != getattr(base, column)
    write_rows([base], tmp_path)
    write_rows([other], tmp_path)
    assert sorted(load(tmp_path)["value"]) == [1.0, 2.0], f"rows differing in {column} were merged into one"
    write_rows([_row(value=3.0)], tmp_path)  # the same key as ``base``: a rerun replaces it
    assert sorted(load(tmp_path)["value"]) == [2.0, 3.0]
