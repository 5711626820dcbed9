"""Images at the boundary: the uint8 <-> float [0, 1] conversions (:func:`to_float`, :func:`to_uint8`),
reading one file robustly as 8-bit RGB (:func:`load_rgb`: EXIF orientation, grey/palette/alpha/CMYK/
16-bit/signed/float modes, the pixel limit; anything unusable is an :class:`ImageSkip` with a reason),
and the crops: the ADM evaluation center crop and the official stage-1 random crop.
"""

from __future__ import annotations

import errno
import os
import random
import re
import stat
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

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


def nonfinite_rows(x: torch.Tensor) -> list[int]:
    """The indices of the items of a (N, ...) batch (images, latents) that hold NaN or Inf."""
    return (~torch.isfinite(x).flatten(1).all(1)).nonzero().flatten().tolist()


def to_uint8(x: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """float [0, 1] -> uint8, clamped and rounded half up, as torchvision's ``save_image`` (and DiT's
    sampler) do: x * 255 + 0.5, floored. ``mode="truncate"``: x * 255 floored instead, as the official
    RAE scripts and ADM write samples (on average 0.5/255 darker); only ``raebench sample --quantize``
    uses it, every metric input is rounded. NaN/Inf have no 8-bit value (casting them is undefined,
    0 on most CPUs): :class:`raebench.errors.NonFiniteError`; callers leave such images out first."""
    # min and max carry any NaN/Inf: one reduction, ~30x cheaper on the CPU than isfinite().all()
    # (1.9 against 56-75 ms for 64 images at 256 px, one thread)
    lo, hi = torch.aminmax(x.detach().float()) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):  # one host sync
        from raebench.errors import NonFiniteError

        bad = 1 if x.ndim <= 3 else int((~torch.isfinite(x)).flatten(1).any(1).sum())  # (C, H, W): one image
        raise NonFiniteError(f"{bad} image(s) hold NaN/Inf, which have no 8-bit value; leave them out (and count "
                             "them) before converting.")
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
