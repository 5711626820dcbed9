"""One writer per output: an exclusive, non-blocking lock on a run's folder or file.

Two jobs writing the same training run, latent cache, sample file, statistics file or reconstruction folder would
overwrite each other's checkpoints or mix their parts, so the second one is refused with one
sentence. The lock is ``flock`` on a small hidden file beside the output, named after the output's
resolved path (``-o .``, a symlink or another spelling of the same folder lock the same file). The
kernel releases it when the holder exits, also on SIGKILL, so a crashed job never leaves a stale
lock. A job that ends without creating its output (refused settings, missing data) removes the lock
file and the folders it created for it. Under torchrun only global rank 0 locks (the ranks of one job
share the output).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from raebench.errors import RaebenchError


def _global_rank() -> int:
    """The process's global rank: the initialised group's, else torchrun's RANK, else 0."""
    from raebench import distributed

    if distributed.world_size() > 1:
        return distributed.rank()
    return int(os.environ.get("RANK", "0") or 0)


def lock_file(target: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside the output, NAME from its resolved path."""
    real = Path(target).expanduser().resolve()
    if not real.name:
        raise RaebenchError(f"{str(target)!r} is the file-system root; choose a folder or file to write.")
    return real.with_name(f".{real.name}.lock")


class OutputLock:
    """An exclusive lock for writing ``target``; :meth:`acquire` raises :class:`RaebenchError` when
    another process holds it."""

    def __init__(self, target: str | os.PathLike, what: str, advice: str = "choose another output") -> None:
        self.target, self.what, self.advice = Path(target), what, advice
        self.path = lock_file(target)
        self._f = None
        self._made: list[Path] = []  # folders created for the lock file, deepest last

    def acquire(self) -> "OutputLock":
        import fcntl

        missing = []
        for d in (self.path.parent, *self.path.parent.parents):
            if d.exists():
                break
            missing.append(d)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = list(reversed(missing))
            f = open(self.path, "a")
        except OSError as e:
            raise RaebenchError(f"Cannot create the lock file {str(self.path)!r} for {str(self.target)!r} "
                                f"({e.strerror}); choose an output you can write.") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RaebenchError(f"Another {self.what} is writing {str(self.target)!r}; wait for it to finish, or "
                                f"{self.advice}.") from None
        self._f = f
        return self

    def release(self) -> None:
        """Unlock; when the output was never created, also remove the lock file (while still holding it,
        so no other job can lock the old file in between) and the folders made for it."""
        if self._f is None:
            return
        if not self.target.exists():
            self.path.unlink(missing_ok=True)
            for d in reversed(self._made):
                try:
                    d.rmdir()
                except OSError:
                    break
        self._f.close()  # closing the descriptor releases the flock
        self._f = None


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, what: str, advice: str = "choose another output") -> Iterator[None]:
    """Hold :class:`OutputLock` on ``target`` for the block on global rank 0 (other ranks go through)."""
    if _global_rank() != 0:
        yield
        return
    lock = OutputLock(target, what, advice).acquire()
    try:
        yield
    finally:
        lock.release()
