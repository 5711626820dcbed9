"""Resume state of evaluations (raebench.eval_progress): its key, the stale-progress note, locks, segments."""

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

import torch
from _locking import lock_state_at_unlink

from raebench import eval_progress
from raebench.eval_progress import WorkState, note_stale_progress, work_key


def test_the_key_does_not_depend_on_the_order_of_the_settings():
    assert work_key({"a": 1, "b": [2, 3]}) == work_key({"b": [2, 3], "a": 1}) != work_key({"a": 1, "b": [3, 2]})


def test_only_other_runs_untouched_for_a_day_are_counted(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(eval_progress, "_noted", set())
    old = time.time() - 2 * 86400
    for name, ages in (("stale", [old, old]), ("mixed", [old, None]), ("fresh", [None]), ("current", [old])):
        (tmp_path / name).mkdir()
        for i, t in enumerate(ages):
            f = tmp_path / name / f"rank{i}.pt"
            f.write_bytes(b"x" * 1000)
            if t is not None:
                os.utime(f, (t, t))
    with caplog.at_level(logging.WARNING, logger="raebench.eval_progress"):
        assert note_stale_progress(tmp_path, "current") == 1  # a folder with a fresh file is alive; ours is not counted
    assert "(0.0 MB" in caplog.text and "1 evaluation left unfinished" in caplog.text
    assert note_stale_progress(tmp_path, "current") == 0  # once per process and folder


def test_only_rank0_notes_stale_progress(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(eval_progress, "_noted", set())
    w = WorkState(tmp_path, "key", 1)
    w.acquire()
    w.release(remove=True)
    assert not eval_progress._noted  # every rank of a job would say it again
    w = WorkState(tmp_path, "key", 0)
    w.acquire()
    w.release(remove=True)
    assert eval_progress._noted


def test_without_locks_the_temporaries_of_a_live_twin_are_left_alone(tmp_path: Path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr("raebench.locks._warned_unlockable", set())
    w = WorkState(tmp_path, "key", 0)
    w.dir.mkdir(parents=True)
    tmp = w.dir / ".rank0.pt.ab12_x.tmp"
    tmp.write_bytes(b"an identical evaluation may be saving this now")
    w.acquire()
    assert tmp.exists()
    w.release(remove=False)


def test_a_version2_state_still_loads(tmp_path: Path):
    from raebench.checkpoint import save_atomic

    w = WorkState(tmp_path, "key", 0)
    w.dir.mkdir(parents=True)
    save_atomic({"version": 2, "done": 5, "metrics": [{"values": [torch.ones(2)]}]}, w.path)
    assert w.load()["done"] == 5


def test_segments_that_lost_elements_are_no_resume_and_unchanged_lists_write_no_segment(tmp_path: Path):
    from raebench.checkpoint import load_state, save_atomic

    w = WorkState(tmp_path, "key", 0)
    w.acquire()
    feats = [torch.ones(2, 3), torch.zeros(2, 3)]
    w.save({"done": 4, "metrics": [{"f": feats}]})
    w.save({"done": 4, "metrics": [{"f": feats}]})  # nothing new: no second segment
    assert len(list(w.dir.glob("rank0.seg-*.pt"))) == 1
    st = load_state(w.path)
    st["_counts"] = {p: n + 1 for p, n in st["_counts"].items()}  # the main file names more than the segments hold
    save_atomic(st, w.path)
    assert WorkState(tmp_path, "key", 0).load() is None
    w.release(remove=True)


def test_a_feature_view_is_saved_without_its_whole_storage(tmp_path: Path):
    w = WorkState(tmp_path, "key", 0)
    w.acquire()
    big = torch.zeros(4096, 64)  # 1 MiB; the batch's features are a 2-row view of it
    w.save({"done": 2, "metrics": [{"f": [big[:2]]}]})
    seg = next(w.dir.glob("rank0.seg-*.pt"))
    assert seg.stat().st_size < 100_000
    assert torch.equal(WorkState(tmp_path, "key", 0).load()["metrics"][0]["f"][0], big[:2])
    w.release(remove=True)


def test_the_progress_lock_file_is_removed_while_still_held(tmp_path: Path, monkeypatch):
    w = WorkState(tmp_path, "key", 0)
    w.acquire()
    seen = lock_state_at_unlink(monkeypatch, w.path.with_suffix(".lock"))
    w.release(remove=True)
    assert seen == ["held"]
