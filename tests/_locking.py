"""Test helper: is a lock file still held when its holder removes it?"""

import fcntl
from pathlib import Path


def lock_state_at_unlink(monkeypatch, lock: Path) -> list[str]:
    """Patch ``Path.unlink`` so that removing ``lock`` first tries to lock it from another open file;
    the returned list gets "held" (the holder removes it while still holding it, as it must: a job that
    opened the file just before then finds it gone) or "taken by another job" per removal."""
    seen, real = [], Path.unlink

    def unlink(self, *a, **k):
        if self == lock:
            with open(lock, "a") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("taken by another job")
                except BlockingIOError:
                    seen.append("held")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    return seen
