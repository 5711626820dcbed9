"""ADM-style .npz sources (raebench.metrics.sources): header checks, member offsets, statistics checks."""

import io
import zipfile

import numpy as np
import pytest
from raebench.metrics import sources
from raebench.metrics.sources import (
    ImageSource,
    _stored_data_offset,
    npz_images_shape,
    open_source,
)

from raebench.errors import DataError


def _npz(path, images, **arrays):
    np.savez(path, arr_0=images, **arrays)
    return path


def test_an_npz_one_image_short_is_truncated(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (3, 2, 2, 3)})
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + bytes(2 * 2 * 2 * 3))  # two images of the three announced
    with pytest.raises(DataError, match="claims 3 images of 2x2 but holds only 2"):
        npz_images_shape(tmp_path / "t.npz")


def test_an_npz_of_non_square_images_is_not_taken_for_the_resolution(tmp_path):
    p = _npz(tmp_path / "r.npz", np.zeros((1, 4, 8, 3), np.uint8))
    with pytest.raises(DataError, match="holds 4x8 images; --resolution 4 cannot crop"):
        open_source(p, resolution=4)


def test_an_npz_is_read_only_in_its_stored_order(tmp_path):
    src = open_source(_npz(tmp_path / "o.npz", np.zeros((3, 2, 2, 3), np.uint8)))
    assert [i.tolist() for i, _ in src.batches(2, order=[1, 2])] == [[1, 2]]
    with pytest.raises(DataError, match="stored order"):
        list(src.batches(2, order=[0, 2]))


def test_member_offsets_only_for_plain_stored_members(tmp_path):
    p = _npz(tmp_path / "m.npz", np.zeros((1, 2, 2, 3), np.uint8))
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("arr_0.npy")
    assert _stored_data_offset(p, info) is not None
    enc = zipfile.ZipInfo(info.filename)
    enc.compress_type, enc.flag_bits, enc.header_offset = info.compress_type, info.flag_bits | 0x1, info.header_offset
    assert _stored_data_offset(p, enc) is None  # encrypted: its bytes are not the array's
    moved = zipfile.ZipInfo(info.filename)
    moved.compress_type, moved.flag_bits, moved.header_offset = info.compress_type, info.flag_bits, info.header_offset + 1
    assert _stored_data_offset(p, moved) is None  # no local header there


def test_a_truncated_stream_is_a_corrupt_file(tmp_path, monkeypatch):
    def eof(*a, **k):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        yield

    monkeypatch.setattr(sources, "_npz_member_batches", eof)
    with pytest.raises(DataError, match="arr_0 is corrupt"):
        list(sources._npz_batches(tmp_path / "x.npz", 2))


def test_statistics_must_be_real_numbers_of_one_width(tmp_path):
    imgs = np.zeros((1, 2, 2, 3), np.uint8)
    src = ImageSource(_npz(tmp_path / "b.npz", imgs, mu=np.ones(3, bool), sigma=np.eye(3)), "npz", 1, "x", ["0"])
    with pytest.raises(DataError, match="mu must hold real numbers"):
        src.stats()
    src = ImageSource(_npz(tmp_path / "w.npz", imgs, mu=np.ones(3), sigma=np.eye(4)), "npz", 1, "x", ["0"])
    with pytest.raises(DataError, match=r"sigma must have shape 3x3 \(the width of mu\), got 4x4"):
        src.stats()
