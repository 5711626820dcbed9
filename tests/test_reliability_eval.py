"""Evaluation under hostile input: paired scoring past unreadable files, the identity of a stored
measurement (weights, precision, data, candidates), bounded image work, symlinked folders and
one-sentence errors for flags, npz files and output paths."""

import csv
import hashlib
import io

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from raebench.errors import DataError, RaebenchError
from raebench.metrics.scoring import score


def _pngs(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{(names or [f'im{j}' for j in range(len(images))])[i]}.png")
    return folder


def _skimage_pairs(refs, cands, keep):
    psnr = [peak_signal_noise_ratio(refs[i] / 255.0, cands[i] / 255.0, data_range=1.0) for i in keep]
    ssim = [structural_similarity(refs[i] / 255.0, cands[i] / 255.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0, channel_axis=2) for i in keep]
    return {"psnr": np.mean(psnr), "ssim": np.mean(ssim)}


@pytest.mark.parametrize("bad", [("pr", 2), ("pr", 0), ("pc", 2), ("pc", 5)])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_score_pairs_stay_aligned_past_an_unreadable_batch(tmp_path, bad, batch_size):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    cands = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    _pngs(tmp_path / "pr", refs), _pngs(tmp_path / "pc", cands)
    side, i = bad
    (tmp_path / side / f"im{i}.png").write_bytes(b"")
    out = score(str(tmp_path / "pr"), str(tmp_path / "pc"), ("psnr", "ssim"), device="cpu", write=False,
                batch_size=batch_size)
    expected = _skimage_pairs(refs, cands, [j for j in range(6) if j != i])
    assert out.n_candidates == 5 and all(r.n_images == 5 for r in out.rows)
    assert {r.metric: r.value for r in out.rows} == pytest.approx(expected, rel=1e-5)


def test_score_pairs_align_with_npz_candidates_and_unreadable_references(tmp_path):
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    cands = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    _pngs(tmp_path / "pr", refs)
    (tmp_path / "pr" / "im1.png").write_bytes(b"")
    np.savez(tmp_path / "c.npz", arr_0=cands)
    out = score(str(tmp_path / "pr"), str(tmp_path / "c.npz"), ("psnr",), device="cpu", write=False, batch_size=1)
    assert out.n_candidates == 4
    assert out.rows[0].value == pytest.approx(_skimage_pairs(refs, cands, [0, 2, 3, 4])["psnr"], rel=1e-5)


def test_score_pairing_errors_name_extra_and_duplicate_candidates(tmp_path):
    rng = np.random.default_rng(2)
    refs = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    _pngs(tmp_path / "pr", refs)
    _pngs(tmp_path / "pc", np.concatenate([refs, refs[:1]]), ["im0", "im1", "im2", "stray"])
    with pytest.raises(DataError, match=r"1 candidate\(s\) match no reference \(e\.g\. \[.*stray\.png"):
        score(str(tmp_path / "pr"), str(tmp_path / "pc"), ("psnr",), device="cpu", write=False)
    (tmp_path / "pc" / "stray.png").unlink()
    Image.fromarray(refs[0]).save(tmp_path / "pc" / "im0.jpg")
    with pytest.raises(DataError, match=r"share a name.*im0\.jpg"):
        score(str(tmp_path / "pr"), str(tmp_path / "pc"), ("psnr",), device="cpu", write=False)
    # the same on the reference side: two references x.png and x.bmp would both pair with candidate x
    (tmp_path / "pc" / "im0.jpg").unlink()
    Image.fromarray(255 - refs[0]).save(tmp_path / "pr" / "im0.bmp")
    with pytest.raises(DataError, match=r"references share a name with another.*im0\.bmp"):
        score(str(tmp_path / "pr"), str(tmp_path / "pc"), ("psnr",), device="cpu", write=False)


def test_score_npz_problems_are_clear_errors(tmp_path):
    rng = np.random.default_rng(3)
    refs = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    _pngs(tmp_path / "pr", refs)
    np.savez(tmp_path / "full.npz", arr_0=refs)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # truncated: no central directory
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    for bad in ("cut.npz", "junk.npz"):
        with pytest.raises(DataError, match="not a readable .npz"):
            score(str(tmp_path / "pr"), str(tmp_path / bad), ("psnr",), device="cpu", write=False)
    # a header that claims more images than the member holds
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (20, 16, 16, 3)})
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + refs.tobytes() * 3 + refs[:2].tobytes())
    with pytest.raises(DataError, match="claims 20 images of 16x16 but holds only 14"):
        score(str(tmp_path / "pr"), str(tmp_path / "short.npz"), ("psnr",), device="cpu", write=False)
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="arr_0 is empty"):
        score(str(tmp_path / "pr"), str(tmp_path / "empty.npz"), ("fid",), device="cpu", write=False)
    with open(tmp_path / "upper.NPZ", "wb") as f:  # np.savez would append .npz to the name
        np.savez(f, arr_0=refs)
    out = score(str(tmp_path / "pr"), str(tmp_path / "upper.NPZ"), ("psnr",), device="cpu", write=False)
    assert out.rows[0].value == 100.0  # identical images: PSNR capped at 100 dB


# ---------------------------------------------------------------------------------------------
# measurement identity: weights, precision, data and candidate fingerprints, write order
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _cli import run  # noqa: E402

from raebench.cli import main  # noqa: E402
from raebench.leaderboard import pivot  # noqa: E402
from raebench.results import ResultRow, load, write_rows  # noqa: E402


def _tiny_vae(folder: Path, seed: int) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4)
    vae.save_pretrained(folder)
    return folder


def test_compare_reuses_only_rows_of_the_same_weights_and_precision(image_folder, tmp_path, capsys, monkeypatch):
    from raebench.compare import compare

    w1, w2 = _tiny_vae(tmp_path / "w1", 0), _tiny_vae(tmp_path / "w2", 1)
    res = tmp_path / "res"
    common = ["--data", str(image_folder), "-r", "32", "--device", "cpu", "-m", "psnr", "--results", str(res)]
    kw = dict(data=str(image_folder), resolution=32, device="cpu", results_dir=str(res), reported="none")
    code, _, err = run(["eval", "-t", "sd-vae-ft-ema", "--weights", str(w1), *common], capsys)
    assert code == 0, err
    got = compare(["sd-vae-ft-ema"], ("psnr",), weights={"sd-vae-ft-ema": str(w2)}, **kw)
    assert got.computed == ["sd-vae-ft-ema"]
    from raebench.metrics.extractors import fingerprint_path

    df = load(res)
    v = dict(zip(df["weights_id"], df["value"]))
    ids = {w: f"local:{w.name}@{fingerprint_path(w)}" for w in (w1, w2)}
    assert len(v) == 2 and v[ids[w1]] != v[ids[w2]]
    assert got.table.loc[("images", "psnr"), "sd-vae-ft-ema"] == v[ids[w2]]
    # both weights get their own leaderboard row, labelled with the weights
    table = pivot(df, gaps=False)
    assert sorted(table.index) == sorted(f"sd-vae-ft-ema [{ids[w]}]" for w in (w1, w2))
    # the identity is the content, not the path: other weights written into w1's folder are measured
    # again (the stored w1 row is not reused), the same folder unchanged is reused
    got = compare(["sd-vae-ft-ema"], ("psnr",), weights={"sd-vae-ft-ema": str(w1)}, **kw)
    assert got.computed == []
    _tiny_vae(w1, 2)
    got = compare(["sd-vae-ft-ema"], ("psnr",), weights={"sd-vae-ft-ema": str(w1)}, **kw)
    assert got.computed == ["sd-vae-ft-ema"] and got.table.loc[("images", "psnr"), "sd-vae-ft-ema"] != v[ids[w1]]

    # bf16 rows stand apart from fp32 ones: load keeps both, compare (fp32) does not reuse bf16
    code, _, err = run(["eval", "-t", "pixels", "--precision", "bf16", *common], capsys)
    assert code == 0, err
    assert compare(["pixels"], ("psnr",), **kw).computed == ["pixels"]
    px = load(res).query("tokenizer == 'pixels'")
    assert sorted(px["precision"]) == ["bf16", "fp32"]
    assert {"pixels [bf16]", "pixels [fp32]"} <= set(pivot(load(res), gaps=False).index)
    assert compare(["pixels"], ("psnr",), **kw).computed == []
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run(["compare", "-t", "pixels", "--reported", "none", "--recompute", *common], capsys)
    assert code == 0 and "computed now: pixels" in out, err


def test_eval_resumes_after_the_weights_folder_moved(image_folder, tmp_path):
    """The resume key holds the weights' content identity, not their path: progress made with a
    folder that was moved (same name, other parent) is continued, other weights are not."""
    import shutil

    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.tokenizers import build_tokenizer

    from test_distributed_eval import _CrashAfter as CrashAfter

    w = _tiny_vae(tmp_path / "a" / "vae", 0)
    base = dict(tokenizer="sd-vae-ft-ema", data=str(image_folder), resolution=32, batch_size=2, device="cpu",
                metrics=("psnr",), results_dir=str(tmp_path / "res"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(EvalConfig(**base, weights=str(w)), tokenizer=CrashAfter(build_tokenizer("sd-vae-ft-ema", weights=str(w)), 3),
                 save_every=1)
    moved = tmp_path / "b" / "vae"
    moved.parent.mkdir()
    shutil.move(str(w), str(moved))
    resumed = CrashAfter(build_tokenizer("sd-vae-ft-ema", weights=str(moved)), 10**9)
    evaluate(EvalConfig(**base, weights=str(moved)), tokenizer=resumed, save_every=1)
    assert resumed.calls == 2  # only the two batches not done before the crash


def test_weights_fingerprint_covers_the_whole_file_and_caches_by_file_identity(tmp_path, monkeypatch):
    """A fine-tune that changed only middle tensors has the size and safetensors header of the
    original: the identity must still differ (an identity of the first and last MiB did not), and the
    digest is computed once per file version, not once per run."""
    import os

    import raebench.metrics.extractors as ex

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ex, "_DIGESTS", {})
    rng = np.random.default_rng(0)
    w = tmp_path / "w" / "model.safetensors"
    w.parent.mkdir()
    data = bytearray(rng.integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    w.write_bytes(bytes(data))
    before, folder_before = ex.fingerprint_path(w), ex.fingerprint_path(w.parent)
    assert ex.content_digest(w) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "cache" / "digests.json").is_file()

    # a cached digest is served without reading the file again (in this process and in a new one)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(ex, "_DIGESTS", {})
    assert ex.fingerprint_path(w) == before and str(w) not in opened
    monkeypatch.setattr("builtins.open", real_open)

    # one byte in the middle changed, size and modification time put back: another identity
    st = w.stat()
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    assert ex.fingerprint_path(w) != before and ex.fingerprint_path(w.parent) != folder_before
    # an unreadable cache only means hashing again
    (tmp_path / "cache" / "digests.json").write_text("{not json")
    monkeypatch.setattr(ex, "_DIGESTS", {})
    assert ex.content_digest(w) == hashlib.sha256(data).hexdigest()


def test_processes_asking_for_one_new_digest_wait_for_the_first_hasher(tmp_path, monkeypatch):
    """The ranks of a torchrun fingerprint the same multi-GB checkpoint at once: one hashes, the
    others wait on the cache's lock and then read its digest instead of reading the file again."""
    import json
    import threading

    import raebench.metrics.extractors as ex

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ex, "_DIGESTS", {})
    w = tmp_path / "w.bin"
    w.write_bytes(b"x" * 1000)
    cache, got = ex._digest_cache_file(), []
    with ex._digest_lock(cache):  # another process is hashing this file
        t = threading.Thread(target=lambda: got.append(ex.content_digest(w)))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got  # waits for it
        cache.write_text(json.dumps({ex._digest_key(w): "ab" * 32}))  # its result
    t.join(10)
    assert got == ["ab" * 32]  # read from the cache, not hashed again


def test_an_npz_of_samples_is_identified_without_reading_it_whole(tmp_path, monkeypatch):
    """Sample files are 10-40 GB and every torchrun rank opens them: their identity reads the size and
    the first and last MiB (as before the weights' identity covered whole files), never all of it."""
    import raebench.metrics.extractors as ex
    from raebench.metrics.sources import open_source

    imgs = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)  # ~0.5 MB a side of 2 MiB
    np.savez(tmp_path / "s.npz", arr_0=np.concatenate([imgs] * 12))
    monkeypatch.setattr(ex, "content_digest", lambda *a: (_ for _ in ()).throw(AssertionError("read whole")))
    src = open_source(tmp_path / "s.npz")
    data = (tmp_path / "s.npz").read_bytes()
    old = hashlib.sha256(f"\0{len(data)}\n".encode() + data[:1 << 20] + data[-(1 << 20):]).hexdigest()[:12]
    assert src.id == f"npz:{old}"  # the identity stored rows of earlier versions carry


def test_load_keeps_measurements_of_different_folders_and_candidate_sets(tmp_path, make_images):
    from _metrics_helpers import save_pngs

    res = tmp_path / "res"
    save_pngs(make_images(3, 32, 32, seed=1), tmp_path / "A" / "val")
    save_pngs(make_images(4, 32, 32, seed=2), tmp_path / "B" / "val")
    save_pngs(make_images(4, 32, 32, seed=3), tmp_path / "C" / "val")  # same names and sizes as B
    (tmp_path / "C" / "val" / "img_003.png").write_bytes((tmp_path / "C" / "val" / "img_003.png").read_bytes() + b"x")
    for d in ("A", "B", "C"):
        main(["eval", "-t", "bicubic-f8", "--data", str(tmp_path / d / "val"), "-r", "32", "--device", "cpu",
              "-m", "psnr", "--results", str(res)])
    df = load(res)
    assert len(df) == 3 and df["data_fingerprint"].nunique() == 3
    assert pivot(df, gaps=False).shape == (1, 3)  # one column per image list
    # score on two candidate sets with the same name: two rows
    refs = make_images(3, 32, 32, seed=4)
    np.savez(tmp_path / "references.npz", arr_0=refs.permute(0, 2, 3, 1).numpy())
    for i, d in enumerate(("r1", "r2")):
        (tmp_path / d).mkdir()
        np.savez(tmp_path / d / "reconstructions.npz", arr_0=make_images(3, 32, 32, seed=5 + i).permute(0, 2, 3, 1).numpy())
        score(str(tmp_path / "references.npz"), str(tmp_path / d / "reconstructions.npz"), ("psnr",), device="cpu",
              results_dir=str(res))
    sc = load(res).query("tokenizer == 'reconstructions'")
    assert len(sc) == 2 and sc["candidates_fingerprint"].nunique() == 2
    assert sum(str(i).startswith("reconstructions [cand #") for i in pivot(load(res), gaps=False).index) == 2


def _row(value, **kw):
    base = dict(tokenizer="pixels", weights_id="none", dataset="d", split="all", domain="open-domain", resolution=32,
                n_images=4, metric="psnr", value=value, higher_is_better=True, metric_version="v1",
                date="2024-01-01T00:00:00+00:00")
    return ResultRow(**{**base, **kw})


def test_newest_row_is_the_last_written_within_one_second(tmp_path):
    # run ids of one second sort by their random tail: the later write has the smaller one here
    write_rows([_row(1.0)], tmp_path, "20240101T000000-ffffffff")
    write_rows([_row(2.0)], tmp_path, "20240101T000000-00000000")
    df = load(tmp_path)
    assert list(df["value"]) == [2.0]
    assert list(load(tmp_path, latest=False)["value"]) == [1.0, 2.0]  # oldest first
    assert pivot(load(tmp_path, latest=False), gaps=False).iloc[0, 0] == 2.0


def test_version1_rows_load_and_non_row_lines_are_skipped(tmp_path, caplog):
    runs = tmp_path / "runs"
    runs.mkdir()
    v1 = {k: v for k, v in _row(3.0).__dict__.items() if k not in ("precision", "candidates_fingerprint", "written_ns")}
    old_bf16 = {**v1, "value": 4.0, "extra": {"precision": "bf16"}, "run_id": "a"}
    lines = [json.dumps({**v1, "schema_version": 1, "run_id": "a"}), json.dumps({**old_bf16, "schema_version": 1}),
             "42", "{}", "[1, 2]", json.dumps({"tokenizer": "x", "metric": "psnr", "value": "high"})]
    (runs / "old.jsonl").write_text("\n".join(lines) + "\n")
    df = load(tmp_path)
    assert sorted(zip(df["precision"], df["value"])) == [("bf16", 4.0), ("fp32", 3.0)]
    assert (df["written_ns"] == 0).all() and (df["candidates_fingerprint"] == "").all()
    assert "4 line(s)" in caplog.text
    from raebench.cli import main as cli_main

    cli_main(["leaderboard", "--results", str(tmp_path), "--reported", "none", "--format", "csv"])


# ---------------------------------------------------------------------------------------------
# data: extreme aspect ratios, symlinked folders
# ---------------------------------------------------------------------------------------------


def _plain_adm(im, size):
    """The ADM crop as it always was (box-halve, bicubic resize of the short side, centre crop)."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    a = np.asarray(im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC))
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def test_adm_crop_bounds_the_work_of_extreme_aspect_images(monkeypatch):
    from raebench.images import adm_center_crop

    rng = np.random.default_rng(0)
    smooth = lambda h, w: np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(  # noqa: E731
        (w, h), Image.BICUBIC))
    # normal images, up to 4:1, take the plain path bit for bit
    for h, w, size in ((80, 96, 32), (37, 148, 16), (300, 77, 64), (16, 16, 16), (9, 20, 32)):
        im = Image.fromarray(smooth(h, w))
        assert np.array_equal(adm_center_crop(im, size), _plain_adm(im, size))
    # a strip: no resize larger than the crop itself, and the plain path's pixels within a few levels
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, s, *a, **k: (sizes.append(s), resize(self, s, *a, **k))[1])
    for h, w, size in ((3000, 1, 256), (1, 3000, 64), (1000, 33, 64)):
        im = Image.fromarray(smooth(h, w))
        sizes.clear()
        got = adm_center_crop(im, size)
        assert got.shape == (size, size, 3) and max(a * b for a, b in sizes) <= size * size
        monkeypatch.setattr(Image.Image, "resize", resize)
        assert np.abs(got.astype(int) - _plain_adm(im, size)).mean() < 1.0
        monkeypatch.setattr(Image.Image, "resize", lambda self, s, *a, **k: (sizes.append(s), resize(self, s, *a, **k))[1])



def test_train_crop_bounds_the_work_of_extreme_aspect_images(monkeypatch):
    """Stage 1's random crop resized a 1 x 4096 strip whole at 256 px (384 x 1.57M: 28 s, 6 GB); now,
    as the ADM crop, beyond 4:1 only the crop is resampled, from the same draws, within a few levels."""
    import random

    import raebench.images as images_mod
    from raebench.images import random_resized_crop_train

    rng = np.random.default_rng(0)
    smooth = lambda h, w: Image.fromarray(np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(  # noqa: E731
        (w, h), Image.BICUBIC)))
    sizes = []
    resize = Image.Image.resize
    for h, w, size in ((4096, 1, 256), (1, 600, 16), (400, 13, 16), (37, 148, 16)):
        im = smooth(h, w)
        monkeypatch.setattr(Image.Image, "resize", lambda self, s, *a, **k: (sizes.append(s), resize(self, s, *a, **k))[1])
        sizes.clear()
        got = random_resized_crop_train(im, size, random.Random(3))
        monkeypatch.setattr(Image.Image, "resize", resize)
        assert got.shape == (size, size, 3)
        if max(h, w) > 4000:  # too slow to resize whole here
            assert max(a * b for a, b in sizes) <= size * size
            continue
        monkeypatch.setattr(images_mod, "EXTREME_ASPECT", 10**9)  # the plain path, as it always was
        plain = random_resized_crop_train(im, size, random.Random(3))
        monkeypatch.setattr(images_mod, "EXTREME_ASPECT", 4)
        if max(h, w) <= 4 * min(h, w):
            assert np.array_equal(got, plain)  # up to 4:1 nothing changes
        else:
            assert max(a * b for a, b in sizes) <= size * size and np.abs(got.astype(int) - plain).mean() < 1.0

def test_scan_follows_symlinked_folders_once(tmp_path, make_images):
    from _metrics_helpers import save_pngs

    from raebench.folders import scan_folder

    root = tmp_path / "root"
    save_pngs(make_images(2, 16, 16, seed=0), root / "a")
    save_pngs(make_images(3, 16, 16, seed=1), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "b")  # a linked class folder: followed
    os.symlink(tmp_path / "elsewhere", root / "d")  # a second link to it: recorded once
    os.symlink(root, root / "a" / "loop")  # a cycle: recorded, not followed
    os.symlink(root / "a", root / "c")  # a second way to the same folder: recorded once
    images = scan_folder(root)
    assert [os.path.relpath(p, root) for p in images.paths] == [
        "a/img_000.png", "a/img_001.png", "b/img_000.png", "b/img_001.png", "b/img_002.png"]
    assert images.classes == ["a", "b"]
    assert sorted((os.path.relpath(s.path, root), s.reason) for s in images.skipped) == [
        ("a/loop", "symlink to a folder scanned already"), ("c", "symlink to a folder scanned already"),
        ("d", "symlink to a folder scanned already")]


def test_atomic_writes_get_the_umask_mode_and_clean_stale_temps(tmp_path):
    import time

    from raebench.results import STALE_TEMP_SECONDS, atomic_write_bytes

    target = tmp_path / "out.md"
    stale, fresh = tmp_path / ".out.md.abc123.tmp", tmp_path / ".out.md.def456.tmp"
    stale.write_bytes(b"killed"), fresh.write_bytes(b"in flight")
    old = time.time() - STALE_TEMP_SECONDS - 10
    os.utime(stale, (old, old))
    mask = os.umask(0o022)
    try:
        atomic_write_bytes(target, b"x")
    finally:
        os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and fresh.exists()  # another writer may still own the fresh one


def test_atomic_safetensors_get_the_umask_mode(tmp_path):
    """safetensors' save_file replaces the temporary file with a 0600 one: an exported decoder's
    model.safetensors must still be readable by the others, as its model.pt and config.json are."""
    import torch

    from raebench.checkpoint import save_atomic

    mask = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        save_atomic({"w": torch.zeros(2)}, tmp_path / "model.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# CLI: one sentence, before any model loads
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail loudly if a tokenizer gets built: these errors must come first."""
    import raebench.eval_config as cfg
    import raebench.evaluate as ev

    def refuse(*a, **k):
        raise AssertionError("a tokenizer was built before the error")

    # looked up in both: the CLI imports it from eval_config, evaluate() holds its own reference
    monkeypatch.setattr(cfg, "build_tokenizer_from_config", refuse)
    monkeypatch.setattr(ev, "build_tokenizer_from_config", refuse)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "-t", "pixels", "-b", "0"], "--batch-size must be at least 1"),
    (["eval", "-t", "pixels", "-b", "-1"], "--batch-size must be at least 1"),
    (["eval", "-t", "pixels", "-r", "0"], "--resolution must be a positive"),
    (["eval", "-t", "pixels", "-r", "-5"], "--resolution must be a positive"),
    (["eval", "-t", "pixels", "-r", "100000"], "--resolution 100000 is above 16384 px"),
    (["eval", "-t", "pixels", "-r", "7"], "ssim needs images of at least 11 px"),
    (["eval", "-t", "pixels", "-r", "16", "-m", "ms-ssim"], "ms-ssim needs images of at least 161 px"),
    (["eval", "-t", "pixels", "--precision", "fp8"], "Unknown precision"),
    (["reconstruct", "-t", "pixels", "-b", "0", "--out", "OUT"], "--batch-size must be at least 1"),
    (["reconstruct", "-t", "pixels", "-r", "-5", "--out", "OUT"], "--resolution must be a positive"),
])
def test_bad_flags_are_one_sentence_before_the_model(argv, needle, tmp_path, capsys, no_model_build, image_folder):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv]
    code, out, err = run([*argv, "--data", str(image_folder), "--device", "cpu"] +
                         (["--results", str(tmp_path / "r")] if argv[0] == "eval" else []), capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("tok, r, needle", [("bicubic-f16", 100, "divisible by 16"), ("bicubic-f8", 12, "try 8 or 16")])
def test_bicubic_resolution_not_divisible_is_refused_up_front(tok, r, needle, tmp_path, capsys, image_folder):
    code, out, err = run(["eval", "-t", tok, "-r", str(r), "--data", str(image_folder), "--device", "cpu",
                          "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_score_flag_and_size_errors(tmp_path, capsys):
    rng = np.random.default_rng(5)
    _pngs(tmp_path / "a", rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    base = ["score", "--ref", str(tmp_path / "a"), "--cand", str(tmp_path / "a"), "--no-write", "--device", "cpu"]
    for extra, needle in ((["-b", "0", "-m", "psnr"], "--batch-size must be at least 1"),
                          (["-r", "-1", "-m", "psnr"], "--resolution must be a positive"),
                          (["-m", "ssim"], "ssim needs images of at least 11 px on the short side, and these images have 8"),
                          (["-m", "psnr", "-r", "16"], None)):
        code, out, err = run([*base, *extra], capsys)
        assert "Traceback" not in err
        assert (code == 0) if needle is None else (code == 2 and needle in err), err


def test_output_paths_that_cannot_be_written(tmp_path, capsys, image_folder, no_model_build):
    from raebench.results import ResultRow

    write_rows([_row(1.0)], tmp_path / "res")
    lb = ["leaderboard", "--results", str(tmp_path / "res"), "--reported", "none"]
    code, _, err = run([*lb, "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err, err
    code, _, err = run([*lb, "--out", str(tmp_path / "missing" / "sub" / "x.md")], capsys)
    assert code == 0  # folders are created
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run([*lb, "--out", str(blocker / "x.md")], capsys)
    assert code == 2 and "Cannot write --out" in err and "Traceback" not in err, err
    code, _, err = run(["reconstruct", "-t", "pixels", "--data", str(image_folder), "--out", str(blocker)], capsys)
    assert code == 2 and "is a file" in err, err
    assert ResultRow  # the row helper above built a valid row


def test_unwritable_results_folder_is_reported_before_the_model(tmp_path, capsys, image_folder, no_model_build):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(["eval", "-t", "pixels", "--data", str(image_folder), "--device", "cpu",
                        "--results", str(blocker)], capsys)
    assert code == 2 and "not writable" in err, err


def test_invalid_max_pixels_is_one_sentence(tmp_path, capsys, image_folder, monkeypatch):
    import raebench.folders as folders_mod
    import raebench.images as images_mod

    monkeypatch.setenv("RAEBENCH_MAX_PIXELS", "abc")
    # both where it is looked up: scan_folder refuses an invalid limit, load_rgb applies it
    monkeypatch.setattr(folders_mod, "MAX_PIXELS", images_mod._max_pixels("abc"))
    monkeypatch.setattr(images_mod, "MAX_PIXELS", images_mod._max_pixels("abc"))
    assert images_mod._max_pixels("2.5e3") == 2500 and images_mod._max_pixels(None) == 16384 * 16384
    code, _, err = run(["eval", "-t", "pixels", "--data", str(image_folder), "--device", "cpu",
                        "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and "RAEBENCH_MAX_PIXELS='abc' is not a positive whole number" in err, err


def test_reconstruct_empty_stale_and_nonfinite(tmp_path, capsys, make_images, monkeypatch):
    from _metrics_helpers import save_pngs

    from raebench.cli.rae_cmds import write_reconstructions
    from raebench.data import resolve_data
    from raebench.tokenizers.reference import PixelTokenizer

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"junk")
    code, _, err = run(["reconstruct", "-t", "pixels", "--data", str(bad), "-r", "16", "--device", "cpu",
                        "--out", str(tmp_path / "o0")], capsys)
    assert code == 2 and "Nothing to reconstruct" in err and "3 skipped" in err, err
    assert not (tmp_path / "o0" / "reconstructions.npz").exists()

    save_pngs(make_images(4, 16, 16, seed=0), tmp_path / "four")
    save_pngs(make_images(2, 16, 16, seed=0), tmp_path / "two")
    out = tmp_path / "o"
    for d in ("four", "two"):
        code, _, err = run(["reconstruct", "-t", "pixels", "--data", str(tmp_path / d), "-r", "16", "--device", "cpu",
                            "--out", str(out)], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]

    class Inf(PixelTokenizer):
        def decode(self, z):
            x = super().decode(z)
            x[:, :, 0, 0] = float("inf")
            x[:, :, 0, 1] = float("nan")
            return x

    with pytest.raises(RaebenchError, match=r"every reconstruction contained NaN/Inf \(2\)"):
        write_reconstructions(Inf(), resolve_data(str(tmp_path / "two")), tmp_path / "o2", resolution=16)
    assert not (tmp_path / "o2" / "reconstructions.npz").exists()


def test_reconstruct_leaves_nonfinite_reconstructions_out_and_lists_them(tmp_path, capsys, make_images):
    """A reconstruction holding NaN/Inf was written as black pixels into the PNGs and the npz, and
    `score --references references.npz --candidates reconstructions.npz` then scored it against its
    original unnoticed. Now it is left out of every output (the pairs stay aligned) and listed in
    skipped.csv with its reason, as eval leaves it out of every metric."""
    from _metrics_helpers import save_pngs

    from raebench.cli.rae_cmds import NONFINITE_REASON, write_reconstructions
    from raebench.data import resolve_data
    from raebench.tokenizers.reference import PixelTokenizer

    class NaNOnFirstOfBatch(PixelTokenizer):
        def decode(self, z):
            x = super().decode(z).clone()
            x[0, 1, 2, 3] = float("nan")
            return x

    imgs = make_images(5, 16, 16, seed=3)
    save_pngs(imgs, tmp_path / "five")
    data = resolve_data(str(tmp_path / "five"))
    out = tmp_path / "o"
    summary = write_reconstructions(NaNOnFirstOfBatch(), data, out, resolution=16, batch_size=2, references=True)
    rec = np.load(out / "reconstructions.npz")["arr_0"]
    ref = np.load(out / "references.npz")["arr_0"]
    bad = [data.images.paths[i] for i in (0, 2, 4)]  # the first image of each batch of 2
    assert summary["nonfinite"] == bad and summary["n"] == 2
    assert rec.shape == ref.shape == (2, 16, 16, 3)
    assert (rec == ref).all()  # the pixel tokenizer reconstructs exactly: every row is its own original
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000001.png", "000003.png"]
    rows = list(csv.reader(io.StringIO((out / "skipped.csv").read_text())))[1:]
    assert rows == [[p, NONFINITE_REASON] for p in bad]
    files = list(csv.reader(io.StringIO((out / "files.csv").read_text())))[1:]
    assert [r[0] for r in files] == ["1", "3"]


def test_a_killed_reconstruct_leaves_the_earlier_run_whole(tmp_path, make_images):
    """Interrupted while a second run (other images) writes into the same folder: the folder still
    holds the first run, consistent (PNGs, npz, files.csv); the next run replaces it completely."""
    from _metrics_helpers import save_pngs

    from raebench.cli.rae_cmds import write_reconstructions
    from raebench.data import resolve_data
    from raebench.tokenizers.reference import PixelTokenizer

    save_pngs(make_images(3, 16, 16, seed=1), tmp_path / "first")
    save_pngs(make_images(5, 16, 16, seed=2), tmp_path / "second")
    out = tmp_path / "o"
    write_reconstructions(PixelTokenizer(), resolve_data(str(tmp_path / "first")), out, resolution=16, batch_size=2)
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    class DiesOnSecondBatch(PixelTokenizer):
        calls = 0

        def encode(self, x):
            DiesOnSecondBatch.calls += 1
            if DiesOnSecondBatch.calls == 2:
                raise KeyboardInterrupt
            return super().encode(x)

    with pytest.raises(KeyboardInterrupt):
        write_reconstructions(DiesOnSecondBatch(), resolve_data(str(tmp_path / "second")), out, resolution=16,
                              batch_size=2, references=True)
    after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and ".images.partial" not in str(p)}
    assert after == before  # nothing of the killed run outside its staging folder
    (out / ".part-1.npz").write_bytes(b"rank 1 of a killed two-process run")
    write_reconstructions(PixelTokenizer(), resolve_data(str(tmp_path / "second")), out, resolution=16, batch_size=2)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert np.load(out / "reconstructions.npz")["arr_0"].shape[0] == 5 and not (out / "references.npz").exists()
    assert len((out / "files.csv").read_text().splitlines()) == 6 and not (out / ".images.partial").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".part-")]


def test_reconstruct_files_csv_maps_png_names_to_npz_rows(tmp_path, make_images):
    """With an unreadable file among the sources, the PNG names (scan positions) and the npz rows differ;
    files.csv gives both."""
    import csv

    from _metrics_helpers import save_pngs

    from raebench.cli.rae_cmds import write_reconstructions
    from raebench.data import resolve_data
    from raebench.tokenizers.reference import PixelTokenizer

    imgs = make_images(3, 16, 16, seed=3)
    save_pngs(imgs, tmp_path / "d")
    (tmp_path / "d" / "img_000b.png").write_bytes(b"junk")  # sorts second
    write_reconstructions(PixelTokenizer(), resolve_data(str(tmp_path / "d")), tmp_path / "o", resolution=16)
    with open(tmp_path / "o" / "files.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["row"], Path(r["source"]).name) for r in rows] == [
        ("0", "0", "img_000.png"), ("2", "1", "img_001.png"), ("3", "2", "img_002.png")]
    arr = np.load(tmp_path / "o" / "reconstructions.npz")["arr_0"]
    for r in rows:
        png = np.asarray(Image.open(tmp_path / "o" / "images" / f"{int(r['index']):06d}.png"))
        assert np.array_equal(png, arr[int(r["row"])])


def test_a_failing_first_batch_leaves_no_work_folder(tmp_path, image_folder, monkeypatch):
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.tokenizers.reference import PixelTokenizer

    class Broken(PixelTokenizer):
        def encode(self, x):
            raise RuntimeError("boom")

    cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=16, device="cpu", results_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(cfg, tokenizer=Broken())
    assert not (tmp_path / ".work").exists()  # nothing saved: no folder left, not even an empty .work/


def test_compare_counts_the_images_the_rows_use(tmp_path, image_folder):
    from raebench.compare import compare

    (image_folder / "cls_a" / "broken.png").write_bytes(b"")
    got = compare(["pixels"], ("psnr",), data=str(image_folder), resolution=16, device="cpu",
                  results_dir=str(tmp_path), reported="none")
    assert (got.n_images, got.unreadable) == (8, 1)


def test_reconstruct_files_csv_quotes_names(tmp_path, capsys, make_images):
    import csv

    from _metrics_helpers import save_pngs

    save_pngs(make_images(2, 16, 16, seed=0), tmp_path / "imgs")
    first = sorted((tmp_path / "imgs").iterdir())[0]
    first.rename(first.with_name('a,b "c".png'))
    code, _, err = run(["reconstruct", "-t", "pixels", "--data", str(tmp_path / "imgs"), "-r", "16", "--device", "cpu",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o" / "files.csv", newline="")))
    assert [r["index"] for r in rows] == ["0", "1"] and rows[0]["source"].endswith('a,b "c".png')


def test_score_counts_images_upscaled_by_the_crop(tmp_path):
    """As eval does: images smaller than --resolution are upscaled, counted and said, never silent."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    _pngs(tmp_path / "r", small)
    _pngs(tmp_path / "c", small)
    out = score(str(tmp_path / "r"), str(tmp_path / "c"), ("psnr",), device="cpu", write=False, resolution=32)
    assert len(out.upscaled) == 6 and out.rows[0].extra["upscaled"] == 6
    out = score(str(tmp_path / "r"), str(tmp_path / "c"), ("psnr",), device="cpu", write=False, resolution=16)
    assert out.upscaled == [] and out.rows[0].extra["upscaled"] == 0


def test_published_numbers_never_sit_beside_other_weights(image_folder, tmp_path, capsys):
    """Cards report the released weights: with --weights (a local copy of other weights) compare shows
    no reported column for that tokenizer, and the leaderboard gives the local row its own label."""
    from raebench.baselines import reported_frame
    from raebench.compare import compare

    w = _tiny_vae(tmp_path / "w", 0)
    res = tmp_path / "res"
    kw = dict(data=str(image_folder), resolution=32, device="cpu", results_dir=str(res))
    got = compare(["sd-vae-ft-ema"], ("psnr",), weights={"sd-vae-ft-ema": str(w)}, reported="weights", **kw)
    assert not any("reported" in str(c) for c in got.table.columns)
    rep = reported_frame(["sd-vae-ft-ema"])
    assert not rep.empty  # the card has numbers; they are withheld, not missing
    table = pivot(load(res), reported=rep, gaps=False)
    local = [i for i in table.index if i.startswith("sd-vae-ft-ema [local:w@")]
    assert len(local) == 1 and "sd-vae-ft-ema" in table.index  # measured (local) and reported (released) apart
    assert table.loc[local[0]].filter(like="reported").isna().all()


def test_feature_cache_temporaries_of_killed_writers_are_removed(tmp_path):
    """A reference-feature writer killed outright (SIGKILL: no finaliser runs) left its memory-mapped
    temporary array (N x D float32: 400 MB for 50k Inception features) in the shared cache for good.
    The next writer removes those whose lock is free; a live writer's file (locked) stays."""
    import fcntl
    import os
    import time

    from raebench.metrics.cache import FeatureCache

    root = tmp_path / "features"
    root.mkdir()
    dead, live, fresh = (root / f".{k}.abc123.npy.tmp" for k in ("dead", "live", "fresh"))
    for p in (dead, live, fresh):
        p.write_bytes(b"\0" * 64)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    os.utime(live, (old, old))
    held = os.open(live, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # its writer is still running
    try:
        w = FeatureCache(root).writer("k", 2, 3)
        assert not dead.exists() and live.exists() and fresh.exists()  # fresh: its writer may not have locked it yet
        w.write(np.arange(2), np.ones((2, 3), np.float32))
        assert w.commit({}) and (root / "k.npy").is_file()
        w2 = FeatureCache(root).writer("k2", 2, 3)
        w2.abort()
        assert sorted(p.name for p in root.iterdir()) == sorted([live.name, fresh.name, "k.json", "k.npy"])
    finally:
        os.close(held)


def test_a_progress_save_killed_mid_write_leaves_no_temporary_file(image_folder, tmp_path, monkeypatch):
    """A SIGKILL inside the first progress save left .work/KEY/.rank0.pt.XXXX.tmp (as large as the
    metric states: the features of every image so far); the re-run started afresh, finished, and
    left that file and its folder behind for good (the save's own sweep removes only hour-old temps)."""
    import raebench.evaluate as ev
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate

    cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=16, batch_size=4, device="cpu",
                     metrics=("psnr",), results_dir=str(tmp_path / "res"))
    real, keys = ev.WorkState, []
    monkeypatch.setattr(ev, "WorkState", lambda root, key, rank: keys.append(key) or real(root, key, rank))
    evaluate(cfg)  # (learns the folder name of this configuration's progress)
    work = tmp_path / "res" / ".work" / keys[0]
    work.mkdir(parents=True)
    (work / ".rank0.pt.ab12_x.tmp").write_bytes(b"half a checkpoint")  # what the killed save left
    (work / ".rank0.seg-0a1b2c3d-0.pt.cd34_y.tmp").write_bytes(b"half a segment")  # or of a features segment
    evaluate(cfg)
    assert not (tmp_path / "res" / ".work").exists()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_shard_is_read_from_its_first_image_not_the_member_start(tmp_path, monkeypatch, compressed):
    """The last rank of a scoring (or a resumed one) starts at image lo: a stored member is read from
    there, not read through from its start (34 GB of a 50k 512-px sample file for rank 7 of 8); a
    compressed one still reads through, and both give the same images, also when the member is short."""
    import io
    import zipfile

    import torch

    from raebench.metrics.sources import _npz_batches

    imgs = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "s.npz", arr_0=imgs, labels=np.arange(40))
    read = []
    real = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: read.append(n) or real(self, n))
    got = list(_npz_batches(tmp_path / "s.npz", 3, 30, 40))
    assert [int(i[0]) for i, _ in got] == list(range(30, 40, 3))
    assert np.array_equal(torch.cat([b for _, b in got]).permute(0, 2, 3, 1).numpy(), imgs[30:])
    member = sum(n for n in read if n > 0)
    assert member > 30 * 8 * 8 * 3 if compressed else member < 8 * 8 * 3, member  # stored: only the .npy header

    buf = io.BytesIO()  # a stored member shorter than its header says: an error, not the bytes that follow it
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (5, 8, 8, 3)})
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + imgs[:3].tobytes())
        zf.writestr("labels.npy", bytes(4096))
    with pytest.raises(DataError, match="truncated at image 3 of 5"):
        list(_npz_batches(tmp_path / "short.npz", 2, 0, 5))


def test_reconstruct_holds_one_batch_not_the_set(tmp_path, make_images, monkeypatch):
    """The images go to disk batch by batch and into the npz files chunk by chunk: memory does not grow
    with the set (50k images at 256 px are 9.8 GB, twice that with --references)."""
    import tracemalloc

    from _metrics_helpers import save_pngs

    import raebench.cli.rae_cmds as rc
    from raebench.data import resolve_data
    from raebench.tokenizers.reference import PixelTokenizer

    imgs = make_images(48, 64, 64, seed=4)
    save_pngs(imgs, tmp_path / "d")
    data = resolve_data(str(tmp_path / "d"))
    monkeypatch.setattr(rc, "RAW_CHUNK_BYTES", 8 * 64 * 64 * 3)
    rc.write_reconstructions(PixelTokenizer(), data, tmp_path / "warm", resolution=64, batch_size=4, png=False)
    tracemalloc.start()
    try:
        rc.write_reconstructions(PixelTokenizer(), data, tmp_path / "o", resolution=64, batch_size=4, png=False,
                                 references=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = 48 * 64 * 64 * 3
    assert peak < total / 2, (peak, total)
    with np.load(tmp_path / "o" / "reconstructions.npz") as rec, np.load(tmp_path / "o" / "references.npz") as ref:
        assert np.array_equal(rec["arr_0"], ref["arr_0"]) and rec["arr_0"].shape == (48, 64, 64, 3)
        expect = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in data.images.paths])
        assert np.array_equal(ref["arr_0"], expect)  # 64-px images: the crop keeps them as they are
