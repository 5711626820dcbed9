"""On-disk cache of reference features, so that comparing five tokenizers extracts them once.

A cached array is the (N, D) float32 output of one extractor (``inception/pool``) on one reference
set, rows in data order. Its key hashes everything that changes it:

* the reference set's identity: the image list's fingerprint (``ImageList.fingerprint``: relative
  paths and sizes) plus the crop and resolution (``adm-center-crop@256``), or an ``.npz``'s
  fingerprint;
* the extractor's identity: its definition version, non-default options (dtype, resize) and the
  fingerprint of the weights file actually loaded;
* ``CACHE_VERSION`` (bump when the file format or the meaning of a key changes).

Files: ``<root>/<key>.npy`` plus ``<key>.json`` describing it. Rows are written while the
evaluation streams, into a memory-mapped temporary file (memory stays constant in N), which is
fsynced and renamed onto its name only when every row was written (:class:`CacheWriter`); the JSON
goes through :func:`raebench.results.atomic_write_bytes`. A crash or an incomplete run (a resumed
or sharded evaluation) leaves no file under a valid name; the temporary file of a writer killed
outright (SIGKILL) is removed by the next writer in that folder (each live writer holds a lock on
its own). The root is ``$RAEBENCH_CACHE/features``
(default ``~/.cache/raebench/features``). A file that fails to load is ignored (and recomputed).

Jobs share the cache: several runs that extract the same reference features at once each write their
own temporary file, and the first to finish publishes it; the others keep that file (a hard link
never replaces an existing name) rather than replacing one that other jobs may be reading (on NFS a
replaced file that another node has memory-mapped is gone under it). The cache only saves work: a
cache folder that cannot be written (read-only, full, a file in the way) or a publication that
fails costs a warning, never the evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

from raebench.locks import try_flock
from raebench.results import _umask, atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def raebench_cache() -> Path:
    """raebench's cache folder: ``$RAEBENCH_CACHE``, default ``~/.cache/raebench``."""
    return Path(os.environ.get("RAEBENCH_CACHE") or Path.home() / ".cache" / "raebench").expanduser()


def cache_root() -> Path:
    return raebench_cache() / "features"


class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    @staticmethod
    def key(reference_id: str, extractor_identity: str, output: str) -> str:
        ident = {"reference": reference_id, "extractor": extractor_identity, "output": output, "v": CACHE_VERSION}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def load(self, key: str, n: int | None = None) -> np.ndarray | None:
        """The cached (N, D) array (memory-mapped), or None if absent, unreadable or not N rows."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            arr = np.load(p, mmap_mode="r")
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable feature cache %s (%s)", p, e)
            return None
        if arr.ndim != 2 or (n is not None and arr.shape[0] != n):
            log.warning("ignoring feature cache %s: shape %s, expected %s rows", p, arr.shape, n)
            return None
        return arr

    def writer(self, key: str, n: int, dim: int) -> CacheWriter | None:
        """A writer for ``key``'s (n, dim) array, or None (with a warning) when the cache folder cannot
        take one: the evaluation goes on without caching."""
        try:
            return CacheWriter(self.path(key), n, dim)
        except OSError as e:
            log.warning("reference features not cached: cannot write in %s (%s)", self.root, e.strerror or e)
            return None


class CacheWriter:
    """Rows of one (N, D) float32 array, written by index as they arrive; ``commit`` publishes the
    file only if every row was written, ``abort`` removes it."""

    def __init__(self, path: Path, n: int, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache from the other users
            # held while this writer lives; the kernel drops it even on SIGKILL (where the file system cannot
            # lock, remove_dead_writers takes every temporary file for a live writer's)
            try_flock(fd, tmp, blocking=True, consequence=": temporary feature files of killed runs stay until removed by hand")
            self.rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        except BaseException:
            _discard(Path(tmp), fd)
            raise
        self._fd = fd
        self.path, self.tmp = path, Path(tmp)
        self.written = np.zeros(n, dtype=bool)
        # a run that dies before commit/abort still removes its temporary file (not on SIGKILL:
        # remove_dead_writers, run by the next writer, does it then)
        self._cleanup = weakref.finalize(self, _discard, self.tmp, fd)

    def write(self, index: np.ndarray, values: np.ndarray) -> None:
        self.rows[index] = values
        self.written[index] = True

    @property
    def complete(self) -> bool:
        return bool(self.written.all())

    def commit(self, meta: dict) -> bool:
        """Publish the array if every row was written; True when the cache holds it afterwards (this
        writer's file, or an equal one another job published first). A failure is a warning."""
        if not self.complete:
            self.abort()
            return False
        shape = list(self.rows.shape)
        try:
            self.rows.flush()
            self.rows = None  # unmapped
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            published = self._publish(tuple(shape))
            if published:
                atomic_write_bytes(self.path.with_suffix(".json"), json.dumps({**meta, "shape": shape}, indent=1).encode())
        except OSError as e:
            log.warning("reference features not cached in %s (%s)", self.path.parent, e.strerror or e)
            self.abort()
            return False
        self._cleanup()  # this writer's temporary name (its file is published under a link, or redundant)
        return True

    def _publish(self, shape: tuple[int, ...]) -> bool:
        """Give the temporary file the cache name unless a valid file of this shape is already there
        (written by another job meanwhile, perhaps being read): a hard link never replaces a name.
        True when this writer's file went under the name."""
        try:
            os.link(self.tmp, self.path)
            return True
        except FileExistsError:
            try:
                if np.load(self.path, mmap_mode="r").shape == shape:
                    return False  # an equal array (same key) is there: leave it to its readers
            except (OSError, ValueError):
                pass  # unreadable: replace it
        except OSError:  # no hard links on this file system
            pass
        os.replace(self.tmp, self.path)
        return True

    def abort(self) -> None:
        self.rows = None
        self._cleanup()  # removes the file and releases its lock, once


def _discard(tmp: Path, fd: int) -> None:
    tmp.unlink(missing_ok=True)
    os.close(fd)


def remove_dead_writers(folder: Path) -> int:
    """Remove the temporary arrays of writers that died without cleaning up (SIGKILL, OOM, power):
    each live writer holds a lock on its file, so a file whose lock can be taken (and that is not
    brand new, which its writer may not have locked yet) has no writer left.
    Such files are as large as the arrays they were filling (50k x 2048 float32: 400 MB)."""
    import fcntl
    import time

    removed = 0
    for tmp in folder.glob(".*.npy.tmp"):
        try:
            if tmp.stat().st_mtime > time.time() - 60:  # created a moment ago: its writer may not hold the lock yet
                continue
            fd = os.open(tmp, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer
            os.close(fd)
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary feature file(s) of killed runs from %s", removed, folder)
    return removed
