"""Image folders: :func:`scan_folder` lists the image files below a root (sorted by relative path,
class labels from first-level subfolders, hidden/metadata files, broken links and non-files recorded
as :class:`Skip`), :class:`ImageList` holds the result and its content fingerprint (the identity of the
data in result rows and cache keys), and :func:`subset` draws a seeded ``--limit`` subset.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from raebench.errors import DataError
from raebench.images import MAX_PIXELS, _open_regular

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif"})


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


@dataclass
class ImageList:
    """A resolved, ordered list of image files with labels and what was skipped while scanning."""

    root: str
    paths: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[Skip] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """Hash of the relative paths, byte sizes and each file's first and last bytes: changes when
        the data does, not when the folder moves (see :meth:`_compute_fingerprint`). Computed once
        per list: every result row and cache key asks for it."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        """Relative names, sizes and the first and last 8 KiB of every file: content, not just names
        (an image replaced by another of the same byte size is other data), and not mtimes (a copy
        of the same files elsewhere is the same data). Reading 16 KiB per file keeps this to about
        a second per 10,000 images; an edit inside a large uncompressed file can go unnoticed."""
        h = hashlib.sha256()
        report = _Progress(f"fingerprinting {self.root}: %d of {len(self.paths)} files read")
        for i, p in enumerate(self.paths):
            report(i)
            try:
                with _open_regular(p) as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):  # a FIFO would never end
                        raise OSError(errno.EINVAL, "not a regular file")
                    size = st.st_size
                    head = f.read(FINGERPRINT_BYTES)
                    if size > 2 * FINGERPRINT_BYTES:
                        f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
                    tail = f.read(FINGERPRINT_BYTES)
            except OSError:
                size, head, tail = -1, b"", b""
            # a name that is not UTF-8 arrives surrogate-escaped: hash its bytes as on disk (UTF-8 names
            # hash exactly as they always did, so earlier results keep their fingerprint)
            h.update(f"{relative(p, self.root)}\0{size}\n".encode("utf-8", "surrogateescape"))
            h.update(hashlib.sha256(head + tail).digest())
        return h.hexdigest()[:16]


#: bytes read from each end of every file for a folder's fingerprint (:meth:`ImageList.fingerprint`)
FINGERPRINT_BYTES = 8192
#: seconds between the progress lines of a folder's listing and fingerprint (ImageNet train: 1.28M
#: files, ~20 s and ~1 min with the files in the page cache, minutes more from a cold disk)
PROGRESS_SECONDS = 15.0


class _Progress:
    """``report(done)`` logs ``message % done`` at most every PROGRESS_SECONDS (on the main rank), the
    first time only once that long has passed: phases that finish quickly say nothing."""

    def __init__(self, message: str) -> None:
        import time

        self.message, self.clock = message, time.monotonic
        self.next = self.clock() + PROGRESS_SECONDS
        self.quiet = os.environ.get("RANK", "0") != "0"  # torchrun's other ranks repeat the same work

    def __call__(self, done: int) -> None:
        if not self.quiet and self.clock() >= self.next:
            log.info(self.message, done)
            self.next = self.clock() + PROGRESS_SECONDS


def scan_folder(root: str | os.PathLike, paths: Sequence[str] | None = None) -> ImageList:
    """List image files below ``root`` recursively (extensions case-insensitive), sorted.

    Class labels come from the first-level subfolders when every image lives in one; otherwise all
    labels are -1. Hidden files and folders (a leading dot) and ``__MACOSX`` folders below the root are
    not read (recorded as skipped). Symlinked folders are followed, each real folder once, in sorted order: the first
    name that reaches a folder lists it (and labels its images, so ``root/cls_x -> storage/cls_x``
    keeps class ``cls_x``). Recorded as skipped instead: a later way to a folder already listed (a
    cycle, a second link, or the real folder after a link to it), folders that cannot be listed,
    broken symlinks, and files named like images that are not regular files (a FIFO). A folder
    named like an image is an ordinary folder.
    """
    if MAX_PIXELS is None:
        raise DataError(f"RAEBENCH_MAX_PIXELS={os.environ.get('RAEBENCH_MAX_PIXELS')!r} is not a positive whole number "
                        "of pixels; set it to e.g. 268435456 (16384²) or unset it.")
    rootp = Path(root).expanduser()
    if not rootp.is_dir():
        raise DataError(f"Data folder {str(rootp)!r} does not exist or is not a directory.")
    found: list[str] = []
    skipped: list[Skip] = []
    if paths is None:
        seen = {os.path.realpath(rootp): str(rootp)}  # real path -> the name it was listed under

        def unlistable(e: OSError) -> None:  # os.walk would drop the folder (and its images) silently
            skipped.append(Skip(str(e.filename), f"folder cannot be listed ({e.strerror or type(e).__name__})"))

        report = _Progress(f"listing {rootp}: %d image files so far")
        for dirpath, dirnames, filenames in os.walk(rootp, followlinks=True, onerror=unlistable):
            report(len(found))
            dirnames.sort()
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if _metadata(d):  # not data: as a class it would shift every label after it
                    skipped.append(Skip(full, f"{_metadata(d)} folder, not read"))
                    dirnames.remove(d)
                    continue
                real = os.path.realpath(full)
                if real in seen:  # a cycle, a second link, or the real folder after a link to it
                    via = os.path.relpath(seen[real], rootp)
                    skipped.append(Skip(full, "symlink to a folder scanned already" if os.path.islink(full) else
                                        f"folder scanned already, as {via!r} (a symlink to it sorts first)"))
                    dirnames.remove(d)
                else:
                    seen[real] = full
            for f in filenames:
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    full = os.path.join(dirpath, f)
                    reason = f"{_metadata(f)} file, not read" if _metadata(f) else _not_a_file(full)
                    if reason:
                        skipped.append(Skip(full, reason))
                    else:
                        found.append(full)
    else:
        found = [str(rootp / p) for p in paths]
    rels = sorted((relative(p, rootp), p) for p in found)  # (relative name, path)
    found = [p for _, p in rels]
    rel_parts = [r.split(os.sep) for r, _ in rels]
    if found and all(len(parts) >= 2 for parts in rel_parts):
        classes = sorted({parts[0] for parts in rel_parts})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in rel_parts]
    else:
        classes, labels = [], [-1] * len(found)
    return ImageList(str(rootp), found, labels, classes, sorted(skipped, key=lambda s: s.path))


def _metadata(name: str) -> str | None:
    """Why a file or folder named ``name`` below the root is not data, or None: hidden names (a
    leading dot: macOS's ``._photo.jpg`` AppleDouble files, ``.ipynb_checkpoints``, ``.Trash-1000``),
    which clean-fid's glob leaves out too (torch-fidelity's os.walk and torchvision's ImageFolder
    take them, and fail on an AppleDouble file), and the ``__MACOSX`` folder of archives made on a
    Mac. As folders they would be classes, shifting the label of every class that sorts after them."""
    if name.startswith("."):
        return "hidden"
    return "macOS archive metadata" if name == "__MACOSX" else None


def relative(path: str, root: str | os.PathLike) -> str:
    """``os.path.relpath(path, root)``, by cutting the prefix where that gives the same string (a path
    listed below ``root``): relpath's normalising costs ~10 µs a file, 25 s of a 1.28M-image listing."""
    prefix = str(root)
    prefix = prefix if prefix.endswith(os.sep) else prefix + os.sep
    if path.startswith(prefix):
        rest = path[len(prefix):]
        if rest and f"{os.sep}." not in os.sep + rest and os.sep * 2 not in rest and not rest.endswith(os.sep):
            return rest  # no ".", ".." or empty parts: relpath would return it as it is
    return os.path.relpath(path, root)


def _not_a_file(path: str) -> str | None:
    """Why ``path`` (symlinks followed) cannot be listed as an image file, or None. From ``stat``
    alone: nothing is opened, so a FIFO named like an image never blocks the scan."""
    try:
        st = os.stat(path)
    except OSError as e:
        if isinstance(e, FileNotFoundError) or e.errno == errno.ELOOP:
            return "missing file or broken symlink"
        return f"unreadable ({type(e).__name__}: {(e.strerror or str(e))[:80]})"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def subset(images: ImageList, limit: int | None, seed: int = 0) -> ImageList:
    """A seeded random subset of ``limit`` images, kept in sorted order (None: all)."""
    if limit is None or limit >= len(images.paths):
        return images
    if limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}.")
    idx = sorted(random.Random(seed).sample(range(len(images.paths)), limit))
    return ImageList(
        images.root, [images.paths[i] for i in idx], [images.labels[i] for i in idx], images.classes, images.skipped
    )
