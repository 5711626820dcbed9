"""torchrun with 2 gloo processes gives the single-process numbers; crashes resume exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raebench.eval_config import EvalConfig
from raebench.evaluate import evaluate
from raebench.results import load


def _values(res: Path) -> dict[str, float]:
    df = load(res)
    return dict(zip(df["metric"], df["value"]))


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one(image_folder: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["eval", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32", "-b", "3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "raebench", *common, "--results", str(one)], check=True, env=env, capture_output=True)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "raebench",
         *common, "--results", str(two)], env=env, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _values(one), _values(two)
    assert a.keys() == b.keys() == {"psnr", "ssim"}
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-9)
    df = load(two, latest=False)
    assert len(df) == 2 and (df["n_images"] == 8).all() and df["device"].str.endswith("x2").all()
    assert not (two / ".work").exists()  # every rank's progress and the empty folders removed


class _CrashAfter:
    """Wraps a tokenizer; raises on the k-th encode call (a crash in the middle of a run)."""

    def __init__(self, tok, k: int):
        self.tok, self.k, self.calls = tok, k, 0
        self.name, self.weights_id = tok.name, tok.weights_id

    def encode(self, x):
        self.calls += 1
        if self.calls == self.k:
            raise RuntimeError("simulated crash")
        return self.tok.encode(x)

    def decode(self, z):
        return self.tok.decode(z)


def test_crash_then_rerun_gives_uninterrupted_numbers(image_folder: Path, tmp_path: Path):
    from raebench.tokenizers import build_tokenizer

    base = dict(tokenizer="bicubic-f8", data=str(image_folder), resolution=32, batch_size=2, device="cpu")
    ref = evaluate(EvalConfig(**base, results_dir=str(tmp_path / "ref")))
    res = tmp_path / "crash"
    cfg = EvalConfig(**base, results_dir=str(res))
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(cfg, tokenizer=_CrashAfter(build_tokenizer("bicubic-f8"), 3), save_every=1)
    assert load(res).empty  # no partial rows
    work = list((res / ".work").glob("*/rank0.pt"))
    assert len(work) == 1
    from raebench.checkpoint import load_state

    before = load_state(work[0])["seconds"]
    resumed = _CrashAfter(build_tokenizer("bicubic-f8"), 10**9)
    out = evaluate(cfg, tokenizer=resumed, save_every=1)
    assert before > 0 and out.rows[0].seconds >= round(before, 3)  # the work before the crash is counted
    assert resumed.calls == 2  # only the two batches not yet done (4 batches of 2, crash in the 3rd)
    assert {r.metric: r.value for r in out.rows} == pytest.approx({r.metric: r.value for r in ref.rows}, rel=1e-12)
    assert len(load(res, latest=False)) == 2
    assert not work[0].exists()


def test_corrupt_resume_state_is_ignored(image_folder: Path, tmp_path: Path):
    from raebench.tokenizers import build_tokenizer

    cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=32, batch_size=4, device="cpu",
                     results_dir=str(tmp_path))
    with pytest.raises(RuntimeError):
        evaluate(cfg, tokenizer=_CrashAfter(build_tokenizer("pixels"), 2), save_every=1)
    (state,) = list((tmp_path / ".work").glob("*/rank0.pt"))
    state.write_bytes(b"\x80\x02garbage")
    out = evaluate(cfg)
    assert out.n_images == 8


def test_a_rank_removes_only_its_own_progress(tmp_path: Path):
    """A rank that fails before saving (or finishes first) must not delete another rank's resume state."""
    from raebench.eval_progress import WorkState

    ranks = [WorkState(tmp_path, "key", r) for r in (0, 1)]
    for w in ranks:
        w.acquire()
    ranks[0].save({"done": 3})
    ranks[1].release(remove=True)  # rank 1 had saved nothing
    assert ranks[0].path.is_file() and ranks[0].load()["done"] == 3
    ranks[0].release(remove=True)
    assert not (tmp_path / ".work" / "key").exists()


def test_progress_of_runs_nobody_continues_is_reported_not_deleted(image_folder: Path, tmp_path: Path, caplog):
    """Progress left in .work by runs whose data or weights changed is never resumed: the next
    evaluation says how much there is (untouched for a day), and deletes nothing."""
    import dataclasses
    import logging
    import time

    work = tmp_path / ".work"
    old, fresh = work / "0123456789abcdef0123", work / "fedcba9876543210fedc"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "rank0.pt").write_bytes(b"x" * 2_000_000)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old / "rank0.pt", (two_days_ago, two_days_ago))
    cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=32, batch_size=4, device="cpu",
                     metrics=("psnr",), results_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="raebench.eval_progress"):
        evaluate(cfg)
        evaluate(dataclasses.replace(cfg, tokenizer="bicubic-f8"))  # as `compare` runs the next tokenizer: said once
    notes = [r.getMessage() for r in caplog.records if "left unfinished" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("1 evaluation left unfinished") and "(2.0 MB" in notes[0], notes
    assert (old / "rank0.pt").exists() and (fresh / "rank0.pt").exists()


def test_resume_saves_write_only_the_new_features(tmp_path: Path):
    """A save writes the per-image features added since the previous one, not every feature again
    (a full rewrite each time is O(N²) bytes over a run: ~50 GB for 50k images), and loads back whole."""
    from raebench.eval_progress import WorkState

    w = WorkState(tmp_path, "key", 0)
    w.acquire()
    batch = 64 * 256 * 4  # bytes of one (64, 256) float32 batch of features
    feats, scores = [], []
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        feats.append(torch.randn(64, 256, generator=g))
        scores.append(torch.rand(64, dtype=torch.float64, generator=g))
        before = {p: p.stat().st_mtime_ns for p in w.dir.glob("*.pt")}
        w.save({"done": 64 * (i + 1), "metrics": [{"cand": feats, "sum": torch.ones(3)}, {"values": scores, "n": i}]})
        new = [p for p in w.dir.glob("*.pt") if before.get(p) != p.stat().st_mtime_ns]
        assert sum(p.stat().st_size for p in new) < 1.5 * batch, [p.name for p in new]  # the main file and one segment
    st = WorkState(tmp_path, "key", 0).load()
    assert st["done"] == 6 * 64 and st["metrics"][1]["n"] == 5 and torch.equal(st["metrics"][0]["sum"], torch.ones(3))
    assert all(torch.equal(a, b) for a, b in zip(st["metrics"][0]["cand"], feats, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(st["metrics"][1]["values"], scores, strict=True))

    # a list that did not just grow (FID dropping its kept rows) starts over: one segment, the old ones removed
    w.save({"done": 7 * 64, "metrics": [{"cand": [], "sum": torch.ones(3)}, {"values": scores, "n": 6}]})
    assert len(list(w.dir.glob("rank0.seg-*.pt"))) == 1
    st = WorkState(tmp_path, "key", 0).load()
    assert st["metrics"][0]["cand"] == [] and len(st["metrics"][1]["values"]) == 6

    # a resumed process appends to the segments it loaded; a missing segment means no resume at all
    w2 = WorkState(tmp_path, "key", 0)
    st = w2.load()
    w2.save({**st, "metrics": [st["metrics"][0], {"values": st["metrics"][1]["values"] + [torch.zeros(64, dtype=torch.float64)], "n": 7}]})
    assert len(list(w.dir.glob("rank0.seg-*.pt"))) == 2
    assert len(WorkState(tmp_path, "key", 0).load()["metrics"][1]["values"]) == 7
    sorted(w.dir.glob("rank0.seg-*.pt"))[0].unlink()
    assert WorkState(tmp_path, "key", 0).load() is None
    w.release(remove=True)
    assert not (tmp_path / ".work").exists()
