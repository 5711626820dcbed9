"""Jobs sharing folders, as a SLURM job array does: one results folder and one ``$RAEBENCH_CACHE`` for
many processes, on file systems where ``flock`` may be missing (Lustre without ``-o flock``: ENOSYS;
NFS without a lock daemon: ENOLCK)."""

import errno
import fcntl
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
from _metrics_helpers import stand_in_extractors  # noqa: F401
from raebench.metrics.cache import FeatureCache

from raebench.errors import RaebenchError
from raebench.eval_progress import WorkState
from raebench.locks import OutputLock


def _no_flock(monkeypatch, code: int) -> None:
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr("raebench.locks._warned_unlockable", set(), raising=False)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch, caplog, code):
    """Every lock failed as if another job held it: every evaluation on such a file system was refused
    with "Another evaluation with the same configuration is running", every output with "Another ... is
    writing", and the feature cache's writer raised a bare OSError."""
    _no_flock(monkeypatch, code)
    out = tmp_path / "run"
    lock = OutputLock(out, "training job").acquire()
    lock.release()
    work = WorkState(tmp_path / "results", "key", 0)
    work.acquire()
    work.release(remove=True)
    w = FeatureCache(tmp_path / "cache").writer("k", 2, 3)
    w.write(np.arange(2), np.ones((2, 3), np.float32))
    assert w.commit({}) and np.load(tmp_path / "cache" / "k.npy").sum() == 6
    warned = [r.getMessage() for r in caplog.records if "cannot lock files" in r.getMessage()]
    assert len(warned) == 3 and os.strerror(code) in warned[0] and "run one training job at a time" in warned[0]
    assert not (tmp_path / ".run.lock").exists() and not (tmp_path / "results" / ".work").exists()


@pytest.mark.parametrize("kind", ["output", "evaluation"])
def test_a_lock_file_removed_by_its_finishing_holder_is_not_held_twice(tmp_path: Path, monkeypatch, kind):
    """A finishing holder removes its lock file while holding it; a job that had opened that file just
    before locked it afterwards (a file no longer under the name) while a third job locked the new file:
    two jobs held "the" lock and wrote the same output."""
    def make():  # the output is never created, so each release removes the lock file
        return OutputLock(tmp_path / "run", "training job") if kind == "output" else WorkState(tmp_path / "results", "key", 0)

    def take(lock):
        lock.acquire()

    def give(lock):
        lock.release() if kind == "output" else lock.release(remove=True)

    first = make()
    take(first)
    real, armed = fcntl.flock, [True]

    def flock(fd, op):  # the second job opened the lock file; the first finishes before it locks
        if armed and op & fcntl.LOCK_EX:
            armed.clear()
            give(first)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    second = make()
    take(second)
    with pytest.raises(RaebenchError, match="Another"):
        take(make())  # a third job is refused: the second holds the lock of the file now under that name
    give(second)


def test_the_first_published_reference_features_are_kept_not_replaced(tmp_path: Path):
    """Jobs extracting one reference set at once each publish it; a later one replaced the file the
    others were reading (memory-mapped: on NFS the replaced file is gone under a reader on another node)."""
    cache = FeatureCache(tmp_path)
    a, b = cache.writer("k", 4, 3), cache.writer("k", 4, 3)
    for w in (a, b):
        w.write(np.arange(4), np.ones((4, 3), np.float32))
    assert a.commit({"by": "a"})
    reader = cache.load("k", 4)
    before = os.stat(cache.path("k")).st_ino
    assert b.commit({"by": "b"})
    assert os.stat(cache.path("k")).st_ino == before and reader.sum() == 12
    assert json.loads(cache.path("k").with_suffix(".json").read_text())["by"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]  # no temporary file left
    assert cache.path("k").stat().st_mode & 0o044 == 0o044 & ~_umask()  # a shared cache: readable by the group

    cache.path("k").write_bytes(b"not an array")  # an unreadable file is replaced
    c = cache.writer("k", 4, 3)
    c.write(np.arange(4), np.full((4, 3), 2, np.float32))
    assert c.commit({}) and cache.load("k", 4).sum() == 24


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_evaluation(tmp_path: Path, caplog, monkeypatch):
    """A read-only shared cache, a full quota or a file in the way raised from the middle of the pass."""
    (tmp_path / "afile").write_text("")
    assert FeatureCache(tmp_path / "afile" / "features").writer("k", 2, 3) is None
    assert "reference features not cached" in caplog.text

    w = FeatureCache(tmp_path / "ok").writer("k", 2, 3)
    w.write(np.arange(2), np.ones((2, 3), np.float32))

    def fail(*a, **k):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "link", fail)
    monkeypatch.setattr(os, "replace", fail)
    assert not w.commit({}) and os.strerror(errno.EDQUOT) in caplog.text
    assert list((tmp_path / "ok").iterdir()) == []


def _publish(args):
    root, start, i = args
    while time.time() < start:
        pass
    w = FeatureCache(root).writer("k", 64, 16)
    w.write(np.arange(64), np.full((64, 16), i, np.float32))
    return w.commit({"by": i})


def _read(args):
    root, start = args
    while time.time() < start:
        pass
    seen = 0
    for _ in range(400):
        a = FeatureCache(root).load("k", 64)
        if a is not None:
            assert (np.asarray(a) == a[0, 0]).all()  # one writer's array, whole
            seen += 1
    return seen


def test_processes_publishing_one_reference_set_at_once(tmp_path: Path):
    """Six processes (forked: no torch import each) commit the same key while two read it."""
    start = time.time() + 0.5
    with mp.get_context("fork").Pool(8) as pool:
        readers = pool.map_async(_read, [(str(tmp_path), start)] * 2)
        assert all(pool.map(_publish, [(str(tmp_path), start, i) for i in range(6)]))
        readers.get(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]


@pytest.mark.usefixtures("stand_in_extractors")
def test_an_evaluation_with_an_unwritable_cache_finishes(tmp_path: Path, monkeypatch, image_folder, caplog):
    """``$RAEBENCH_CACHE`` with a file in the way (or read-only, or full): the pass raised NotADirectoryError."""
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "afile"))
    cfg = EvalConfig(tokenizer="bicubic-f8", data=str(image_folder), resolution=16, batch_size=4, device="cpu",
                     metrics=("psnr", "fid"), results_dir=str(tmp_path / "res"))
    out = evaluate(cfg)
    assert {r.metric for r in out.rows} == {"psnr", "fid"} and "reference features not cached" in caplog.text


def test_a_job_killed_by_sigkill_leaves_no_stale_lock(tmp_path: Path):
    """The lock files stay behind a SIGKILL, but the kernel released their locks: the next job takes them
    at once (no hang, no refusal)."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from raebench.locks import OutputLock; from raebench.eval_progress import WorkState;"
            "a = OutputLock(sys.argv[1], 'job').acquire(); b = WorkState(sys.argv[2], 'key', 0); b.acquire();"
            "print('held', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "results")],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RaebenchError, match="Another job is writing"):
            OutputLock(tmp_path / "run", "job").acquire()
        with pytest.raises(RaebenchError, match="Another evaluation"):
            WorkState(tmp_path / "results", "key", 0).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (tmp_path / ".run.lock").exists() and (tmp_path / "results" / ".work" / "key" / "rank0.lock").exists()
    OutputLock(tmp_path / "run", "job").acquire().release()
    w = WorkState(tmp_path / "results", "key", 0)
    w.acquire()
    w.release(remove=True)


def test_an_analysis_still_drawing_is_not_taken_for_a_killed_one(tmp_path: Path):
    """An analysis stores each tokenizer's rows as it finishes and draws the figures at its end; another
    job of the array starting meanwhile took the missing figures for a killed run's, measured those parts
    again and said that run "stored these rows but not its figures"."""
    import pandas as pd

    from raebench.analysis.reuse import drawing, run_file_id, undrawn_parts

    stamp, analysis = "20261126T000000-abcd1234", tmp_path / "analysis"
    stored = pd.DataFrame({"metric": ["latent-erank"], "metric_version": ["v1"], "run_id": [run_file_id(stamp, "tok")],
                           "extra": [{}]})
    expected = {"spectrum": [("latent-erank", "v1")]}
    with drawing(analysis, stamp):  # the other job, at work
        assert undrawn_parts(stored, expected, set(), "tok", analysis) == {}
    assert not list(analysis.iterdir())  # its marker goes with it
    assert undrawn_parts(stored, expected, set(), "tok", analysis) == {"spectrum": (stamp, ["spectra.png"])}

    (analysis / f".{stamp}.live").write_text("")  # a killed run's marker: no lock held
    assert undrawn_parts(stored, expected, set(), "tok", analysis) == {"spectrum": (stamp, ["spectra.png"])}
    assert not list(analysis.iterdir())
