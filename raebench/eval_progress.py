"""Per-rank progress of an evaluation, so that a crashed run resumes where it stopped."""

from __future__ import annotations

import logging

from raebench.errors import RaebenchError

log = logging.getLogger(__name__)


def work_key(ident: dict) -> str:
    """The folder name of a run's resume state: a hash of everything that changes its numbers."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


#: progress untouched this long belongs to a run nobody is continuing (a live run saves every 20 batches)
STALE_PROGRESS_SECONDS = 86400


def note_stale_progress(work_root, current: str) -> int:
    """Warn (once per call) about other evaluations' progress under ``<results>/.work`` untouched for a
    day: it is resumed only by the same command on the same data and weights, so after the data or
    weights changed it is dead weight (at 50k images, hundreds of MB per metric). Nothing is
    deleted; the warning says how much and how to reclaim it. Returns how many folders it counts."""
    import time
    from pathlib import Path

    now, count, size, oldest = time.time(), 0, 0, None
    for d in Path(work_root).iterdir():
        if d.name == current or not d.is_dir():
            continue
        try:
            files = [f.stat() for f in d.iterdir() if f.is_file()]
        except OSError:
            continue
        if not files or now - max(f.st_mtime for f in files) < STALE_PROGRESS_SECONDS:
            continue
        count += 1
        size += sum(f.st_size for f in files)
        newest = max(f.st_mtime for f in files)
        oldest = newest if oldest is None else min(oldest, newest)
    if count:
        log.warning("%d evaluation%s left unfinished in %s (%.1f MB, last saved %s or earlier) resume%s only when "
                    "the same command runs again on unchanged data and weights; if none will, remove the folders "
                    "there that are untouched for a day.", count, "s" if count > 1 else "", work_root, size / 1e6,
                    time.strftime("%Y-%m-%d", time.localtime(oldest)), "" if count > 1 else "s")
    return count


class WorkState:
    """Per-rank progress of an evaluation, saved atomically under ``<results>/.work/<key>/``.

    Holds the number of this shard's images consumed, every metric's ``state()`` and the skip
    lists. A file that fails to load (half-written by an older crash on a filesystem without atomic
    rename, or from an incompatible version) is ignored and the shard restarts from zero.
    """

    VERSION = 2  # 2: paired means keep per-image scores (their float sums of version 1 are not resumed)

    def __init__(self, root, key: str, rank: int):
        from pathlib import Path

        self.dir = Path(root) / ".work" / key
        self.path = self.dir / f"rank{rank}.pt"
        self._lock = None

    def acquire(self) -> None:
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_suffix(".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RaebenchError(
                f"Another evaluation with the same configuration is running on {str(self.dir)!r}; wait for it or "
                "use another --results folder."
            ) from None
        from raebench.results import remove_orphan_temps

        # a save killed mid-write (SIGKILL) left its temporary file, as large as the metric states (features
        # of every image so far); we hold this rank's lock, so no live writer owns one
        remove_orphan_temps(self.dir, of=self.path.name)
        if self.path.name == "rank0.pt":
            note_stale_progress(self.dir.parent, self.dir.name)

    def load(self) -> dict | None:
        from raebench.checkpoint import load_state
        from raebench.errors import CheckpointError

        if not self.path.exists():
            return None
        try:
            st = load_state(self.path)
        except CheckpointError as e:
            log.warning("ignoring unreadable resume state %s (%s); this shard restarts", self.path, e)
            return None
        if not isinstance(st, dict) or st.get("version") != self.VERSION:
            return None
        return st

    def save(self, st: dict) -> None:
        from raebench.checkpoint import save_atomic

        save_atomic({**st, "version": self.VERSION}, self.path)

    def release(self, remove: bool) -> None:
        """Unlock; with ``remove``, delete this rank's progress (never another rank's: one that fails
        before saving must not delete the others' resume state), and the folders once they are empty."""
        if remove:  # unlinked while still locked, so no other job can lock the old file in between
            for p in (self.path, self.path.with_suffix(".lock")):
                p.unlink(missing_ok=True)
            for folder in (self.dir, self.dir.parent):  # <key>/, then .work/ once no evaluation is left in it
                try:
                    folder.rmdir()
                except OSError:  # other ranks' files (or other evaluations) are still there
                    break
        if self._lock is not None:
            self._lock.close()
            self._lock = None
