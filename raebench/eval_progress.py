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


#: the ``.work`` folders already reported on by this process (``compare`` evaluates one tokenizer after another)
_noted: set[str] = set()


def note_stale_progress(work_root, current: str) -> int:
    """Warn (once per process and folder: ``compare`` acquires one state per tokenizer) about other
    evaluations' progress under ``<results>/.work`` untouched for a day: it is resumed only by the
    same command on the same data and weights, so after the data or weights changed it is dead weight
    (at 50k images, hundreds of MB per metric). Nothing is deleted; the warning says how much and how
    to reclaim it. Returns how many folders it counts (0 when this process has already reported)."""
    import os
    import time
    from pathlib import Path

    root = os.path.realpath(work_root)
    if root in _noted:
        return 0
    _noted.add(root)

    now, count, size, oldest = time.time(), 0, 0, None
    for d in Path(work_root).iterdir():
        if d.name == current or not d.is_dir():
            continue
        try:
            files = [f.stat() for f in d.iterdir() if f.is_file()]
        except OSError:
            continue
        newest = max((f.st_mtime for f in files), default=now)
        if now - newest < STALE_PROGRESS_SECONDS:
            continue
        count += 1
        size += sum(f.st_size for f in files)
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

    Saves are incremental: the metric states' lists of tensors (per-image features and scores,
    which only grow by appending) go to segment files ``rank<R>.seg-<G>-<K>.pt`` holding just the
    elements added since the previous save, and ``rank<R>.pt`` holds the rest and names the
    segments. Rewriting every feature at each save would write O(N²) bytes in all: ~60 GB over
    a 50k-image evaluation with precision, density and KID at batch 64 (``bench/bench_scale.py
    resume``). A list that did not just grow (a FID side dropping its kept rows) starts a new
    generation G: one segment with every list whole, after which the old segments are removed.
    """

    VERSION = 3  # 3: lists of tensors in segment files; 2 (one file holding everything) still loads
    _SEGMENTED = "__segmented_list__"  # a placeholder in rank<R>.pt for a list kept in segments

    def __init__(self, root, key: str, rank: int):
        from pathlib import Path

        self.dir = Path(root) / ".work" / key
        self.path = self.dir / f"rank{rank}.pt"
        self._lock = None
        self._segments: list[str] = []  # segment files of the current generation, in order
        self._generation = ""
        # list path -> the (address, offset, shape, stride, dtype) of each element already in a segment
        self._held: dict[tuple, list[tuple]] = {}
        self._storages: list = []  # theirs, held so that no other tensor can be given those addresses meanwhile

    def acquire(self) -> None:
        from raebench.locks import open_locked

        self.dir.mkdir(parents=True, exist_ok=True)
        # without file locks (see raebench.locks), two identical evaluations started together share this
        # progress (a resume may then restart from zero); their rows are whole and identical either way
        self._lock, held = open_locked(self.path.with_suffix(".lock"),
                                       ": start an evaluation only once at a time, or a resume may restart from zero")
        if held is False:
            raise RaebenchError(
                f"Another evaluation with the same configuration is running on {str(self.dir)!r}; wait for it or "
                "use another --results folder."
            )
        from raebench.results import remove_orphan_temps

        # a save killed mid-write (SIGKILL) left its temporary file, as large as the metric states (features
        # of every image so far); we hold this rank's lock, so no live writer owns one (without a lock, an
        # identical evaluation may be saving now: its files are left alone)
        if held:
            remove_orphan_temps(self.dir, of=self.path.name)
            for tmp in self.dir.glob(f".{self.path.stem}.seg-*.tmp"):  # and of this rank's segment files
                tmp.unlink(missing_ok=True)
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
        if not isinstance(st, dict) or st.get("version") not in (2, self.VERSION):
            return None
        if st["version"] == 2:
            return st
        try:
            names, generation = [str(n) for n in st.pop("_segments")], str(st.pop("_generation"))
            lists = self._read_segments(names, st.pop("_counts"))
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("ignoring unreadable resume state %s (%s); this shard restarts", self.path, e)
            return None
        self._segments, self._generation = names, generation
        self._hold(lists)
        return _fill(st, lists)

    def _read_segments(self, names: list[str], counts: dict) -> dict[tuple, list]:
        """The lists of the segments ``names``, each of the length ``counts`` recorded for it."""
        from raebench.checkpoint import load_state

        lists: dict[tuple, list] = {tuple(p): [] for p in counts}
        for name in names:
            for path, items in load_state(self.dir / name).items():
                lists[tuple(path)].extend(items)
        for path, n in counts.items():
            if len(lists[tuple(path)]) != n:
                raise ValueError(f"{tuple(path)} holds {len(lists[tuple(path)])} of {n} saved elements")
        return lists

    def save(self, st: dict) -> None:
        import uuid

        from raebench.checkpoint import save_atomic

        skeleton, lists = _split(st)
        grown = set(lists) == set(self._held) and all(
            len(v) >= len(self._held[p]) and [_element_key(t) for t in v[:len(self._held[p])]] == self._held[p]
            for p, v in lists.items())
        if grown:
            new = {p: v[len(self._held[p]):] for p, v in lists.items()}
        else:  # a new generation: every list whole in its first segment
            self._generation, self._segments, new = uuid.uuid4().hex[:8], [], lists
        if any(new.values()) or not self._segments:
            name = f"{self.path.stem}.seg-{self._generation}-{len(self._segments)}.pt"
            save_atomic({p: [_compact(t) for t in v] for p, v in new.items()}, self.dir / name)
            self._segments.append(name)
        save_atomic({**skeleton, "version": self.VERSION, "_segments": self._segments, "_generation": self._generation,
                     "_counts": {p: len(v) for p, v in lists.items()}}, self.path)
        self._hold(lists)
        self._remove_segments(keep=set(self._segments))  # an earlier generation's, or a crashed save's

    def _hold(self, lists: dict[tuple, list]) -> None:
        self._held = {p: [_element_key(t) for t in v] for p, v in lists.items()}
        self._storages = [t.untyped_storage() for v in lists.values() for t in v]

    def _remove_segments(self, keep: set[str] = frozenset()) -> None:
        for p in self.dir.glob(f"{self.path.stem}.seg-*.pt"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def release(self, remove: bool) -> None:
        """Unlock; with ``remove``, delete this rank's progress (never another rank's: one that fails
        before saving must not delete the others' resume state), and the folders once they are empty."""
        if remove:  # unlinked while still locked, so no other job can lock the old file in between
            self.path.unlink(missing_ok=True)
            self._remove_segments()
            self.path.with_suffix(".lock").unlink(missing_ok=True)
            for folder in (self.dir, self.dir.parent):  # <key>/, then .work/ once no evaluation is left in it
                try:
                    folder.rmdir()
                except OSError:  # other ranks' files (or other evaluations) are still there
                    break
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _element_key(t) -> tuple:
    """What identifies a tensor's memory while its storage is alive (:meth:`WorkState._hold` keeps it
    so): the storage's address, the offset, shape, stride and dtype."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _compact(t):
    """``t`` alone in a storage of its own size: torch.save writes a view's whole storage."""
    t = t.detach().cpu()
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _split(st: dict) -> tuple[dict, dict[tuple, list]]:
    """``st`` with every list of the metric states (``st["metrics"][i]``, at any depth of dicts) replaced
    by a placeholder, and those lists by path (``("metrics", i, key, ...)``). By the ``Metric`` convention
    such lists hold tensors and only grow."""
    import torch

    lists: dict[tuple, list] = {}

    def walk(obj, path):
        if isinstance(obj, dict):
            return {k: walk(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, list) and all(isinstance(t, torch.Tensor) for t in obj):
            lists[path] = obj
            return WorkState._SEGMENTED
        return obj

    metrics = st.get("metrics")
    if not isinstance(metrics, list):
        return dict(st), {}
    return {**st, "metrics": [walk(m, ("metrics", i)) for i, m in enumerate(metrics)]}, lists


def _fill(skeleton: dict, lists: dict[tuple, list]) -> dict:
    """The inverse of :func:`_split`."""
    def walk(obj, path):
        if isinstance(obj, dict):
            return {k: walk(v, (*path, k)) for k, v in obj.items()}
        return lists[path] if isinstance(obj, str) and obj == WorkState._SEGMENTED else obj

    if not isinstance(skeleton.get("metrics"), list):
        return dict(skeleton)
    return {**skeleton, "metrics": [walk(m, ("metrics", i)) for i, m in enumerate(skeleton["metrics"])]}
