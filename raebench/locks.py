"""One writer per output: an exclusive, non-blocking lock on a run's folder or file.

Two jobs writing the same training run, latent cache or sample file would overwrite each other's
checkpoints or mix their parts, so the second one is refused with one sentence. The lock is
``flock`` on a small hidden file that stays in place (deleting it would let a third job lock a new
file while a second still holds the old one); the kernel releases it when the holder exits, also
on SIGKILL, so a crashed job never leaves a stale lock behind. Under torchrun only global rank 0
locks (the ranks of one job share the output).
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


class OutputLock:
    """An exclusive lock on ``lock_file``; :meth:`acquire` raises :class:`RaebenchError` when it is held."""

    def __init__(self, lock_file: str | os.PathLike, what: str, target: str | os.PathLike, advice: str) -> None:
        self.path, self.what, self.target, self.advice = Path(lock_file), what, str(target), advice
        self._f = None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RaebenchError(f"Another {self.what} is writing {self.target!r}; wait for it to finish, or "
                                f"{self.advice}.") from None
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the descriptor releases the flock
            self._f = None


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, target: str | os.PathLike,
              advice: str = "choose another output") -> Iterator[None]:
    """Hold :class:`OutputLock` for the block on global rank 0 (other ranks go through unlocked)."""
    if _global_rank() != 0:
        yield
        return
    lock = OutputLock(lock_file, what, target, advice).acquire()
    try:
        yield
    finally:
        lock.release()
