"""Image data: folders, the ADM center crop, named dataset specs and the embedded default set.

Contract: datasets yield uint8 NCHW RGB tensors at the requested resolution (the boundary format;
metrics and tokenizers convert from it with :func:`to_float`). Bad files never stop a run: they are
skipped, counted and listed with a reason (``Skip``), and an empty result is a clear error.

Order is deterministic: files are sorted by their path relative to the root (``--limit N`` takes a
seeded random subset, then keeps sorted order), so the same folder gives the same images on every
machine and every rank.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from raebench.errors import DataError
from raebench.preempt import ignore_in_worker
from raebench.registry import Registry

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif"})
#: Images above this many pixels are refused from their header, before any decoding (a 20k x 20k
#: PNG would otherwise take gigabytes). Override with RAEBENCH_MAX_PIXELS.
def _max_pixels(raw: str | None) -> int | None:
    """RAEBENCH_MAX_PIXELS as a positive int (default 16384²); None when it is not one."""
    if raw is None or not raw.strip():
        return 16384 * 16384
    try:
        f = float(raw)  # also takes 2.7e8
    except ValueError:
        return None
    return int(f) if f.is_integer() and f > 0 else None


MAX_PIXELS = _max_pixels(os.environ.get("RAEBENCH_MAX_PIXELS"))  # None: invalid, reported by scan_folder
#: images whose resized long side would exceed this many times the crop (aspect over 4:1) are
#: resampled only where the crop keeps them, bounding the work; every other image takes the plain
#: ADM path, unchanged
EXTREME_ASPECT = 4
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to count, never half an image


# ---------------------------------------------------------------------------------------------
# Conversions at the boundary
# ---------------------------------------------------------------------------------------------


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return x.to(torch.float32) / 255.0


def to_uint8(x: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """float [0, 1] -> uint8, clamped and rounded half up, as torchvision's ``save_image`` (and DiT's
    sampler) do: x * 255 + 0.5, floored. ``mode="truncate"``: x * 255 floored instead, as the official
    RAE scripts and ADM write samples (on average 0.5/255 darker); only ``raebench sample --quantize``
    uses it, every metric input is rounded. NaN/Inf have no 8-bit value (casting them is undefined,
    0 on most CPUs): :class:`raebench.errors.NonFiniteError`; callers leave such images out first."""
    if not bool(torch.isfinite(x).all()):
        from raebench.errors import NonFiniteError

        raise NonFiniteError(f"{int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.ndim > 1 else 1} image(s) hold "
                             "NaN/Inf, which have no 8-bit value; leave them out (and count them) before converting.")
    x = x.detach().float().clamp(0.0, 1.0) * 255.0
    if mode == "round":
        x = x + 0.5
    elif mode != "truncate":
        raise ValueError(f"uint8 conversion mode must be 'round' or 'truncate', not {mode!r}")
    return x.floor().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Reading one image robustly
# ---------------------------------------------------------------------------------------------


class ImageSkip(Exception):
    """A file that cannot be used as an image; the message is the reason recorded in the run."""


def load_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image, applying EXIF orientation.

    Grayscale, palette, RGBA (alpha dropped, as ADM/torchvision do), CMYK and 16-bit images are
    converted to 8-bit RGB. 16-bit samples (PNG, PGM/PPM, TIFF; grey or colour) keep their high byte,
    v >> 8, as Pillow does for colour and scikit-image's ``img_as_ubyte``; signed 8- and 16-bit TIFFs
    convert as ``img_as_ubyte`` does (negatives to 0); float images are read as [0, 1] (NaN/Inf or
    values outside [-1, 1], e.g. a float TIFF of 0..255: skipped; negatives to 0, as ``img_as_ubyte``); integer images of other depths (32-bit TIFF) are skipped, their white level undefined.
    Raises ImageSkip with a short reason for anything unreadable: any exception while decoding
    except MemoryError (the machine, not the file), whose type the reason names.
    """
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        fh = _open_regular(path)
    except FileNotFoundError:
        raise ImageSkip("missing file or broken symlink") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageSkip("missing file or broken symlink") from None
        raise ImageSkip(f"unreadable ({type(e).__name__}: {(e.strerror or str(e))[:80]})") from None
    try:
        with fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise ImageSkip("is a directory")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                raise ImageSkip("not a regular file")
            if st.st_size == 0:
                raise ImageSkip("zero-byte file")
            _let_pillow_open(max_pixels)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                # a file object, not the path: Pillow memory-maps what it opens by path, and that path
                # decodes single-band TIFFs with orientation 5-8 at the rotated size (scrambled pixels)
                try:
                    im = Image.open(fh)
                except Image.DecompressionBombError as e:  # over 2x Pillow's limit, itself at least ours
                    n = re.search(r"\((\d+) pixels\)", str(e))  # Pillow names the size, not the sides
                    raise ImageSkip(f"{n[1] + ' pixels ' if n else ''}exceeds the pixel limit of {max_pixels} "
                                    "(RAEBENCH_MAX_PIXELS)") from None
            with im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageSkip(f"{w}x{h} exceeds the pixel limit of {max_pixels} (RAEBENCH_MAX_PIXELS)")
                if w < 1 or h < 1:
                    raise ImageSkip("empty image")
                im.load()  # a TIFF's own orientation tag is applied (and dropped) here, by Pillow
                sample = _sample_format(im)  # before the transpose, which drops the format and its tags
                return _to_rgb8(_exif_transpose(im), sample)
    except ImageSkip:
        raise
    except UnidentifiedImageError:
        raise ImageSkip("not an image") from None
    except MemoryError:
        raise
    except Exception as e:  # struct.error, TypeError, ... from malformed tags: this file, not the run
        raise ImageSkip(f"unreadable ({error_kind(e)}: {str(e)[:80]})") from None


def _let_pillow_open(max_pixels: int) -> None:
    """Raise Pillow's decompression-bomb limit (an error above 2x ``Image.MAX_IMAGE_PIXELS``: 179 Mpx,
    below our default 16384² = 268 Mpx) to ``max_pixels`` where that is higher, so that
    RAEBENCH_MAX_PIXELS decides, as documented; never lowered, and a limit that someone switched off
    (None) stays off. Only raised: concurrent callers cannot undo each other."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and 2 * pil < max_pixels:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


def error_kind(e: BaseException) -> str:
    """An exception's type as a reader knows it: ``struct.error``, not ``error``; builtins bare."""
    t = type(e)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading without blocking: a FIFO opens at once (and is refused
    by the caller from its fstat) instead of waiting for a writer forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    return os.fdopen(fd, "rb")


#: EXIF orientation -> the transpose that displays the image upright (ImageOps.exif_transpose's table)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_transpose(im: Image.Image) -> Image.Image:
    """``im`` upright per its EXIF orientation. Only the orientation tag is read: ImageOps.exif_transpose
    also rewrites the EXIF block, which raises on other malformed tags. An EXIF block that cannot be
    parsed is a skip ("unreadable EXIF orientation"): the image may be meant rotated, and a guess
    would be silently wrong pixels."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise ImageSkip(f"unreadable EXIF orientation ({error_kind(e)}: {str(e)[:80]})") from None
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None  # others: as Pillow, none
    return im if method is None else im.transpose(method)


def _sample_format(im: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample of a single-channel integer image, signed) from its format, never from its pixels."""
    if im.mode.startswith("I;16"):
        return 16, im.mode.endswith("S")
    if im.format in ("PNG", "PPM"):  # Pillow opens 16-bit PGM/PPM as "I", rescaled to 0..65535 from maxval
        return 16, False
    if im.format == "TIFF":
        bits, fmt = im.tag_v2.get(258), im.tag_v2.get(339, 1)  # BitsPerSample, SampleFormat (2: signed)
        bits = bits[0] if isinstance(bits, tuple) else bits
        fmt = fmt[0] if isinstance(fmt, tuple) else fmt
        return (bits if bits in (8, 16) else None), fmt == 2
    return None, False


def _to_rgb8(im: Image.Image, sample: tuple[int | None, bool]) -> Image.Image:
    bits, signed = sample
    if signed and im.mode in ("L", "I", "I;16S") and bits in (8, 16):
        # signed TIFF samples: Pillow reads int8 as raw bytes ("L") and int16 as "I"; negatives go
        # to 0 and the positive range to 0..255, as scikit-image's img_as_ubyte does
        from skimage.util import img_as_ubyte

        a = np.asarray(im)
        a = a.view(np.int8) if bits == 8 else a.astype(np.int16)
        return Image.fromarray(img_as_ubyte(a), mode="L").convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        if bits != 16 or signed:  # e.g. 32-bit integer TIFF: no defined white level
            raise ImageSkip(f"{im.mode} image with no defined 8-bit scale "
                            "(only 8- and 16-bit integer images are read)")
        # the high byte (v >> 8): what Pillow keeps of 16-bit colour images and scikit-image's
        # img_as_ubyte does, so 16-bit grey and colour files convert alike
        a = np.asarray(im).astype(np.int64) >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "F":  # float images are in [0, 1] (scikit-image's convention), whatever their content
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageSkip("non-finite pixels (NaN or Inf in a float image)")
        if a.min() < -1.0 or a.max() > 1.0:  # e.g. a float TIFF of 0..255: clipping would make it white
            raise ImageSkip(f"float image with values in [{a.min():.4g}, {a.max():.4g}]; float images must "
                            "hold [0, 1] (scikit-image's img_as_ubyte refuses values outside [-1, 1] too)")
        return Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def adm_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """The ADM/RAE evaluation crop: (size, size, 3) uint8.

    Halve with a box filter while the short side is at least 2x the target (anti-aliasing that a
    single bicubic resize lacks), bicubic-resize the short side to ``size``, center crop.
    """
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    resized = tuple(round(s * scale) for s in im.size)
    if max(resized) > EXTREME_ASPECT * size:
        # a 1 x 3000 strip would become 256 x 768000 (GBs): resample only the centre that the crop
        # keeps. PIL maps the same output pixels to the same source points and reads filter support
        # outside the box; only its rounding between the two passes may differ by a few levels.
        (w, h), (rw, rh) = im.size, resized
        x0, y0 = (rw - size) // 2, (rh - size) // 2
        box = (x0 * w / rw, y0 * h / rh, (x0 + size) * w / rw, (y0 + size) * h / rh)
        return np.array(im.resize((size, size), resample=Image.BICUBIC, box=box), copy=True)
    im = im.resize(resized, resample=Image.BICUBIC)
    a = np.asarray(im)
    top = (a.shape[0] - size) // 2
    left = (a.shape[1] - size) // 2
    return np.array(a[top : top + size, left : left + size], copy=True)  # writable, contiguous


def random_resized_crop_train(im: Image.Image, size: int, rng: random.Random, scale: float = 1.5) -> np.ndarray:
    """The official stage-1 train transform: bicubic-resize the short side to ``scale * size``,
    then a uniformly random ``size`` x ``size`` crop. Returns (size, size, 3) uint8.

    An image more than ``EXTREME_ASPECT``:1 after the resize is resampled only inside the crop (the
    same draws, the same crop within a few levels, as :func:`adm_center_crop` does): a 1 x 4096
    strip at 256 px took 28 s and 6 GB resized whole, a 1 x 16384 one about four times that."""
    target = int(round(scale * size))
    w, h = im.size
    # torchvision's Resize(int): the short side to ``target``, the long side int(target * long / short) (truncated)
    new = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    rw, rh = max(size, new[0]), max(size, new[1])
    if max(rw, rh) > EXTREME_ASPECT * target:
        top = rng.randint(0, rh - size)
        left = rng.randint(0, rw - size)
        box = (left * w / rw, top * h / rh, (left + size) * w / rw, (top + size) * h / rh)
        return np.array(im.resize((size, size), resample=Image.BICUBIC, box=box), copy=True)
    im = im.resize((rw, rh), resample=Image.BICUBIC)
    a = np.asarray(im)
    top = rng.randint(0, a.shape[0] - size)
    left = rng.randint(0, a.shape[1] - size)
    return np.array(a[top : top + size, left : left + size], copy=True)  # writable, contiguous


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


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over an ImageList; an unreadable file yields ``None`` (see ``collate``)."""

    def __init__(self, images: ImageList, resolution: int, transform: Callable[[Image.Image, int], np.ndarray] = adm_center_crop):
        self.images = images
        self.resolution = resolution
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.images.paths[i]
        try:
            im = load_rgb(path)
        except ImageSkip as e:
            return {"index": i, "path": path, "skip": str(e)}
        small = min(im.size) < self.resolution
        arr = self.transform(im, self.resolution)
        return {
            "index": i,
            "path": path,
            "image": torch.from_numpy(arr).permute(2, 0, 1).contiguous(),  # (3, R, R) uint8
            "label": self.images.labels[i],
            "upscaled": small,
        }


def collate(items: list[dict]) -> dict:
    """Batch the readable items; keep the skipped ones as (path, reason) records."""
    good = [it for it in items if "image" in it]
    out = {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "path": [it["path"] for it in good],
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "upscaled": [it["path"] for it in good if it["upscaled"]],
        "skipped": [Skip(it["path"], it["skip"]) for it in items if "skip" in it],
    }
    out["image"] = torch.stack([it["image"] for it in good]) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return out


def merge_batches(parts: list[dict], pin_memory: bool = False) -> dict:
    """One batch from consecutive :func:`collate` batches (same order, same keys): tensors
    concatenated, lists joined; images into page-locked memory when ``pin_memory``."""
    out = {k: (torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else [x for p in parts for x in p[k]])
           for k, v in parts[0].items() if k != "image"}
    images = [p["image"] for p in parts if p["image"].shape[0]]  # an all-skipped batch has a (0, 3, 0, 0) image
    if not images:
        out["image"] = parts[0]["image"]
    elif len(images) == 1:
        out["image"] = images[0].pin_memory() if pin_memory else images[0]
    else:
        n = sum(im.shape[0] for im in images)
        buf = torch.empty((n, *images[0].shape[1:]), dtype=images[0].dtype, pin_memory=pin_memory)
        out["image"] = torch.cat(images, out=buf)  # into page-locked memory when the loader pins
    return out


class _Rebatched:
    """Batches of ``k`` consecutive micro-batches: the workers decode one batch together.

    With whole batches per worker, the first batch waits for one worker to decode all of it
    while the others idle (~0.6 s for 64 photographs on this CPU); here each worker decodes
    1/k of it, and the consumer sees the same batches as without micro-batching.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, k: int, pin_memory: bool) -> None:
        self.loader, self.k, self.pin_memory = loader, k, pin_memory

    def __iter__(self) -> Iterator[dict]:
        parts: list[dict] = []
        for mb in self.loader:
            parts.append(mb)
            if len(parts) == self.k:
                yield merge_batches(parts, self.pin_memory)
                parts = []
        if parts:
            yield merge_batches(parts, self.pin_memory)


def default_workers(num_workers: int | None, device: torch.device) -> int:
    """``--num-workers`` unset: 0 on the CPU (workers would compete with the model for its cores), else
    min(8, cores) so that decoding keeps a GPU fed."""
    if num_workers is not None:
        return num_workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
) -> Iterable[dict]:
    """Ordered batches (no shuffling) of ``batch_size`` images, decoded and cropped by worker processes.

    With several workers each batch is split into k equal micro-batches (k the largest divisor of
    ``batch_size`` up to ``num_workers``) that the workers decode in parallel and the main process
    joins: the batches are the same, the first one arrives k times sooner.
    """
    ds = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    k = max((d for d in range(1, min(num_workers, batch_size) + 1) if batch_size % d == 0), default=1)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size // k,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory and k == 1,  # joined batches are written straight into page-locked memory
        persistent_workers=False,
        prefetch_factor=2 * k if num_workers > 0 else None,  # about two whole batches per worker in flight
        worker_init_fn=ignore_in_worker,  # a SIGTERM to every process of the job stops the batch, not a worker
    )
    return loader if k == 1 else _Rebatched(loader, k, pin_memory)


# ---------------------------------------------------------------------------------------------
# Named datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: where it lives, its layout and domain tag. Nothing is read at import."""

    name: str
    domain: str  # "in-domain" (ImageNet, what the tokenizers were trained on) or "open-domain"
    description: str
    split: str = "val"
    layout: str = ""  # what the user's folder should look like
    expected_n: int | None = None
    env_var: str | None = None  # where users point to their copy
    resolve_root: Callable[[], tuple[str, list[str] | None]] | None = None  # embedded sets
    aliases: tuple[str, ...] = ()

    def root(self, override: str | None = None) -> tuple[str, list[str] | None]:
        if override and self.resolve_root is not None:  # the rows would name the folder's images after this set
            raise DataError(f"Dataset {self.name!r} is bundled, so --data {override!r} cannot be a copy of it; drop "
                            f"--dataset to evaluate that folder as itself.")
        if override:
            return override, None
        if self.resolve_root is not None:
            return self.resolve_root()
        if self.env_var and os.environ.get(self.env_var):
            return os.environ[self.env_var], None
        raise DataError(
            f"Dataset {self.name!r} is not bundled: download it ({self.layout}) and pass its folder "
            f"with --dataset {self.name} --data DIR" + (f" or set {self.env_var}." if self.env_var else ".")
        )


DATASETS: Registry[DatasetSpec] = Registry("dataset")

#: Real photographs bundled with scikit-image (public domain / CC0 per scikit-image's data
#: documentation), chosen to span portraits, animals, food, astronomy, microscopy, medical, text and
#: textures: a small open-domain default that runs offline.
SKIMAGE_IMAGES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "color.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png",
)


def _skimage_root() -> tuple[str, list[str]]:
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    present = [f for f in SKIMAGE_IMAGES if os.path.exists(os.path.join(root, f))]
    if not present:
        raise DataError("The embedded default images were not found in scikit-image's data folder; reinstall scikit-image.")
    return root, present


DEFAULT_DATASET = "skimage-photos"

for _spec in (
    DatasetSpec(
        DEFAULT_DATASET, "open-domain",
        f"{len(SKIMAGE_IMAGES)} real photographs bundled with scikit-image (the embedded default)",
        split="all", resolve_root=_skimage_root, aliases=("default",),
    ),
    DatasetSpec(
        "imagenet-val", "in-domain", "ImageNet-1k validation, 50,000 images, ADM center crop",
        layout="ILSVRC2012 val as class subfolders (n01440764/ILSVRC2012_val_00000293.JPEG, ...)",
        expected_n=50_000, env_var="RAEBENCH_IMAGENET_VAL",
    ),
    DatasetSpec(
        "coco-val2017", "open-domain", "COCO val2017, 5,000 images (the SD-VAE card's protocol)",
        layout="the val2017/ folder of flat JPEGs", expected_n=5_000, env_var="RAEBENCH_COCO_VAL2017",
    ),
    DatasetSpec(
        "div2k-val", "open-domain", "DIV2K validation HR, 100 high-resolution photographs",
        layout="DIV2K_valid_HR/ with 0801.png ... 0900.png", expected_n=100, env_var="RAEBENCH_DIV2K_VAL",
    ),
    DatasetSpec(
        "ffhq-val", "open-domain", "faces: any FFHQ/CelebA-HQ subset, flat folder of PNG/JPEG",
        layout="a flat folder of face images", env_var="RAEBENCH_FACES",
    ),
    DatasetSpec(
        "text-images", "open-domain", "text-rich images (documents, signs, screenshots)",
        layout="a flat folder of images containing text", env_var="RAEBENCH_TEXT_IMAGES",
    ),
):
    DATASETS.register(_spec.name, _spec, aliases=_spec.aliases)


@dataclass
class ResolvedData:
    """What an evaluation runs on: the image list plus the identity recorded in results."""

    name: str
    domain: str
    split: str
    images: ImageList
    sampled: bool = False  # a --limit subset was drawn (fewer images than the folder holds)

    @property
    def n(self) -> int:
        return len(self.images.paths)

    def seed_of(self, seed: int) -> int:
        """The seed that chose these images: ``seed`` for a --limit subset, else 0 (all images, whatever
        the seed), so rows of the same images are never split by a seed that changed nothing."""
        return seed if self.sampled else 0


def resolve_data(
    data: str | None = None,
    dataset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    domain: str | None = None,
) -> ResolvedData:
    """Turn ``--data DIR`` / ``--dataset NAME`` (neither: the embedded default) into images.

    A folder given with --data is named after its last path component and tagged open-domain
    unless ``domain`` says otherwise; with --dataset NAME plus --data DIR the folder is that
    named dataset's copy (e.g. ``--dataset imagenet-val --data /data/imagenet/val``).
    """
    if dataset is None and data is None:
        dataset = DEFAULT_DATASET
    if dataset is not None:
        spec = DATASETS.get(dataset)
        root, paths = spec.root(data)
        name, dom, split = spec.name, domain or spec.domain, spec.split
    else:
        root, paths = str(data), None
        name = Path(str(data)).expanduser().resolve().name or "data"
        name = "".join(c if c.isalnum() or c in "-._" else "-" for c in name.lower())
        dom, split = domain or "open-domain", "all"
    found = scan_folder(root, paths)
    images = subset(found, limit, seed)
    if not images.paths:
        raise DataError(f"No image files (by extension: {', '.join(sorted(IMAGE_EXTENSIONS))}) under {root!r}.")
    sampled = len(images.paths) < len(found.paths)
    if limit is not None and not sampled:
        log.warning("--limit %d is not below the %d images of %s: all of them are used", limit, len(found.paths), name)
    return ResolvedData(name, dom, split, images, sampled)
