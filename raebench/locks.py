"""One writer per output: an exclusive, non-blocking lock on a run's folder or file.

Two jobs writing the same training run, latent cache, sample file, statistics file or reconstruction folder would
overwrite each other's checkpoints or mix their parts, so the second one is refused with one
sentence. The lock is ``flock`` on a small hidden file beside the output, named after the output's
resolved path (``-o .``, a symlink or another spelling of the same folder lock the same file). The
kernel releases it when the holder exits, also on SIGKILL, so a crashed job never leaves a stale
lock. A job that ends without creating its output (refused settings, missing data) removes the lock
file and the folders it created for it. Under torchrun only global rank 0 locks (the ranks of one job
share the output).

A lock file removed by its holder may still be open in a job that is about to lock it: a job checks,
once it holds a lock, that the file is still the one under that name, and otherwise locks the new one
(:func:`open_locked`), so two jobs never both hold "the" lock.

Where the file system cannot lock at all (Lustre mounted without ``-o flock`` answers ENOSYS, NFS
without a lock daemon ENOLCK, some FUSE and SMB mounts EOPNOTSUPP), refusing would refuse every job
as if another one held the lock; a job goes on without one instead, with one warning per folder that
says so (:func:`try_flock`). Where locks work only within one machine (NFS ``local_lock=flock``,
Lustre ``-o localflock``), jobs on different nodes are not kept apart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import IO, Iterator

from raebench.errors import RaebenchError

log = logging.getLogger(__name__)

#: what a lock held by another process answers (flock with LOCK_NB: EWOULDBLOCK; some file systems EACCES)
HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
_warned_unlockable: set[str] = set()  # folders already warned about in this process


def try_flock(f: IO | int, path: str | os.PathLike, blocking: bool = False, consequence: str = "") -> bool | None:
    """An exclusive ``flock`` on the open file (or descriptor) ``f`` of ``path``: True when it is held,
    False when another process holds it (only without ``blocking``), None when the file system
    cannot lock; then a warning, once per folder, says so and what follows (``consequence``)."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as e:
        if e.errno in HELD_ERRNOS and not blocking:
            return False
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in _warned_unlockable:
            _warned_unlockable.add(folder)
            log.warning("The file system of %s cannot lock files (flock: %s); going on without a lock%s.", folder,
                        e.strerror or errno.errorcode.get(e.errno, e.errno), consequence)
        return None


def open_locked(path: str | os.PathLike, consequence: str = "") -> tuple[IO | None, bool | None]:
    """Open (create) the lock file ``path`` and lock it without waiting: ``(file, True)`` when locked,
    ``(None, False)`` when another process holds it, ``(file, None)`` when the file system cannot lock
    (see :func:`try_flock`). A holder that finishes removes its lock file while still holding it; a
    job that opened the file just before then locks a file no longer under that name, so the lock
    must be of the file ``path`` names now, else it is taken again on that one."""
    while True:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # again: the finished holder may have removed it
        f = open(path, "a")  # noqa: SIM115 -- returned open: closing it releases the lock
        got = try_flock(f, path, consequence=consequence)
        if got is False:
            f.close()
            return None, False
        if got is None:
            return f, None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return f, True
        f.close()  # the previous holder removed it between our open and our lock


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
        missing = []
        for d in (self.path.parent, *self.path.parent.parents):
            if d.exists():
                break
            missing.append(d)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = list(reversed(missing))
            f, held = open_locked(self.path, f": run one {self.what} at a time on {str(self.target)!r}")
        except OSError as e:
            raise RaebenchError(f"Cannot create the lock file {str(self.path)!r} for {str(self.target)!r} "
                                f"({e.strerror}); choose an output you can write.") from None
        if held is False:
            raise RaebenchError(f"Another {self.what} is writing {str(self.target)!r}; wait for it to finish, or "
                                f"{self.advice}.")
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
