"""One job per output: the lock follows the output's resolved path, and a job that never created its
output leaves no lock file or folder behind."""

import os
from pathlib import Path

import pytest

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
