"""Image folders, the ADM crop rule, named datasets, and hostile inputs."""

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from raebench.data import DATASETS, resolve_data
from raebench.folders import scan_folder, subset
from raebench.images import adm_center_crop, load_rgb, to_uint8
from raebench.loaders import ImageDataset, collate
from raebench.errors import DataError, UnknownNameError


def test_adm_crop_rule_matches_its_definition():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    out = adm_center_crop(im, 128)
    # independent restatement: 700 >= 256 -> box halve to 350x500 -> 350 >= 256 -> 175x250; then bicubic
    ref = im.resize((500, 350), Image.BOX).resize((250, 175), Image.BOX)
    ref = ref.resize((round(250 * 128 / 175), 128), Image.BICUBIC)
    ref = np.asarray(ref)
    left = (ref.shape[1] - 128) // 2
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref[:, left : left + 128])


def test_adm_crop_upscales_small_images():
    out = adm_center_crop(Image.new("RGB", (10, 20), (10, 200, 30)), 64)
    assert out.shape == (64, 64, 3)
    assert (out == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_to_uint8_rounds_not_truncates():
    x = torch.tensor([0.0, 0.5 / 255, 0.4 / 255, 254.6 / 255, 1.2, -0.1])
    assert to_uint8(x).tolist() == [0, 1, 0, 255, 255, 0]


def test_to_uint8_equals_torchvisions_save_image():
    """The whole range against torchvision's ``save_image`` (the quantisation DiT's sampler writes),
    read back from its PNG: every level k/255 maps to k and random values agree exactly."""
    from torchvision.utils import save_image

    x = torch.cat([torch.arange(256) / 255.0, torch.rand(3 * 16 * 16 - 256, generator=torch.Generator().manual_seed(0))])
    x = x.view(3, 16, 16)
    buf = io.BytesIO()
    save_image(x, buf, format="png")
    ref = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(to_uint8(x), ref)
    assert to_uint8(torch.arange(256) / 255.0).tolist() == list(range(256))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_to_uint8_refuses_nan_and_inf(bad):
    """Casting NaN to uint8 is undefined (0 on this CPU, Inf clamped to 255): an 8-bit image made of a
    NaN reconstruction looked like a black or white one. Every caller now leaves those images out first."""
    from raebench.errors import NonFiniteError

    x = torch.full((3, 3, 4, 4), 0.5)
    x[1, 2, 3, 0] = bad
    with pytest.raises(NonFiniteError, match=r"1 image\(s\) hold NaN/Inf"):
        to_uint8(x)
    x[2, 0, 0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"2 image\(s\) hold NaN/Inf"):
        to_uint8(x)
    with pytest.raises(NonFiniteError, match=r"^1 image\(s\) hold NaN/Inf"):  # one (C, H, W) image, not 3 channels
        to_uint8(torch.full((3, 4, 4), bad))
    assert to_uint8(torch.zeros(0, 3, 4, 4)).shape == (0, 3, 4, 4)


def test_scan_sorted_recursive_case_insensitive_with_labels(image_folder: Path):
    imgs = scan_folder(image_folder)
    rel = [os.path.relpath(p, image_folder) for p in imgs.paths]
    assert rel == sorted(rel) and len(rel) == 8
    assert any(r.endswith(".JPG") for r in rel)
    assert imgs.classes == ["cls_a", "cls_b"]
    assert imgs.labels == [0 if r.startswith("cls_a") else 1 for r in rel]


def test_limit_is_seeded_sorted_subset(image_folder: Path):
    imgs = scan_folder(image_folder)
    a, b, c = subset(imgs, 3, seed=0), subset(imgs, 3, seed=0), subset(imgs, 3, seed=1)
    assert a.paths == b.paths and a.paths == sorted(a.paths, key=lambda p: os.path.relpath(p, image_folder))
    assert a.paths != c.paths
    assert a.fingerprint() != imgs.fingerprint()


def test_default_dataset_is_real_photographs():
    d = resolve_data()
    assert d.name == "skimage-photos" and d.domain == "open-domain" and d.n >= 12
    item = ImageDataset(d.images, 64)[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8


def test_unknown_dataset_suggests():
    with pytest.raises(UnknownNameError, match="imagenet-val"):
        DATASETS.get("imagenet")


def test_unbundled_dataset_says_how_to_supply(monkeypatch):
    monkeypatch.delenv("RAEBENCH_IMAGENET_VAL", raising=False)
    with pytest.raises(DataError, match="--dataset imagenet-val --data DIR or set RAEBENCH_IMAGENET_VAL"):
        resolve_data(dataset="imagenet-val")


def test_a_named_dataset_copy_and_a_bundled_one(image_folder: Path):
    d = resolve_data(str(image_folder), "imagenet-val")  # your copy of a named set
    assert (d.name, d.domain) == ("imagenet-val", "in-domain")
    with pytest.raises(DataError, match="'skimage-photos' is bundled, so --data .* cannot be a copy of it"):
        resolve_data(str(image_folder), "skimage-photos")


def test_the_seed_is_recorded_only_when_it_chose_the_images(image_folder: Path, caplog):
    assert resolve_data(str(image_folder), limit=3, seed=5).seed_of(5) == 5
    assert resolve_data(str(image_folder), seed=5).seed_of(5) == 0  # all images, whatever the seed
    every = resolve_data(str(image_folder), limit=100, seed=5)
    assert every.seed_of(5) == 0 and every.n == 8 and "--limit 100 is not below the 8 images" in caplog.text


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="No image files"):
        resolve_data(data=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(data=str(tmp_path / "nope"))


# --- hostile corpus ---------------------------------------------------------------------------


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_hostile_corpus(root: Path) -> dict[str, str | None]:
    """Writes the corpus; returns file name -> expected skip reason substring (None: usable)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str | None] = {}

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2]); expect["truncated.jpg"] = "unreadable"
    (root / "zero.png").write_bytes(b""); expect["zero.png"] = "zero-byte"
    (root / "text.png").write_text("this is not an image"); expect["text.png"] = "not an image"
    a16 = (rng.integers(0, 65536, (40, 48))).astype(np.uint16)
    Image.fromarray(a16).save(root / "sixteen.png"); expect["sixteen.png"] = None
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg"); expect["cmyk.jpg"] = None
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0); expect["palette.png"] = None
    Image.fromarray(rgb[..., 0]).save(root / "gray.png"); expect["gray.png"] = None
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "rgba.png"); expect["rgba.png"] = None
    Image.fromarray(rgb[:1, :1]).save(root / "one.png"); expect["one.png"] = None
    Image.new("L", (30000, 30000 // 8)).save(root / "huge.png")  # 112 Mpx, compresses to ~100 KB
    expect["huge.png"] = "pixel limit"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif.tobytes()); expect["rotated.jpg"] = None
    Image.fromarray(rgb).save(root / "UPPER.PNG"); expect["UPPER.PNG"] = None
    os.symlink(root / "does-not-exist.png", root / "dangling.png"); expect["dangling.png"] = "broken symlink"
    (root / "shots.v2.png").mkdir()  # a folder named like an image: walked, never a skipped file
    Image.fromarray(rgb).save(root / "shots.v2.png" / "inner.png"); expect["inner.png"] = None
    # malformed metadata (helper repro: each of these stopped the whole run)
    Image.fromarray(rgb).save(root / "bad_exif.png", exif=b"II*\x00"); expect["bad_exif.png"] = "unreadable EXIF orientation"
    (root / "mistyped_tag.jpg").write_bytes(_jpeg_orientation_and_mistyped_tag(rgb)); expect["mistyped_tag.jpg"] = None
    (root / "bad_strips.tif").write_bytes(_tiff_with_mistyped_strip_offsets(rgb[..., 0]))
    expect["bad_strips.tif"] = "TypeError"
    Image.fromarray(rgb[..., 0]).save(root / "grey_rotated.tif", tiffinfo={274: 6}); expect["grey_rotated.tif"] = None
    tifffile.imwrite(root / "signed.tif", (rgb[..., 0].astype(np.int16) - 128) * 200); expect["signed.tif"] = None
    tifffile.imwrite(root / "nan.tif", np.full((40, 48), np.nan, np.float32)); expect["nan.tif"] = "non-finite pixels"
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png"); expect["pipe.png"] = "not a regular file"  # opening it would block forever
    if os.name == "posix":  # names that are not UTF-8 (surrogate-escaped in Python)
        with open(os.path.join(os.fsencode(root), b"\xff\xfe.png"), "wb") as f:
            f.write(_png(rgb))
        expect[os.fsdecode(b"\xff\xfe.png")] = None
        with open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb") as f:
            f.write(b"not an image")
        expect[os.fsdecode(b"bad\xff.png")] = "not an image"
    return expect


def _jpeg_orientation_and_mistyped_tag(rgb: np.ndarray) -> bytes:
    """A JPEG with EXIF orientation 6 and a Make tag typed RATIONAL: ImageOps.exif_transpose raises
    while rewriting the EXIF block, though the orientation and pixels are fine."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x010F, 5, 1, struct.pack("<I", 0))]
    ifd = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    ifd += b"".join(struct.pack("<HHI", tag, typ, n) + v for tag, typ, n, v in entries) + struct.pack("<I", 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, exif=b"Exif\x00\x00" + ifd)
    return buf.getvalue()


def _tiff_with_mistyped_strip_offsets(grey: np.ndarray) -> bytes:
    """A grey TIFF whose StripOffsets (273) entry claims type ASCII: Pillow raises TypeError in load()."""
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="TIFF")
    b = bytearray(buf.getvalue())
    assert b[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", b, 4)[0]
    for i in range(struct.unpack_from("<H", b, ifd)[0]):
        if struct.unpack_from("<H", b, ifd + 2 + 12 * i)[0] == 273:
            struct.pack_into("<H", b, ifd + 2 + 12 * i + 2, 2)
    return bytes(b)


def test_hostile_inputs_each_get_documented_handling(tmp_path: Path, monkeypatch):
    import raebench.images as images_mod

    monkeypatch.setattr(images_mod, "MAX_PIXELS", 50_000_000)  # load_rgb's limit
    root = tmp_path / "hostile"
    expect = make_hostile_corpus(root)
    imgs = scan_folder(root)
    ds = ImageDataset(imgs, 32)
    batch = collate([ds[i] for i in range(len(ds))])
    skipped = {Path(s.path).name: s.reason for s in [*imgs.skipped, *batch["skipped"]]}
    used = {Path(p).name for p in batch["path"]}
    for name, reason in expect.items():
        if reason is None:
            assert name in used, f"{name} should be usable"
        else:
            assert name in skipped and reason in skipped[name], (name, skipped.get(name))
    assert batch["image"].shape == (len(used), 3, 32, 32)
    assert "one.png" in {Path(p).name for p in batch["upscaled"]}


def test_malformed_metadata_is_a_counted_skip_not_a_crash(tmp_path: Path):
    """Helper repro: a PNG with a 4-byte EXIF block (struct.error), a JPEG with orientation 6 and a
    mistyped tag (struct.error/AttributeError in ImageOps.exif_transpose) and a TIFF whose
    StripOffsets is typed ASCII (TypeError in load) each stopped the whole run. Now an EXIF block
    that cannot be parsed is a skip (the intended rotation is unknown), a readable orientation is
    applied whatever the other tags, and any other decoding error is a skip naming its type."""
    from raebench.images import ImageSkip

    rgb = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png", exif=b"II*\x00")
    with pytest.raises(ImageSkip, match=r"unreadable EXIF orientation \(struct.error"):
        load_rgb(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(_jpeg_orientation_and_mistyped_tag(rgb))
    with Image.open(tmp_path / "b.jpg") as im:
        stored = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "b.jpg")), np.rot90(stored, -1))  # 6: 90° clockwise
    (tmp_path / "c.tif").write_bytes(_tiff_with_mistyped_strip_offsets(rgb[..., 0]))
    with pytest.raises(ImageSkip, match=r"unreadable \(TypeError: "):
        load_rgb(tmp_path / "c.tif")
    ds = ImageDataset(scan_folder(tmp_path), 16)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["path"] == [str(tmp_path / "b.jpg")] and len(batch["skipped"]) == 2


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_single_channel_tiff_orientation_gives_the_rotated_pixels(tmp_path: Path, orientation: int, dtype):
    """Helper repro: Pillow memory-maps files opened by path and decoded grey TIFFs with orientation
    5-8 at the rotated size ((20, 40)-shaped junk); raebench reads through a file object."""
    a = np.random.default_rng(0).integers(0, 256, (20, 40), dtype=np.uint8)
    want = {5: a.T, 6: np.rot90(a, -1), 7: np.rot90(a, 2).T, 8: np.rot90(a, 1)}[orientation]
    Image.fromarray(a.astype(dtype) * (257 if dtype == np.uint16 else 1)).save(tmp_path / "g.tif", tiffinfo={274: orientation})
    got = np.asarray(load_rgb(tmp_path / "g.tif"))
    assert got.shape == (40, 20, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)


def test_signed_and_non_finite_tiffs(tmp_path: Path):
    """Signed 8/16-bit TIFFs convert as scikit-image's img_as_ubyte (negatives to 0), not as unsigned
    bytes; float images with NaN/Inf are skipped, with no numpy warning leaking."""
    from skimage.util import img_as_ubyte

    from raebench.images import ImageSkip

    i16 = np.array([[-32768, -1, 0, 1], [127, 128, 255, 32767]], dtype=np.int16)
    i8 = np.array([[-128, -1, 0, 1], [2, 64, 100, 127]], dtype=np.int8)
    for a in (i16, i8):
        tifffile.imwrite(tmp_path / "s.tif", a)
        assert np.array_equal(np.asarray(load_rgb(tmp_path / "s.tif"))[..., 0], img_as_ubyte(a))
    for bad in (np.nan, np.inf, -np.inf):
        tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 0.5], [bad, 1.0]], np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageSkip, match="non-finite pixels"):
                load_rgb(tmp_path / "f.tif")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_is_skipped_unopened(tmp_path: Path):
    """Helper repro: ``mkfifo x.png`` hung eval and score forever (the fingerprint, the header probe
    and the loader each opened it). Only regular files are listed; the loader also refuses others."""
    import signal

    from raebench.images import ImageSkip

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "x.png")
    def hung(*_):
        raise TimeoutError("a FIFO was opened and blocked")

    previous = signal.signal(signal.SIGALRM, hung)  # a regression hangs: fail instead
    signal.alarm(20)
    try:
        imgs = scan_folder(tmp_path)
        assert [Path(p).name for p in imgs.paths] == ["ok.png"]
        assert [(Path(s.path).name, s.reason) for s in imgs.skipped] == [("x.png", "not a regular file")]
        imgs.fingerprint()
        with pytest.raises(ImageSkip, match="not a regular file"):
            load_rgb(tmp_path / "x.png")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fingerprint_of_ordinary_names_is_unchanged():
    """Results are keyed by the data fingerprint: this value was computed by raebench before
    non-UTF-8 names were supported, and must not move."""
    import tempfile

    from raebench.folders import ImageList

    with tempfile.TemporaryDirectory() as d:  # a fixed root name does not matter: names are relative
        root = Path(d)
        (root / "cls" / "sub").mkdir(parents=True)
        (root / "ça va").mkdir()
        (root / "cls" / "a.png").write_bytes(bytes(range(256)) * 100)  # 25,600 bytes: head and tail differ
        (root / "cls" / "sub" / "b.jpg").write_bytes(b"\x89PNG" + b"x" * 10)
        (root / "ça va" / "é.bmp").write_bytes(b"BM" + bytes(3000))
        paths = [str(root / p) for p in ("cls/a.png", "cls/sub/b.jpg", "ça va/é.bmp")]
        assert ImageList(str(root), paths, [-1] * 3, []).fingerprint() == "5b9bcda425c8ae18"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_non_utf8_file_names_are_read_and_fingerprinted(tmp_path: Path):
    """Helper repro: a file named b'\\xff\\xfe.png' crashed the fingerprint with UnicodeEncodeError;
    its name now enters the hash as its bytes on disk."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name in (b"\xff\xfe.png", b"\xfe\xff.png"):
        (tmp_path / name.hex()).mkdir()
        with open(os.path.join(os.fsencode(tmp_path / name.hex()), name), "wb") as f:
            f.write(_png(rgb))
    a, b = scan_folder(tmp_path / "fffe2e706e67"), scan_folder(tmp_path / "feff2e706e67")
    assert len(a.paths) == 1 and np.array_equal(np.asarray(load_rgb(a.paths[0])), rgb)
    assert a.fingerprint() != b.fingerprint()  # the names differ, the bytes do not


def test_folders_that_cannot_be_listed_are_counted(tmp_path: Path):
    """Helper repro: os.walk dropped images in folders deeper than PATH_MAX (ENAMETOOLONG) silently."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: past PATH_MAX (4096) on Linux
            os.mkdir("d" * 250, dir_fd=fd)
            nxt = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with os.fdopen(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(_png(np.zeros((8, 8, 3), np.uint8)))
    finally:
        os.close(fd)
    imgs = scan_folder(tmp_path)
    assert [Path(p).name for p in imgs.paths] == ["ok.png"]
    assert len(imgs.skipped) == 1 and imgs.skipped[0].reason.startswith("folder cannot be listed (")
    assert imgs.skipped[0].path.startswith(str(tmp_path / ("d" * 250)))


def test_a_folder_named_like_an_image_is_walked_not_skipped(tmp_path: Path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "shots.v2.png").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "shots.v2.png" / "a.png")
    imgs = scan_folder(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in imgs.paths] == ["plain.png", "shots.v2.png/a.png"]
    assert imgs.skipped == []


def test_a_folder_reached_first_through_a_symlink_says_so(tmp_path: Path):
    """With S/real and S/link -> S/real, ``real`` was listed as "symlink to a folder scanned already"
    though it is no symlink. The first name in sorted order still lists the folder (so class folders
    that are links into a storage folder keep their names, labels and fingerprints); the reason for
    the real folder now says it was scanned through the link."""
    root = tmp_path / "S"
    (root / "real").mkdir(parents=True)
    (root / "other").mkdir()
    for d in ("real", "other"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / d / "a.png")
    os.symlink(root / "real", root / "link")  # sorts before "real"
    imgs = scan_folder(root)
    assert [os.path.relpath(p, root) for p in imgs.paths] == ["link/a.png", "other/a.png"]
    assert imgs.classes == ["link", "other"]
    assert [(os.path.relpath(s.path, root), s.reason) for s in imgs.skipped] == [
        ("real", "folder scanned already, as 'link' (a symlink to it sorts first)")]
    # the common layout: class folders that are links into one storage folder keep their classes
    lay = tmp_path / "L"
    for c in ("cls_x", "cls_y"):
        (lay / "storage" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lay / "storage" / c / "a.png")
    (lay2 := tmp_path / "L2").mkdir()
    for c in ("cls_x", "cls_y"):
        os.symlink(lay / "storage" / c, lay2 / c)
    imgs = scan_folder(lay2)
    assert imgs.classes == ["cls_x", "cls_y"] and imgs.labels == [0, 1] and not imgs.skipped


def test_exif_orientation_applied(tmp_path: Path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    im = load_rgb(tmp_path / "r.jpg")
    assert im.size == (20, 40)  # width and height swapped by the rotation


def test_sixteen_bit_depth_comes_from_the_format_not_the_pixels(tmp_path: Path):
    """A dark 16-bit PGM (Pillow opens it as mode "I") converts as 16-bit whatever its values; grey
    and colour 16-bit files keep the same high byte (v >> 8, scikit-image's img_as_ubyte); 32-bit
    integer TIFFs have no white level and are skipped; float TIFFs are read as [0, 1]."""
    from skimage.util import img_as_ubyte

    from raebench.images import ImageSkip

    for v in (200, 255, 256, 40000):
        (tmp_path / "d.pgm").write_bytes(b"P5\n4 4\n65535\n" + np.full((4, 4), v, ">u2").tobytes())
        assert np.asarray(load_rgb(tmp_path / "d.pgm"))[0, 0, 0] == v >> 8  # (img_as_ubyte skips scaling when max <= 255)
    grey = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "g.png")  # 16-bit grey PNG
    colour = np.stack([grey] * 3, -1).astype(">u2")  # the same values as a 16-bit RGB PPM
    (tmp_path / "c.ppm").write_bytes(b"P6\n16 16\n65535\n" + colour.tobytes())
    g, c = np.asarray(load_rgb(tmp_path / "g.png")), np.asarray(load_rgb(tmp_path / "c.ppm"))
    assert np.array_equal(g, c) and np.array_equal(g[..., 0], img_as_ubyte(grey))
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ImageSkip, match="no defined 8-bit scale"):
        load_rgb(tmp_path / "i32.tif")
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for scale in (1.0, 0.5):  # a dark float image stays dark (no data-dependent range)
        Image.fromarray(f * scale).save(tmp_path / "f.tif")
        want = np.round((f * scale).astype(np.float64) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(load_rgb(tmp_path / "f.tif"))[..., 0], want)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path):
    a = np.full((8, 8), 65535, dtype=np.uint16)
    a[:4] = 32768
    Image.fromarray(a).save(tmp_path / "s.png")
    out = np.asarray(load_rgb(tmp_path / "s.png"))
    assert out.shape == (8, 8, 3) and out[0, 0, 0] == 128 and out[-1, -1, 0] == 255


@pytest.mark.parametrize("batch_size", [4, 6, 7], ids=["k=2", "k=2-of-6", "prime:k=1"])
def test_worker_micro_batches_give_the_same_batches(tmp_path: Path, batch_size: int):
    """Several workers decode each batch together (micro-batches joined in order): the batches,
    skipped files and upscaled flags are exactly those of the single-process loader."""
    from raebench.loaders import make_loader

    root = tmp_path / "mixed"
    make_hostile_corpus(root)
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"ok{i}.png")
    (root / "huge.png").unlink()  # slow to reject; the other bad files stay
    ds = ImageDataset(scan_folder(root), 32)
    plain = list(make_loader(ds, batch_size, 0))
    loader = make_loader(ds, batch_size, 2, indices=range(len(ds)))
    k = 1 if batch_size == 7 else 2
    assert getattr(loader, "loader", loader).batch_size == batch_size // k  # what each worker decodes
    joined = list(loader)
    assert len(plain) == len(joined) == -(-len(ds) // batch_size)
    for a, b in zip(plain, joined):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
        assert a["path"] == b["path"] and a["upscaled"] == b["upscaled"] and torch.equal(a["label"], b["label"])
        assert [(s.path, s.reason) for s in a["skipped"]] == [(s.path, s.reason) for s in b["skipped"]]
    assert sum(len(b["skipped"]) for b in joined) >= 2 and any(b["upscaled"] for b in joined)


def test_fingerprint_follows_content_not_place(tmp_path: Path):
    """Same names and byte sizes but other pixels are other data (helper repro: BMPs overwritten by
    grey ones of the same size were reused as the old data); the same files elsewhere, with other
    modification times, are the same data."""
    import shutil
    import time

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.bmp")
    before = scan_folder(tmp_path / "a").fingerprint()
    time.sleep(0.01)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new mtimes, same bytes
    assert scan_folder(tmp_path / "b").fingerprint() == before
    sizes = [p.stat().st_size for p in sorted((tmp_path / "a").iterdir())]
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "a" / f"{i}.bmp")
    assert [p.stat().st_size for p in sorted((tmp_path / "a").iterdir())] == sizes
    assert scan_folder(tmp_path / "a").fingerprint() != before


def test_stage1_train_resize_sizes_as_torchvision(monkeypatch):
    """The official stage-1 transform is torchvision's Resize(int): short side to the target, long
    side int(target * long / short), truncated (a 500x333 image becomes 576x384, not 577x384)."""
    import random

    from torchvision.transforms.functional import _compute_resized_output_size

    from raebench.images import random_resized_crop_train

    sizes = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, sz, *a, **k: sizes.append(tuple(sz)) or real(im, sz, *a, **k))
    for w, h in [(500, 333), (333, 500), (640, 480), (300, 300), (1001, 257), (48, 40)]:
        sizes.clear()
        out = random_resized_crop_train(Image.new("RGB", (w, h)), 256 if w > 100 else 32, random.Random(0))
        target = 384 if w > 100 else 48
        th, tw = _compute_resized_output_size((h, w), [target])
        assert sizes == [(tw, th)] and out.shape[:2] == ((256, 256) if w > 100 else (32, 32))


def test_default_workers_every_data_command_shares():
    from raebench.loaders import default_workers

    assert default_workers(None, torch.device("cpu")) == 0  # workers would compete with the model's cores
    assert default_workers(None, torch.device("cuda")) == min(8, os.cpu_count() or 1)
    assert default_workers(3, torch.device("cuda")) == 3 and default_workers(2, torch.device("cpu")) == 2


def test_long_listings_and_fingerprints_report_progress(tmp_path: Path, monkeypatch, caplog):
    """Listing and fingerprinting 1.28M files takes minutes: they log how far they are, at most every
    PROGRESS_SECONDS; short ones (every test folder) say nothing. The result does not change."""
    import logging

    import raebench.folders as folders_mod

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(bytes(i + 1))
    quiet = scan_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="raebench.folders"):
        fp = quiet.fingerprint()
    assert not caplog.records
    monkeypatch.setattr(folders_mod, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="raebench.folders"):
        images = scan_folder(tmp_path)
        assert images.fingerprint() == fp and images.paths == quiet.paths
    text = caplog.text
    assert "image files so far" in text and "fingerprinting" in text and "of 6 files read" in text


def test_float_images_outside_the_unit_range_are_skipped_not_clipped(tmp_path: Path):
    """A float TIFF of 0..255 (what Pillow's convert("RGB") reads as such) was clipped to an all-white
    image; values outside [-1, 1] are refused as img_as_ubyte refuses them, negatives go to 0."""
    from skimage.util import img_as_ubyte

    from raebench.images import ImageSkip

    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    with pytest.raises(ImageSkip, match=r"float image with values in \[0, 255\]"):
        load_rgb(tmp_path / "f255.tif")
    Image.fromarray(f - 0.5).save(tmp_path / "neg.tif")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "neg.tif"))[..., 0], img_as_ubyte(f - 0.5))


def test_pixel_limit_above_pillows_bomb_limit_is_honoured(tmp_path: Path, monkeypatch):
    """A pixel limit above twice Pillow's MAX_IMAGE_PIXELS (179 Mpx, below the default 16384²) used to
    be ignored: Pillow refused the file in Image.open first, so a 15000 x 15000 image was skipped by
    default. Here Pillow's limit is scaled down to 100 (an error above 200 px) and the image has 400 px."""
    from raebench.images import ImageSkip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", max_pixels=1000).size == (20, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for limit in (150, 300):  # Pillow's refusal (150) and ours (300) name the same limit
        with pytest.raises(ImageSkip, match=f"exceeds the pixel limit of {limit} \\(RAEBENCH_MAX_PIXELS\\)"):
            load_rgb(tmp_path / "big.png", max_pixels=limit)


def test_hidden_and_macos_metadata_entries_are_not_data(tmp_path: Path):
    """A __MACOSX or hidden class folder became class 0, so every real class's label moved by one
    (stage-2 training, probes); macOS's ._x.jpg files were read and failed as "not an image". They
    are listed as skipped, never read, and the classes are the real ones."""
    rgb = np.zeros((8, 8, 3), np.uint8)
    for rel in ("n01/a.png", "n02/b.png", ".Trash-1000/x.png", "n01/.hidden.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / rel)
    (tmp_path / "__MACOSX" / "n01").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "n01" / "._a.png").write_bytes(b"\0\x05\x16\x07" + bytes(60))  # AppleDouble
    (tmp_path / "n02" / "._b.png").write_bytes(b"\0\x05\x16\x07" + bytes(60))
    imgs = scan_folder(tmp_path)
    assert imgs.classes == ["n01", "n02"] and imgs.labels == [0, 1]
    assert [Path(p).name for p in imgs.paths] == ["a.png", "b.png"]
    assert {os.path.relpath(s.path, tmp_path): s.reason for s in imgs.skipped} == {
        ".Trash-1000": "hidden folder, not read", "__MACOSX": "macOS archive metadata folder, not read",
        "n01/.hidden.png": "hidden file, not read", "n02/._b.png": "hidden file, not read"}


def test_max_pixels_setting_takes_only_positive_whole_numbers():
    from raebench.images import _max_pixels

    assert _max_pixels(None) == _max_pixels(" ") == 16384 * 16384 and _max_pixels("2.7e8") == 270_000_000
    assert _max_pixels("0") is None and _max_pixels("-5") is None and _max_pixels("1.5") is None
    assert _max_pixels("lots") is None


def test_an_image_of_exactly_the_pixel_limit_is_read(tmp_path):
    from raebench.images import ImageSkip, load_rgb

    Image.new("RGB", (6, 4), (1, 2, 3)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png", max_pixels=24).size == (6, 4)
    with pytest.raises(ImageSkip, match="6x4 exceeds the pixel limit of 23"):
        load_rgb(tmp_path / "a.png", max_pixels=23)


def test_pillows_own_limit_is_raised_only_where_it_would_refuse_first(monkeypatch):
    from raebench.images import _let_pillow_open

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 2x this
    _let_pillow_open(150)
    assert Image.MAX_IMAGE_PIXELS == 100  # never lowered
    _let_pillow_open(301)
    assert Image.MAX_IMAGE_PIXELS == 151
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _let_pillow_open(10**12)
    assert Image.MAX_IMAGE_PIXELS is None  # switched off stays off


def test_a_float_image_below_minus_one_is_skipped(tmp_path):
    from raebench.images import ImageSkip, load_rgb

    tifffile.imwrite(tmp_path / "f.tif", np.array([[-2.0, 0.5]], np.float32))
    with pytest.raises(ImageSkip, match="float image with values in"):
        load_rgb(tmp_path / "f.tif")


def test_relative_normalises_dot_parts_as_relpath():
    from raebench.folders import relative

    for path in ("/r/a/./b.png", "/r/a//b.png", "/r/x/../a/b.png", "/r/a/b.png"):
        assert relative(path, "/r") == os.path.relpath(path, "/r") == "a/b.png"


def test_running_out_of_memory_is_not_an_unreadable_image(tmp_path, monkeypatch):
    from raebench import images

    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(images, "_exif_transpose", oom)
    with pytest.raises(MemoryError):
        images.load_rgb(tmp_path / "a.png")
