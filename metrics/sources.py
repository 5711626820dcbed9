"""Image sets to score without a tokenizer: a folder of images or an ADM-style ``.npz``.

An ``.npz`` holds ``arr_0``: (N, H, W, 3) uint8 images (the ADM/guided-diffusion sample and
reference-batch format); a reference batch also holds ``mu``/``sigma`` (pool3 statistics) and
``mu_s``/``sigma_s`` (spatial statistics), which gFID/sFID use instead of recomputing, as the ADM
evaluator does. ``arr_0`` is streamed from the zip member in batches (a 50k × 256² sample file is
9.8 GB), never loaded whole.

A folder is read recursively (``raebench.folders.scan_folder``); images are used as they are (all must
share one size) or ADM-center-cropped to ``resolution`` when one is given.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raebench.folders import ImageList, Skip, scan_folder
from raebench.images import adm_center_crop, error_kind
from raebench.loaders import ImageDataset, make_loader
from raebench.errors import DataError
from raebench.metrics.extractors import fingerprint_data_file


log = logging.getLogger(__name__)

ADM_STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
#: (mean, covariance) key pairs of an ADM reference batch
ADM_STATS_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
#: the key under which ``raebench sample`` stores its settings (a JSON string) in the npz it writes
SETTINGS_KEY = "raebench_settings"


def _as_is(im, resolution) -> np.ndarray:
    return np.array(im)  # a writable copy, as adm_center_crop returns


@dataclass
class ImageSource:
    """A set of uint8 RGB images: ``batches`` yields (indices (n,), images (n, 3, H, W) uint8)."""

    path: Path
    kind: str  # "dir" or "npz"
    n: int
    id: str  # identity for the feature cache: fingerprint + how images are read
    names: list[str]  # per image: relative path without extension (dir) or index (npz), for pairing
    resolution: int | None = None
    images: ImageList | None = None
    skipped: list[Skip] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)  # paths smaller than ``resolution``, upscaled by the crop

    @property
    def name(self) -> str:
        stem = self.path.stem if self.kind == "npz" else self.path.resolve().name
        return "".join(c if c.isalnum() or c in "-._" else "-" for c in stem.lower()) or "images"

    def sampling_settings(self) -> dict | None:
        """The settings ``raebench sample`` stored in an ``.npz`` it wrote (``raebench_settings``, JSON), or None."""
        if self.kind != "npz":
            return None
        import json

        with np.load(self.path) as z:
            if SETTINGS_KEY not in z.files:
                return None
            try:
                return json.loads(str(z[SETTINGS_KEY]))
            except (ValueError, TypeError):
                return None
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # the images were checked; only the record is lost
                log.warning("%s: its %s member is corrupt (%s); the rows are written without how the samples were made",
                            self.path.name, SETTINGS_KEY, e)
                return None

    def stats(self, keys: tuple[str, ...] = ADM_STATS_KEYS, widths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """The ADM statistics stored in an ``.npz`` (those of ``keys`` present), as float64 and
        checked before any model loads: real numbers, all finite, a mean of shape (d,) and its
        covariance (d, d), with d = ``widths[mean key]`` where given (the feature width of the
        metric that uses them: 2048 for ``mu``). Anything else is a :class:`DataError` naming the
        file and the key."""
        if self.kind != "npz":
            return {}
        out: dict[str, np.ndarray] = {}
        try:
            with np.load(self.path) as z:  # allow_pickle=False: an object array is refused, never unpickled
                for k in keys:
                    if k in z.files:
                        out[k] = np.asarray(z[k])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
            raise DataError(f"{self.path.name}: its statistics cannot be read ({error_kind(e)}: {str(e)[:80]}); "
                            "store mu/sigma as plain float arrays.") from None
        widths = widths or {}
        for mean_key, cov_key in ADM_STATS_PAIRS:
            d = widths.get(mean_key)
            why = " (the feature width of the metric that uses it)" if d is not None else ""
            if d is None and mean_key in out and out[mean_key].ndim == 1:
                d, why = out[mean_key].shape[0], f" (the width of {mean_key})"
            for k, ndim in ((mean_key, 1), (cov_key, 2)):
                if k in out:
                    out[k] = _checked_stat(self.path, k, out[k], ndim, d, why)
        return out

    def short_side(self) -> int | None:
        """The short side of the images as they will be read, from headers only: the crop with
        ``resolution``, an ``.npz``'s from its ``arr_0`` header, a folder's from the first image
        PIL can open (None when there is none; the batches then skip and count the files)."""
        if self.resolution:
            return self.resolution
        if self.kind == "npz":
            shape = npz_images_shape(self.path)
            return min(shape[1:3]) if shape and shape[0] else None
        for p in self.images.paths:
            try:
                with Image.open(p) as im:
                    return min(im.size)  # EXIF rotation swaps the sides, not the short one
            except Exception:  # malformed tags raise anything; the batches skip and count the file
                continue
        return None

    def batches(self, batch_size: int, order: list[int] | None = None, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` positions of ``order`` (default: all, in data order): batch k
        always covers ``order[k*batch_size:(k+1)*batch_size]``, and a batch whose files are all
        unreadable is yielded empty, so two sources read with the same batch size stay aligned.
        An ``.npz`` is read in its stored order: ``order`` must then be a contiguous ascending range."""
        if self.kind == "npz":
            lo, hi = (0, self.n) if order is None else ((order[0], order[-1] + 1) if order else (0, 0))
            if order is not None and list(order) != list(range(lo, hi)):
                raise DataError("An .npz is read in its stored order; pair it with a folder of the same order.")
            yield from _npz_batches(self.path, batch_size, lo, hi)
            return
        transform = adm_center_crop if self.resolution else _as_is
        ds = ImageDataset(self.images, self.resolution or 0, transform=transform)
        loader = make_loader(ds, batch_size, num_workers, indices=order)
        shape = None
        mixed = DataError(f"Images under {str(self.path)!r} differ in size; pass --resolution R to center-crop them all.")
        it = iter(loader)
        while True:
            try:
                b = next(it)
            except StopIteration:
                return
            except RuntimeError as e:  # torch.stack of different sizes inside one batch
                if "stack expects each tensor to be equal size" in str(e):
                    raise mixed from None
                raise
            self.skipped.extend(b["skipped"])
            if self.resolution:
                self.upscaled.extend(b["upscaled"])
            if b["image"].shape[0]:
                shape = shape or tuple(b["image"].shape[1:])
                if tuple(b["image"].shape[1:]) != shape:
                    raise mixed
            yield b["index"], b["image"]  # (0,) and (0, 3, 0, 0) when every file of the batch was skipped


def open_source(path: str | os.PathLike, resolution: int | None = None) -> ImageSource:
    """An :class:`ImageSource` for a folder or an ``.npz``."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".npz":
        shape = npz_images_shape(p)
        if shape is None:
            return ImageSource(p, "npz", 0, f"npz:{fingerprint_data_file(p)}", [])
        if resolution and shape[1:3] != (resolution, resolution):
            raise DataError(f"{p.name} holds {shape[1]}x{shape[2]} images; --resolution {resolution} cannot crop an .npz.")
        return ImageSource(p, "npz", shape[0], f"npz:{fingerprint_data_file(p)}", [str(i) for i in range(shape[0])])
    if p.is_dir():
        images = scan_folder(p)
        if not images.paths:
            shards = sorted(q.name for q in p.rglob("*.npz"))
            if shards:  # per-rank sample files of another codebase
                raise DataError(f"No image files under {str(p)!r}, but {len(shards)} .npz file(s) ({', '.join(shards[:3])}"
                                f"{', ...' if len(shards) > 3 else ''}); raebench reads one .npz: concatenate the shards' "
                                "arr_0 into one file (np.savez(OUT.npz, arr_0=...)) and pass that.")
            raise DataError(f"No image files under {str(p)!r}.")
        names = [os.path.splitext(os.path.relpath(q, images.root))[0] for q in images.paths]
        how = f"adm-center-crop@{resolution}" if resolution else "as-is"
        return ImageSource(p, "dir", len(images.paths), f"{images.fingerprint()}|{how}", names, resolution, images,
                           list(images.skipped))
    if not p.exists():
        raise DataError(f"{str(p)!r} does not exist; give a folder of images or an .npz file.")
    if p.suffix.lower() == ".npy":
        raise DataError(f"{str(p)!r} is an .npy array; raebench reads a folder of images or an .npz with arr_0 "
                        "(N, H, W, 3) uint8: save it with np.savez(NAME.npz, arr_0=array).")
    raise DataError(f"{str(p)!r} is neither a folder of images nor an .npz file.")


def npz_members(path: Path) -> list[str]:
    """The array names an ``.npz`` holds (its zip members without ``.npy``), from the zip directory
    alone; [] for a file that is not a readable zip (:func:`npz_images_shape` reports that one)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return []


def npz_images_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of ``arr_0`` in an ``.npz`` (read from the member's header), None if it has none.
    A file that is not a zip, or whose ``arr_0`` holds fewer bytes than its header promises, is a
    :class:`DataError` here, before any model loads."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                return None
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as f:
                shape, fortran, dtype = _read_header(f)
                header = f.tell()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks
        raise DataError(f"{path.name} is not a readable .npz ({error_kind(e)}: {str(e)[:80]}); "
                        "it may be truncated or corrupt.") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path.name}: arr_0 must be (N, H, W, 3) uint8 images, got {dtype} {shape}"
                        f"{_layout_hint(dtype, shape)}.")
    if fortran:  # streamed row by row, so refused here, before any model loads
        raise DataError(f"{path.name}: arr_0 is stored in Fortran order; save it C-contiguous (np.ascontiguousarray).")
    if shape[0] < 0 or shape[1] < 1 or shape[2] < 1:
        raise DataError(f"{path.name}: arr_0 must hold images of at least 1x1 pixels, its header says "
                        f"{shape[0]} images of {shape[1]}x{shape[2]}.")
    per = int(np.prod(shape[1:]))
    held = (info.file_size - header) // per if per else shape[0]
    if held < shape[0]:
        raise DataError(f"{path.name}: arr_0 claims {shape[0]} images of {shape[1]}x{shape[2]} but holds only {held}; "
                        "the file is truncated.")
    return shape


def _layout_hint(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    """What to do about an ``arr_0`` that is not (N, H, W, 3) uint8 ("" when nothing specific),
    from its header alone: the array is never read (an object array would need unpickling)."""
    hints = []
    if dtype.hasobject:
        return "; an object array is refused (it would need unpickling): store the images as a uint8 array"
    if len(shape) == 4 and shape[1] == 3 and shape[3] != 3:
        hints.append("it looks channels-first (N, 3, H, W): store arr.transpose(0, 2, 3, 1)")
    if np.issubdtype(dtype, np.floating):
        hints.append("floats are not rescaled, as their range is not known: for [0, 1] store "
                     "np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), for [-1, 1] first x = (x + 1) / 2")
    elif dtype != np.uint8 and np.issubdtype(dtype, np.integer):
        hints.append("for values in 0..255 store arr.astype(np.uint8)")
    if (len(shape) == 4 and shape[3] in (1, 4)) or len(shape) == 3:
        hints.append("grey or RGBA images need converting to RGB")
    return "; " + "; ".join(hints) if hints else ""


def _checked_stat(path: Path, key: str, a: np.ndarray, ndim: int, d: int | None, why: str = "") -> np.ndarray:
    """``a`` (the statistic ``key`` of ``path``: a mean, ``ndim`` 1, or a covariance, 2) as float64
    if it holds finite real numbers in shape (d,) or (d, d) (d None: any width, square), else a
    :class:`DataError`; ``why`` says where d comes from."""
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{path.name}: {key} must hold real numbers, got dtype {a.dtype}.")
    width = d if d is not None else (a.shape[0] if a.ndim else None)
    if a.ndim != ndim or width is None or a.shape != (width,) * ndim:
        want = "x".join([str(d) if d is not None else "d"] * ndim)
        raise DataError(f"{path.name}: {key} must have shape {want}{why}, got {'x'.join(map(str, a.shape)) or 'a scalar'}.")
    a = a.astype(np.float64)
    bad = int(a.size - np.isfinite(a).sum())
    if bad:
        raise DataError(f"{path.name}: {key} holds {bad} NaN/Inf value(s); recompute the statistics from finite features.")
    return a


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_batches(path: Path, batch_size: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream images ``lo..hi`` of ``arr_0`` (N, H, W, 3) uint8 from the zip member, ``batch_size`` at a time.

    A stored member (``np.savez``, what ADM and ``raebench sample`` write) is read straight from the
    file at image ``lo``: a zip member opened by ``zipfile`` seeks forward by reading and checksumming
    everything before, 34 GB of a 39 GB 512-px sample file for the last of 8 ranks (or a resumed
    run). A compressed member (``np.savez_compressed``) has to be read from its start.

    Damaged bytes are a :class:`DataError` instead of images, at the latest before the last batch is
    yielded (so no result is computed from them): ``zipfile`` checks a compressed member's stream as
    it reads and its CRC-32 at its end; a stored member read whole in one pass (``lo`` 0 to the last
    image) is checked against its CRC-32 here. A stored member read in part (a shard of a torchrun,
    or a resumed run) is not checksummed: that would read the rest of the file too."""
    try:
        yield from _npz_member_batches(path, batch_size, lo, hi)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # OSError is the disk's, not the file's: it propagates
        raise DataError(f"{path.name}: arr_0 is corrupt ({error_kind(e)}: {str(e)[:80]}); "
                        "write or copy the file again.") from None


def _npz_member_batches(path: Path, batch_size: int, lo: int, hi: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
        with zf.open(info) as f:
            shape, fortran, _ = _read_header(f)
            header = f.tell()
        if fortran:
            raise DataError(f"{path.name}: arr_0 is stored in Fortran order; save it C-contiguous.")
        start = _stored_data_offset(path, info)
        per = int(np.prod(shape[1:]))
        hi = shape[0] if hi is None else min(hi, shape[0])
        # a stored member read from its first to its last byte: its CRC-32 is checked as zipfile would
        crc = zlib.crc32(b"") if start is not None and lo == 0 and header + hi * per == info.file_size else None
        with (open(path, "rb") if start is not None else zf.open(info)) as f:
            if start is not None:
                if crc is not None:
                    f.seek(start)
                    crc = zlib.crc32(f.read(header))
                f.seek(start + header + lo * per)
            else:
                f.seek(header + lo * per)  # a compressed member seeks forward by reading
            for first in range(lo, hi, batch_size):
                k = min(batch_size, hi - first)
                # never past the member's end in the raw file (the next member or the zip directory follows)
                buf = f.read(k * per if start is None else max(0, min(k * per, start + info.file_size - f.tell())))
                if len(buf) != k * per:
                    raise DataError(f"{path.name}: arr_0 is truncated at image {first + len(buf) // per} of {shape[0]}.")
                if crc is not None:
                    crc = zlib.crc32(buf, crc)
                    if first + k == hi and crc != info.CRC:
                        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
                arr = np.frombuffer(buf, dtype=np.uint8).reshape(k, *shape[1:])
                yield torch.arange(first, first + k), torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous()


def _stored_data_offset(path: Path, info: zipfile.ZipInfo) -> int | None:
    """Where the bytes of an uncompressed, unencrypted zip member start in the file (after its local
    header), or None for any other member."""
    import struct

    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)  # the local file header: signature ... name length, extra length
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len
