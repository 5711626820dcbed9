"""`raebench eval` re-run: rows stored for the same measurement are shown, not measured again (the rule
of `raebench compare`); missing metrics alone are measured; `--recompute` measures everything."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run

from raebench.results import load

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval(image_folder: Path, res: Path, *extra: str) -> list[str]:
    return ["eval", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32", "--device", "cpu",
            "--results", str(res), *extra]


def _runs(res: Path) -> int:
    return len(list((res / "runs").glob("*.jsonl")))


@pytest.fixture
def measured(monkeypatch):
    """The metrics each evaluation built now (a list, appended to per Evaluator)."""
    from raebench.evaluator import Evaluator

    built: list[tuple[str, ...]] = []
    init = Evaluator.__init__

    def spy(self, metric_names, *a, **k):
        built.append(tuple(metric_names))
        init(self, metric_names, *a, **k)

    monkeypatch.setattr(Evaluator, "__init__", spy)
    return built


def _forbid_measuring(monkeypatch) -> None:
    """Any metric network built or image decoded for the pass fails the test."""
    import raebench.evaluate as ev
    from raebench.evaluator import Evaluator

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(Evaluator, "_build_all", boom)
    monkeypatch.setattr(ev, "ImageDataset", boom)


def _killed_after_rows():
    """A WorkState.release that dies where the rows are written and the resume state is about to be removed:
    its files stay, the kernel drops its lock."""
    from raebench.eval_progress import WorkState

    release = WorkState.release

    def killed(self, remove):
        if remove:
            self._lock.close()
            raise KeyboardInterrupt
        release(self, remove)

    return killed


def test_a_finished_eval_re_run_shows_the_stored_rows_without_measuring(image_folder, tmp_path, capsys, monkeypatch):
    res = tmp_path / "res"
    code, out1, err = run(_eval(image_folder, res), capsys)
    assert code == 0, err
    first = load(res)
    _forbid_measuring(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    code, out2, err = run(_eval(image_folder, res), capsys)
    assert code == 0, err
    assert _runs(res) == 1
    text = " ".join(err.split())
    run_id, date = first["run_id"].iloc[0], first["date"].iloc[0]
    assert f"these are stored values of run {run_id} ({date}), not measured again" in text, text
    assert "--recompute measures them again" in text
    table = lambda s: [ln for ln in s.splitlines() if " psnr " in ln or " ssim " in ln]  # noqa: E731
    assert table(out2) == table(out1) and len(table(out2)) == 2
    # a mistyped metric option is still an error, though nothing is measured
    code, _, err = run(_eval(image_folder, res, "--option", "inception.dtpye=float64"), capsys)
    assert code == 2 and "inception takes no option dtpye" in " ".join(err.split()), err


def test_only_metrics_without_a_stored_row_are_measured(image_folder, tmp_path, capsys, monkeypatch, measured):
    res = tmp_path / "res"
    monkeypatch.setenv("COLUMNS", "250")
    code, out1, _ = run(_eval(image_folder, res, "-m", "psnr"), capsys)
    assert code == 0
    psnr_id = load(res)["run_id"].iloc[0]
    code, out, err = run(_eval(image_folder, res, "-m", "ssim,psnr"), capsys)
    assert code == 0, err
    assert measured == [("psnr",), ("ssim",)]
    df = load(res, latest=False)
    assert _runs(res) == 2 and sorted(df["metric"]) == ["psnr", "ssim"]  # psnr stored once, not twice
    text = " ".join(err.split())
    assert f"psnr: stored values of run {psnr_id}" in text, text
    rows = [ln.split()[1] for ln in out.splitlines() if ln.split()[1:2] in (["psnr"], ["ssim"])]
    assert rows == ["ssim", "psnr"]  # the order asked
    line = lambda s: next(ln for ln in s.splitlines() if " psnr " in ln).split()  # noqa: E731
    assert line(out) == line(out1)


def test_recompute_measures_again(image_folder, tmp_path, capsys, measured):
    res = tmp_path / "res"
    assert run(_eval(image_folder, res), capsys)[0] == 0
    code, _, err = run(_eval(image_folder, res, "--recompute"), capsys)
    assert code == 0, err
    assert measured == [("psnr", "ssim")] * 2 and _runs(res) == 2
    assert "stored values" not in err
    df = load(res, latest=False)
    assert df.groupby("metric")["value"].nunique().eq(1).all()  # the same numbers, measured twice


def test_changed_data_or_settings_are_measured(image_folder, tmp_path, capsys, measured):
    res = tmp_path / "res"
    assert run(_eval(image_folder, res), capsys)[0] == 0
    img = next(image_folder.rglob("*.png"))
    img.write_bytes(img.read_bytes() + b"\0")  # the same names, other content: another fingerprint
    assert run(_eval(image_folder, res), capsys)[0] == 0
    assert run(_eval(image_folder, res, "-r", "48"), capsys)[0] == 0
    assert run(_eval(image_folder, res, "--limit", "5"), capsys)[0] == 0
    assert run(_eval(image_folder, res, "--limit", "5", "--seed", "1"), capsys)[0] == 0
    assert run(_eval(image_folder, res, "--precision", "bf16"), capsys)[0] == 0
    assert len(measured) == 6 and _runs(res) == 6
    assert run(_eval(image_folder, res, "--limit", "5", "--seed", "1"), capsys)[0] == 0  # unchanged: reused
    assert len(measured) == 6


def test_other_weights_are_measured_and_the_same_weights_elsewhere_are_not(image_folder, tmp_path, capsys, measured):
    from test_reliability_eval import _tiny_vae

    res = tmp_path / "res"
    w1, w2 = _tiny_vae(tmp_path / "w1", 0), _tiny_vae(tmp_path / "w2", 1)
    common = ["--data", str(image_folder), "-r", "32", "--device", "cpu", "-m", "psnr", "--results", str(res)]
    for w in (w1, w2):
        assert run(["eval", "-t", "sd-vae-ft-ema", "--weights", str(w), *common], capsys)[0] == 0
    assert len(measured) == 2
    moved = tmp_path / "copy"
    w1.rename(moved)  # the same files in another folder: the same weights
    code, _, err = run(["eval", "-t", "sd-vae-ft-ema", "--weights", str(moved), *common], capsys)
    assert code == 0 and "stored values" in err and len(measured) == 2, err


def test_a_read_only_results_folder_serves_stored_rows(image_folder, tmp_path, capsys, monkeypatch):
    import raebench.results as results
    from raebench.errors import RaebenchError

    res = tmp_path / "res"
    assert run(_eval(image_folder, res, "-m", "psnr"), capsys)[0] == 0

    def read_only(d, *a, **k):
        raise RaebenchError(f"Results folder {str(d)!r} is not writable (Read-only file system); pass another with --results.")

    monkeypatch.setattr(results, "check_writable", read_only)
    code, _, err = run(_eval(image_folder, res, "-m", "psnr"), capsys)
    assert code == 0 and "stored values" in err, err
    code, _, err = run(_eval(image_folder, res, "-m", "psnr,ssim"), capsys)
    assert code == 2 and "is not writable" in err, err


def test_a_run_killed_after_its_rows_is_reused_and_its_resume_state_removed(image_folder, tmp_path, capsys,
                                                                            monkeypatch, measured):
    """Killed between writing its rows and removing its resume state, the re-run of the same command
    reuses the rows (one run file) and removes that state; a state of an unfinished --recompute stays."""
    from raebench.eval_progress import WorkState

    res = tmp_path / "res"
    release, killed = WorkState.release, _killed_after_rows()
    monkeypatch.setattr(WorkState, "release", killed)
    import raebench.evaluate as ev

    evaluate = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: evaluate(*a, **{**k, "save_every": 1}))
    code, _, _ = run(_eval(image_folder, res, "-b", "4"), capsys)
    assert code == 130 and _runs(res) == 1 and list((res / ".work").glob("*/rank0.pt"))
    monkeypatch.setattr(WorkState, "release", release)
    code, _, err = run(_eval(image_folder, res), capsys)
    assert code == 0 and "stored values" in err, err
    assert _runs(res) == 1 and not (res / ".work").exists() and len(measured) == 1

    # an unfinished --recompute (its state holds another run id) is not removed by a plain re-run
    monkeypatch.setattr(WorkState, "release", killed)
    code, _, _ = run(_eval(image_folder, res, "-b", "4", "--recompute"), capsys)
    assert code == 130 and _runs(res) == 2
    monkeypatch.setattr(WorkState, "release", release)
    st = torch.load(next((res / ".work").glob("*/rank0.pt")), weights_only=True)
    (res / "runs" / f"{st['run_id']}.jsonl").unlink()  # as if killed before writing its rows
    code, _, err = run(_eval(image_folder, res), capsys)
    assert code == 0 and "stored values" in err and list((res / ".work").glob("*/rank0.pt")), err



@pytest.mark.parametrize("crop", [True, False])
def test_a_score_row_named_like_the_tokenizer_is_not_reused(tmp_path, capsys, measured, crop):
    """`score --name bicubic-f8` over the reference folder of an eval stores rows with the same tokenizer
    name, weights ("none") and dataset; they measure another candidate set, so an eval of bicubic-f8 must
    not take them for its own (with no crop, the rows' fingerprint and resolution are the eval's too)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    res = tmp_path / "res"
    code, _, err = run(["score", "--references", str(folder), "--candidates", str(folder), "-m", "psnr",
                        "--name", "bicubic-f8", *(["-r", "32"] if crop else []), "--device", "cpu",
                        "--results", str(res)], capsys)
    assert code == 0, err
    assert (load(res)["candidates_fingerprint"] != "").all()
    measured.clear()  # score's own pass
    code, _, err = run(_eval(folder, res, "-m", "psnr"), capsys)
    assert code == 0, err
    assert measured == [("psnr",)]  # measured, not the score row's PSNR of identical images (100 dB)
    rows = load(res)
    ours = rows[(rows["candidates_fingerprint"] == "") & (rows["metric"] == "psnr")]
    assert len(ours) == 1 and ours["value"].iloc[0] < 50


def test_a_read_only_folder_holding_a_finished_runs_resume_state_serves_stored_rows(image_folder, tmp_path, capsys,
                                                                                   monkeypatch):
    """A shared read-only results folder may keep the resume state of a run killed after writing its rows:
    the re-run cannot remove that state (its lock file cannot be created), and still shows the stored rows
    (it stopped with the file system's 'Read-only file system' error)."""
    import errno

    import raebench.results as results
    from raebench.errors import RaebenchError
    from raebench.eval_progress import WorkState

    res = tmp_path / "res"
    release, killed = WorkState.release, _killed_after_rows()
    monkeypatch.setattr(WorkState, "release", killed)
    import raebench.evaluate as ev

    evaluate = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: evaluate(*a, **{**k, "save_every": 1}))
    assert run(_eval(image_folder, res, "-m", "psnr", "-b", "4"), capsys)[0] == 130
    monkeypatch.setattr(WorkState, "release", release)
    assert list((res / ".work").glob("*/rank0.pt"))

    def read_only(d, *a, **k):
        raise RaebenchError(f"Results folder {str(d)!r} is not writable (Read-only file system); pass another with --results.")

    def no_lock(self):
        raise OSError(errno.EROFS, "Read-only file system", str(self.path.with_suffix(".lock")))

    monkeypatch.setattr(results, "check_writable", read_only)
    monkeypatch.setattr(WorkState, "acquire", no_lock)
    code, _, err = run(_eval(image_folder, res, "-m", "psnr"), capsys)
    assert code == 0 and "stored values" in err, err
    assert list((res / ".work").glob("*/rank0.pt"))  # left as it was
