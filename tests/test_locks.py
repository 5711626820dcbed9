"""One job per output: the lock follows the output's resolved path, and a job that never created its
output leaves no lock file or folder behind."""

import os
from pathlib import Path

import pytest
from _locking import lock_state_at_unlink

from raebench.errors import RaebenchError
from raebench.locks import OutputLock, exclusive, lock_file


def test_every_spelling_of_an_output_takes_the_same_lock(tmp_path: Path, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "cache")
    assert lock_file(".") == lock_file(tmp_path / "link") == lock_file("../cache") == tmp_path / ".cache.lock"
    with exclusive(tmp_path / "cache", "caching job"):
        for spelling in (".", tmp_path / "link", "../cache/"):
            with pytest.raises(RaebenchError, match=r"Another caching job is writing"):
                OutputLock(spelling, "caching job").acquire()
    with pytest.raises(RaebenchError, match="file-system root"):
        lock_file("/")


def test_a_job_that_created_nothing_leaves_nothing(tmp_path: Path):
    out = tmp_path / "new" / "sub" / "run"
    with pytest.raises(ValueError):
        with exclusive(out, "training job"):
            raise ValueError("refused settings")
    assert not (tmp_path / "new").exists()
    with exclusive(out, "training job"):
        out.mkdir(parents=True)  # the job made its output: the lock file stays beside it
    assert (out.parent / ".run.lock").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_place_is_one_sentence(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RaebenchError, match=r"Cannot create the lock file .*; choose an output you can write"):
            OutputLock(ro / "run", "training job").acquire()
    finally:
        ro.chmod(0o755)


def test_a_file_in_the_way_is_one_sentence(tmp_path: Path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(RaebenchError, match=r"Cannot create the lock file .*afile/\.run\.lock.*choose an output you can write"):
        OutputLock(tmp_path / "afile" / "run", "training job").acquire()


def test_eacces_from_flock_means_held_by_another_job(tmp_path: Path, monkeypatch):
    # some file systems answer a held lock with EACCES instead of EWOULDBLOCK: that is "another job", not "cannot lock"
    import errno
    import fcntl

    def flock(fd, op):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(RaebenchError, match="Another training job is writing"):
        OutputLock(tmp_path / "run", "training job").acquire()


def test_cannot_lock_warns_once_per_folder(tmp_path: Path, monkeypatch, caplog):
    import errno
    import fcntl

    from raebench.locks import try_flock

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr("raebench.locks._warned_unlockable", set())
    (tmp_path / "b").mkdir()
    for p in (tmp_path / "x", tmp_path / "y", tmp_path / "b" / "z"):
        with open(p, "a") as f:
            assert try_flock(f, p) is None
    assert sum("cannot lock files" in r.getMessage() for r in caplog.records) == 2


def test_a_blocking_flock_waits_for_the_holder(tmp_path: Path):
    # the feature cache's writer waits (briefly) for a liveness probe that holds its new file, instead of going on unlocked
    import fcntl
    import threading

    from raebench.locks import try_flock

    p = tmp_path / "f"
    with open(p, "a") as holder, open(p, "a") as waiter:
        fcntl.flock(holder, fcntl.LOCK_EX)
        threading.Timer(0.2, lambda: fcntl.flock(holder, fcntl.LOCK_UN)).start()
        assert try_flock(waiter, p, blocking=True) is True


def test_a_refused_job_closes_the_lock_file_it_opened(tmp_path: Path):
    import warnings

    from raebench.locks import open_locked

    with exclusive(tmp_path / "run", "training job"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_locked(lock_file(tmp_path / "run")) == (None, False)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_the_lock_file_is_removed_while_still_held(tmp_path: Path, monkeypatch):
    # unlinked after closing, another job could lock the old file in between and hold a lock on a removed file
    path = lock_file(tmp_path / "run")
    seen = lock_state_at_unlink(monkeypatch, path)
    with exclusive(tmp_path / "run", "training job"):
        pass
    assert seen == ["held"] and not path.exists()


def test_other_ranks_of_torchrun_do_not_lock_before_the_group_is_up(tmp_path: Path, monkeypatch):
    lock = OutputLock(tmp_path / "run", "training job").acquire()
    try:
        monkeypatch.setenv("RANK", "1")
        with exclusive(tmp_path / "run", "training job"):  # rank 1 shares rank 0's output: not refused
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RaebenchError, match="Another"), exclusive(tmp_path / "run", "training job"):
            pass
    finally:
        lock.release()
