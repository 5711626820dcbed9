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
