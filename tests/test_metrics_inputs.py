"""What a metric can take: enough images per side (refused up front, or reported after the pass
with the other rows kept), images large enough for its network, and uint8 pairs only."""

import contextlib
import io

import numpy as np
import pytest
import torch
from _cli import run
from _metrics_helpers import save_pngs, stand_in_extractors  # noqa: F401
from skimage.metrics import peak_signal_noise_ratio

from raebench.errors import RaebenchError
from raebench.metrics import METRICS, MetricBatch
from raebench.metrics.base import MetricInputError, TooFewImagesError
from raebench.results import load


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail loudly if a tokenizer or a metric network gets built: these errors must come first."""
    import raebench.eval_config as cfg
    import raebench.evaluate as ev
    import raebench.evaluator as evr

    def refuse(*a, **k):
        raise AssertionError("a model was built before the error")

    # each name where it is looked up: the CLI and score import from eval_config and evaluator,
    # evaluate() holds its own references
    monkeypatch.setattr(cfg, "build_tokenizer_from_config", refuse)
    monkeypatch.setattr(ev, "build_tokenizer_from_config", refuse)
    monkeypatch.setattr(evr, "Evaluator", refuse)
    monkeypatch.setattr(ev, "Evaluator", refuse)


# ---------------------------------------------------------------------------------------------
# Too few images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric, need", [("fid", 2), ("kid", 2), ("precision", 4), ("density", 6), ("is", 10)])
def test_score_refuses_too_few_images_before_any_model(metric, need, tmp_path, capsys, make_images, no_model_build):
    save_pngs(make_images(need - 1, 16, 16, seed=1), tmp_path / "ref")
    save_pngs(make_images(need - 1, 16, 16, seed=2), tmp_path / "cand")
    code, _, err = run(["score", "--ref", str(tmp_path / "ref"), "--cand", str(tmp_path / "cand"), "-m", f"psnr,{metric}",
                        "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{metric} needs at least {need} images" in err and f"{need - 1} in --" in err, err
    assert f"add images or drop {metric}." in err
    assert not (tmp_path / "res").exists() or load(tmp_path / "res").empty


def test_eval_refuses_a_limit_below_what_a_metric_needs(tmp_path, capsys, image_folder, no_model_build):
    code, _, err = run(["eval", "-t", "pixels", "--data", str(image_folder), "-r", "16", "--limit", "3", "-m", "psnr,precision",
                        "--device", "cpu", "--results", str(tmp_path)], capsys)
    assert code == 2 and "precision needs at least 4 images on each side, and there are 3 in the data 'images' (--limit 3)" in err, err


def test_stored_reference_statistics_stand_in_for_reference_images():
    from raebench.checks import check_image_counts

    check_image_counts(("fid", "sfid"), 0, 2, stats=("mu", "sigma", "mu_s", "sigma_s"))  # no reference image needed
    with pytest.raises(RaebenchError, match="sfid needs at least 2 images on each side, and there are 0 in the references"):
        check_image_counts(("fid", "sfid"), 0, 2, stats=("mu", "sigma"))
    with pytest.raises(RaebenchError, match="is needs at least 10 images to score, and there are 9 in the candidates"):
        check_image_counts(("is",), 0, 9)


def test_unreadable_files_leave_too_few_then_the_other_rows_are_written(tmp_path, capsys, stand_in_extractors):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    cands = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for folder, images in (("ref", refs), ("cand", cands)):
        save_pngs(torch.from_numpy(images).permute(0, 3, 1, 2), tmp_path / folder)
    for i in (1, 2):  # counted as 3 files up front; only one pair is readable
        (tmp_path / "ref" / f"img_{i:03d}.png").write_bytes(b"")
    code, out, err = run(["score", "--ref", str(tmp_path / "ref"), "--cand", str(tmp_path / "cand"), "-m", "psnr,fid,kid",
                          "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "Not computed: fid needs at least 2 images on each side, got 1 candidates and 1 references; kid needs" in err
    assert "the rows of psnr were written" in err and "psnr" in out
    df = load(tmp_path / "res")
    assert list(df["metric"]) == ["psnr"] and int(df["n_images"].iloc[0]) == 1
    assert df["value"].iloc[0] == pytest.approx(peak_signal_noise_ratio(refs[0], cands[0], data_range=255), rel=1e-5)

    # eval: the same through the tokenizer path, and nothing but failures is one sentence with no rows
    code, _, err = run(["eval", "-t", "pixels", "--data", str(tmp_path / "ref"), "-r", "16", "-m", "fid", "--device", "cpu",
                        "--results", str(tmp_path / "res2")], capsys)
    assert code == 2 and "Nothing to write for 'pixels' on 'ref': fid needs at least 2 images" in err, err
    assert not (tmp_path / "res2").exists() or load(tmp_path / "res2").empty


def test_metrics_with_too_few_images_raise_a_raebench_error():
    feats = {"inception": ({"pool": torch.randn(1, 8), "logits": torch.randn(1, 8)},
                           {"pool": torch.randn(1, 8), "logits": torch.randn(1, 8)})}
    for name in ("fid", "kid", "precision", "density", "is"):
        m = METRICS.get(name).build()
        m.update(MetricBatch(None, None, feats))
        with pytest.raises(TooFewImagesError, match=f"{name} needs at least") as e:
            m.compute()
        assert isinstance(e.value, RaebenchError)


def test_kid_subsets_larger_than_a_side_are_refused_and_small_sets_noted():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    from raebench.metrics.kernel import kid

    g = torch.Generator().manual_seed(0)
    cand, ref = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64) + 0.3
    with pytest.raises(TooFewImagesError, match="KID subsets of 6 images need at least 6 images on each side, got 5"):
        kid(cand, ref, 100, 6)
    m = METRICS.get("kid").build()
    m.update(MetricBatch(None, None, {"inception": ({"pool": ref.float()}, {"pool": cand.float()})}))
    out = m.compute()
    assert m.notes == ["KID subset size 5 < 1000 (only 5 candidates, 8 references; every subset holds all 5 candidates)"]
    theirs = kid_features_to_metric(cand.float().double(), ref.float().double(), kid_subsets=100, kid_subset_size=5,
                                    kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                    kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    assert out["kid"] == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-10)
    m.reset()
    m.update(MetricBatch(None, None, {"inception": ({"pool": ref[:5].float()}, {"pool": cand.float()})}))
    assert m.compute()["kid-std"] == pytest.approx(0.0, abs=1e-12) and "kid-std is 0" in m.notes[0]


# ---------------------------------------------------------------------------------------------
# Image sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_min_side_is_what_the_lpips_network_needs(net):
    """The lpips package's own network runs at the registered minimum and fails one pixel below."""
    import lpips

    with contextlib.redirect_stdout(io.StringIO()):
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    side = METRICS.get(f"lpips-{net}").min_image_side
    with torch.no_grad():
        for shape in ((side, side), (side, 3 * side), (3 * side, side)):
            model(torch.zeros(1, 3, *shape), torch.zeros(1, 3, *shape))
        with pytest.raises(RuntimeError, match="too small"):
            model(torch.zeros(1, 3, side - 1, 2 * side), torch.zeros(1, 3, side - 1, 2 * side))


def test_min_image_sides_of_the_registry():
    from raebench.checks import min_image_side

    assert {m: min_image_side(m) for m in ("ssim", "ms-ssim", "lpips-alex", "lpips", "psnr", "fid", "dreamsim", "cmmd")} == {
        "ssim": 11, "ms-ssim": 161, "lpips-alex": 31, "lpips": 16, "psnr": 1, "fid": 1, "dreamsim": 1, "cmmd": 1}


@pytest.mark.parametrize("argv", [
    ["score", "--ref", "SMALL", "--cand", "SMALL", "-m", "lpips-alex"],
    ["score", "--ref", "SMALL.npz", "--cand", "SMALL.npz", "-m", "psnr,lpips-alex"],
    ["eval", "-t", "pixels", "--data", "SMALL", "-r", "24", "-m", "psnr,lpips-alex"],
])
def test_lpips_on_small_images_is_refused_before_any_model(argv, tmp_path, capsys, make_images, monkeypatch, no_model_build):
    imgs = make_images(3, 24, 24, seed=0)
    save_pngs(imgs, tmp_path / "small")
    np.savez(tmp_path / "small.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy())
    monkeypatch.setenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", str(tmp_path / "missing.pth"))  # a load would fail otherwise
    argv = [a.replace("SMALL", str(tmp_path / "small")) for a in argv]
    code, _, err = run([*argv, "--device", "cpu", "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and "lpips-alex needs images of at least 31 px on the short side" in err and "24" in err, err


def test_lpips_metric_refuses_small_images_itself(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, tmp_path / "a.pth")
    m = METRICS.get("lpips-alex").build(weights=str(tmp_path / "a.pth"))
    x = torch.zeros(2, 3, 30, 64, dtype=torch.uint8)
    with pytest.raises(MetricInputError, match=r"lpips-alex needs images of at least 31 px on the short side, got \(30, 64\)"):
        m.update(MetricBatch(x, x))


# ---------------------------------------------------------------------------------------------
# Paired inputs are uint8 pairs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["psnr", "ssim", "ms-ssim"])
def test_paired_metrics_refuse_float_images_and_unequal_pairs(name):
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    m = METRICS.get(name).build()
    for ref, cand in ((a.float() / 255, b.float() / 255), (a, b.double() / 255), (a.float(), b)):
        with pytest.raises(MetricInputError, match=f"{name} takes uint8 images .* convert \\[0, 1\\] floats with raebench.data.to_uint8"):
            m.update(MetricBatch(ref, cand))
    with pytest.raises(MetricInputError, match=r"one \(N, 3, H, W\) shape, got \(2, 3, 32, 32\) and \(1, 3, 32, 32\)"):
        m.update(MetricBatch(a, b[:1]))  # would broadcast silently
    assert m.count == 0


def test_psnr_of_uint8_pairs_equals_skimage():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    m = METRICS.get("psnr").build()
    m.update(MetricBatch(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)))
    ref = np.mean([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)])
    assert m.compute()["psnr"] == pytest.approx(ref, rel=1e-6)  # the images reach it as float32


# ---------------------------------------------------------------------------------------------
# Reference .npz files: stored statistics, archive members, image sizes
# ---------------------------------------------------------------------------------------------


def _npz_file(path, images=None, **arrays):
    np.savez(path, **({} if images is None else {"arr_0": images.permute(0, 2, 3, 1).numpy()}), **arrays)
    return path


def _patched_member(path, offsets):
    """Set bytes of the (only) member's local and central headers: {(signature, offset): (value, width)}."""
    b = bytearray(path.read_bytes())
    for (sig, off), (value, width) in offsets.items():
        i = b.index(sig)
        b[i + off:i + off + width] = (int.from_bytes(b[i + off:i + off + width], "little") | value).to_bytes(width, "little") \
            if width == 1 else value.to_bytes(width, "little")
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("stats, says", [
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "mu holds 2048 NaN/Inf"),
    ({"mu": np.zeros(2048), "sigma": np.diag(np.r_[np.inf, np.ones(2047)])}, "sigma holds 1 NaN/Inf"),
    ({"mu": np.array([None] * 2048, dtype=object), "sigma": np.eye(2048)}, "statistics cannot be read"),
    ({"mu": np.zeros(10), "sigma": np.eye(10)}, "mu must have shape 2048 (the feature width"),
    ({"mu": np.zeros(2048), "sigma": np.eye(10)}, "sigma must have shape 2048x2048"),
    ({"mu": np.zeros(2048, dtype=complex), "sigma": np.eye(2048)}, "mu must hold real numbers"),
])
def test_score_refuses_bad_reference_statistics_before_any_model(stats, says, tmp_path, capsys, make_images, no_model_build):
    ref = _npz_file(tmp_path / "ref.npz", make_images(3, 16, 16, seed=1), **stats)
    save_pngs(make_images(3, 16, 16, seed=2), tmp_path / "cand")
    code, _, err = run(["score", "--references", str(ref), "--candidates", str(tmp_path / "cand"), "-m", "fid",
                        "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "ref.npz" in err and says in err, err


def test_fid_from_nonfinite_features_is_nan_with_the_cause(tmp_path, capsys, monkeypatch):
    """An Inception weights file holding NaN: fid and precision are NaN with a note naming the network
    and its file (not a number computed from NaN features), psnr is unaffected."""
    from _metrics_helpers import photo_crops, random_inception_weights

    path = random_inception_weights(tmp_path / "inception.pth")
    state = torch.load(path)
    state["Conv2d_1a_3x3.conv.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    monkeypatch.setenv("RAEBENCH_INCEPTION_WEIGHTS", str(path))
    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    images = photo_crops(4, 32, seed=3)
    save_pngs(images, tmp_path / "ref")
    save_pngs(images.flip(-1), tmp_path / "cand")
    code, _, err = run(["score", "--references", str(tmp_path / "ref"), "--candidates", str(tmp_path / "cand"),
                        "-m", "psnr,fid,precision", "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    assert code == 0, err
    df = load(tmp_path / "res")
    rows = {r.metric: r for r in df.itertuples()}
    assert np.isfinite(rows["psnr"].value) and rows["psnr"].notes == ""
    for m in ("fid", "precision", "recall"):
        assert np.isnan(rows[m].value), m
        assert "NaN/Inf" in rows[m].notes and "inception" in rows[m].notes and "inception.pth" in rows[m].notes


def test_npz_archive_members_that_cannot_be_read_are_one_sentence(tmp_path, capsys, make_images, no_model_build):
    save_pngs(make_images(3, 16, 16, seed=2), tmp_path / "cand")
    enc = _patched_member(_npz_file(tmp_path / "enc.npz", make_images(3, 16, 16)),
                          {(b"PK\x03\x04", 6): (1, 1), (b"PK\x01\x02", 8): (1, 1)})  # the "encrypted" flag
    method = _patched_member(_npz_file(tmp_path / "method.npz", make_images(3, 16, 16)),
                             {(b"PK\x03\x04", 8): (99, 2), (b"PK\x01\x02", 10): (99, 2)})  # compression method 99
    for ref, why in ((enc, "RuntimeError"), (method, "NotImplementedError")):
        code, _, err = run(["score", "--references", str(ref), "--candidates", str(tmp_path / "cand"), "-m", "psnr",
                            "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
        err = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and f"{ref.name} is not a readable .npz ({why}" in err, err


def _npz_with_header(path, shape):
    """An .npz whose arr_0 header claims ``shape`` (uint8), with as many bytes as it claims when it can."""
    import zipfile

    header = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", body + bytes(max(0, int(np.prod(shape)))))
    return path


@pytest.mark.parametrize("shape, metric", [((6, 0, 0, 3), "fid"), ((6, 0, 0, 3), "psnr"), ((2, -32, 32, 3), "psnr")])
def test_npz_images_without_pixels_are_refused(shape, metric, tmp_path, capsys, make_images, no_model_build):
    cand = _npz_with_header(tmp_path / "cand.npz", shape)
    _npz_file(tmp_path / "ref.npz", make_images(6, 16, 16))
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(cand), "-m", metric,
                        "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "cand.npz: arr_0 must hold images of at least 1x1 pixels" in err, err
    assert "--resolution" not in err


def test_npz_size_advice_never_asks_to_crop_an_npz(tmp_path, capsys, make_images, no_model_build):
    _npz_file(tmp_path / "a.npz", make_images(3, 16, 16))
    _npz_file(tmp_path / "b.npz", make_images(3, 24, 24))
    _npz_file(tmp_path / "tiny.npz", make_images(3, 8, 8))
    for ref, cand, metric, says in (("a", "b", "psnr", "differ in size ((16, 16) vs (24, 24)); an .npz cannot be resized"),
                                    ("tiny", "tiny", "ssim", "an .npz cannot be resized: drop ssim")):
        code, _, err = run(["score", "--references", str(tmp_path / f"{ref}.npz"), "--candidates", str(tmp_path / f"{cand}.npz"),
                            "-m", metric, "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
        err = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and says in err and "--resolution" not in err, err


def test_npz_paired_with_unpadded_numeric_file_names_is_noted(tmp_path, capsys, make_images):
    from PIL import Image

    images = make_images(12, 16, 16, seed=4)
    _npz_file(tmp_path / "ref.npz", images)
    (tmp_path / "cand").mkdir()
    for i, x in enumerate(images):  # file i is row i, but read in text order: 0, 1, 10, 11, 2, ...
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "cand" / f"{i}.png")
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "cand"),
                        "-m", "psnr", "--device", "cpu", "--results", str(tmp_path / "res")], capsys)
    assert code == 0, err
    row = load(tmp_path / "res").iloc[0]
    assert "numeric file names of cand are read in text order (0, 1, 10, 11, ...)" in row["notes"], row["notes"]
    assert "text order" in " ".join(err.split())  # also said at the time
    # zero-padded names sort numerically: no note
    for i in range(12):
        (tmp_path / "cand" / f"{i}.png").rename(tmp_path / "cand" / f"{i:03d}.png")
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "cand"),
                        "-m", "psnr", "--device", "cpu", "--results", str(tmp_path / "res2")], capsys)
    row = load(tmp_path / "res2").iloc[0]
    assert code == 0 and row["notes"] == "" and row["value"] == pytest.approx(100.0), err


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_with_damaged_image_bytes_is_one_sentence_not_a_number(save, tmp_path, capsys, make_images):
    """Bytes of arr_0 damaged in place (same size): a stored member was read raw and scored (PSNR 86
    instead of 100), a compressed one raised zipfile's BadZipFile as a traceback. Both are refused
    before the last batch (the CRC-32 covers the whole member); a stored member read in part is not
    checksummed."""
    from raebench.metrics.sources import _npz_batches

    imgs = make_images(6, 16, 16).permute(0, 2, 3, 1).numpy()
    save(tmp_path / "ref.npz", arr_0=imgs)
    save(tmp_path / "bad.npz", arr_0=imgs)
    b = bytearray((tmp_path / "bad.npz").read_bytes())
    b[b.index(b"arr_0.npy") + 200] ^= 0xFF  # inside the member's data (after the local header and .npy header)
    (tmp_path / "bad.npz").write_bytes(bytes(b))
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "bad.npz"),
                        "-m", "psnr", "--results", str(tmp_path / "res")], capsys)
    assert code == 2 and "Traceback" not in err and "bad.npz: arr_0 is corrupt" in err, err
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").glob("*.jsonl"))
    got = []
    with pytest.raises(RaebenchError, match="arr_0 is corrupt"):
        for _, x in _npz_batches(tmp_path / "bad.npz", 4):
            got.append(x)
    assert len(got) == 1  # of 2: the error comes instead of the last
    if save is np.savez:
        assert len(list(_npz_batches(tmp_path / "bad.npz", 4, 2, 6))) == 1  # a partial read: unchecked (documented)


def test_npz_with_a_damaged_settings_member_scores_with_a_warning(tmp_path, capsys, make_images, caplog):
    """raebench_settings (how `raebench sample` made the file) damaged in place: zipfile's BadZipFile
    ended the command with a traceback after the scoring; the images are intact and checked, so the
    rows are written without the record, with a warning."""
    import json

    imgs = make_images(4, 16, 16).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "ref.npz", arr_0=imgs)
    np.savez(tmp_path / "cand.npz", arr_0=imgs, raebench_settings=np.array(json.dumps({"model": "x" * 40})))
    b = bytearray((tmp_path / "cand.npz").read_bytes())
    i = b.index("xxxx".encode("utf-32-le"), b.index(b"raebench_settings.npy"))
    b[i] = ord("y")
    (tmp_path / "cand.npz").write_bytes(bytes(b))
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "cand.npz"),
                        "-m", "psnr", "--results", str(tmp_path / "res")], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "raebench_settings member is corrupt" in caplog.text + err
    rows = load(tmp_path / "res")
    assert len(rows) == 1 and "sampling" not in rows.iloc[0]["extra"]


def test_reference_statistics_with_a_damaged_deflate_stream_are_one_sentence(tmp_path, capsys, make_images, no_model_build):
    """np.savez_compressed's mu with zeroed bytes raises zlib.error, which came out as a traceback."""
    import zipfile

    np.savez_compressed(tmp_path / "ref.npz", arr_0=make_images(3, 16, 16).permute(0, 2, 3, 1).numpy(),
                        mu=np.random.default_rng(0).random(2048), sigma=np.eye(2048))
    info = zipfile.ZipFile(tmp_path / "ref.npz").getinfo("mu.npy")
    b = bytearray((tmp_path / "ref.npz").read_bytes())
    start = info.header_offset + 30 + len("mu.npy") + 40
    b[start:start + 64] = bytes(64)
    (tmp_path / "ref.npz").write_bytes(bytes(b))
    _npz_file(tmp_path / "cand.npz", make_images(3, 16, 16))
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "cand.npz"),
                        "-m", "fid", "--results", str(tmp_path / "res")], capsys)
    assert code == 2 and "Traceback" not in err and "ref.npz: its statistics cannot be read (zlib.error:" in err, err


def test_npz_whose_compressed_images_cannot_even_start_is_one_sentence(tmp_path, capsys, make_images, no_model_build):
    """The first bytes of a compressed arr_0 damaged: reading its .npy header raised zlib.error (a traceback)."""
    import struct
    import zipfile

    np.savez_compressed(tmp_path / "cand.npz", arr_0=make_images(3, 16, 16).permute(0, 2, 3, 1).numpy())
    info = zipfile.ZipFile(tmp_path / "cand.npz").getinfo("arr_0.npy")
    b = bytearray((tmp_path / "cand.npz").read_bytes())
    name_len, extra_len = struct.unpack("<HH", b[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    b[start:start + 16] = b"\xff" * 16
    (tmp_path / "cand.npz").write_bytes(bytes(b))
    _npz_file(tmp_path / "ref.npz", make_images(3, 16, 16))
    code, _, err = run(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "cand.npz"),
                        "-m", "psnr", "--results", str(tmp_path / "res")], capsys)
    assert code == 2 and "Traceback" not in err and "cand.npz is not a readable .npz (zlib.error:" in err, err
