"""ADM-style .npz sources (raebench.metrics.sources): header checks, member offsets, statistics checks."""

import io
import zipfile

import numpy as np
import torch
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


@pytest.mark.parametrize("arr, hint", [
    (np.zeros((2, 3, 8, 8), np.uint8), "arr.transpose(0, 2, 3, 1)"),  # NCHW, as some samplers keep it
    (np.zeros((2, 8, 8, 3), np.float32), "np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), for [-1, 1]"),
    (np.zeros((2, 8, 8, 3), np.int64), "arr.astype(np.uint8)"),
    (np.zeros((2, 8, 8, 4), np.uint8), "converting to RGB"),
    (np.array([np.zeros((8, 8, 3), np.uint8)] * 2, dtype=object), "refused (it would need unpickling)"),
])
def test_a_wrongly_laid_out_arr_0_says_how_to_store_it(tmp_path, arr, hint, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("an npz member was unpickled"))
    p = _npz(tmp_path / "s.npz", arr)
    with pytest.raises(DataError, match="must be \\(N, H, W, 3\\) uint8") as e:
        open_source(p)
    assert hint in str(e.value)


def test_a_fortran_ordered_arr_0_is_refused_before_any_image_is_read(tmp_path):
    p = _npz(tmp_path / "s.npz", np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8)))
    with pytest.raises(DataError, match="Fortran order"):
        open_source(p)  # it was refused only at the first batch, after the models had loaded


def test_paths_that_are_no_image_set_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "missing.npz")
    np.save(tmp_path / "s.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="is an .npy array.*np.savez"):
        open_source(tmp_path / "s.npy")
    (tmp_path / "shards").mkdir()
    for r in range(2):  # per-rank sample files, as some codebases write them
        _npz(tmp_path / "shards" / f"rank{r}.npz", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="2 .npz file\\(s\\) \\(rank0.npz, rank1.npz\\); raebench reads one .npz"):
        open_source(tmp_path / "shards")


def test_samples_without_arr_0_name_the_arrays_they_hold(tmp_path):
    from raebench.metrics.scoring import score

    np.savez(tmp_path / "s.npz", images=np.zeros((12, 8, 8, 3), np.uint8))
    _npz(tmp_path / "ref.npz", np.zeros((12, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="needs arr_0, \\(N, H, W, 3\\) uint8; its arrays: 'images'"):
        score(str(tmp_path / "ref.npz"), str(tmp_path / "s.npz"), ("fid",), device="cpu", write=False)


def test_the_adm_evaluator_reads_what_raebench_sample_writes(tmp_path):
    """The reading path of guided-diffusion's evaluations/evaluator.py: ``arr_0.npy`` in the zip,
    npy header 1.0 or 2.0 (else it loads the file whole), C order and no object dtype (else the
    same), raw bytes streamed in batches; and ``read_statistics`` uses a sample file's own
    ``mu``/``sigma`` when it has a ``mu`` key, so ours must not have one."""
    from raebench.stage2.sample import class_labels, generate_npz

    y = class_labels(10, 5, seed=0)

    def decode(z):  # (B, 4, 2, 2) -> (B, 3, 8, 8) in [0, 1]
        return torch.sigmoid(z[:, :3]).repeat_interleave(4, -1).repeat_interleave(4, -2)

    out = generate_npz(lambda noise, labels: noise, decode, tmp_path / "samples.npz", y, (4, 2, 2), batch_size=4, seed=0)
    with open(out, "rb") as f, zipfile.ZipFile(f) as zf:
        assert "arr_0.npy" in zf.namelist()
        with zf.open("arr_0.npy") as arr_f:
            version = np.lib.format.read_magic(arr_f)
            assert version in ((1, 0), (2, 0))
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0)(arr_f)
            assert not fortran and not dtype.hasobject and dtype == np.uint8 and shape == (10, 8, 8, 3)
            batches = [np.frombuffer(arr_f.read(k * 8 * 8 * 3), dtype).reshape(k, 8, 8, 3) for k in (4, 4, 2)]
    with np.load(out) as z:  # allow_pickle=False, as the evaluator's np.load
        assert "mu" not in z.files
        assert np.array_equal(np.concatenate(batches), z["arr_0"]) and np.array_equal(z["arr_1"], y.numpy())
