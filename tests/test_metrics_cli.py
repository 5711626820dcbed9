"""End to end: ``raebench eval`` with Inception/LPIPS metrics (random weights via environment
variables), the reference-feature cache across tokenizers, and ``raebench score`` on folders and
ADM-style ``.npz`` files."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from _metrics_helpers import photo_crops, random_inception_weights, save_pngs, stand_in_extractors  # noqa: F401

from raebench.cli import main
from raebench.errors import DataError
from raebench.evaluator import Evaluator
from raebench.results import load


def _values(results) -> dict:
    df = load(results)
    return dict(zip(df["metric"], df["value"]))


def test_eval_cli_inception_lpips_and_reference_cache(tmp_path, monkeypatch):
    import torchvision

    from raebench.metrics.extractors import InceptionExtractor

    data = save_pngs(photo_crops(8, 40, seed=7), tmp_path / "data")
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alex.pth")
    monkeypatch.setenv("RAEBENCH_INCEPTION_WEIGHTS", str(random_inception_weights(tmp_path / "inception.pth")))
    monkeypatch.setenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", str(tmp_path / "alex.pth"))
    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    seen = []
    forward = InceptionExtractor.forward
    monkeypatch.setattr(InceptionExtractor, "forward", lambda self, x: (seen.append(x.shape[0]), forward(self, x))[1])

    args = ["--data", str(data), "--resolution", "32", "--device", "cpu", "--batch-size", "5"]
    main(["eval", "--tokenizer", "bicubic-f8", "--metrics", "psnr,ssim,fid,kid,lpips-alex", "--results",
          str(tmp_path / "r1"), *args])
    df = load(tmp_path / "r1")
    v = dict(zip(df["metric"], df["value"]))
    assert set(v) == {"psnr", "ssim", "fid", "kid", "kid-std", "lpips-alex"}
    assert all(np.isfinite(x) for x in v.values()) and v["fid"] > 0 and v["lpips-alex"] > 0
    hib = dict(zip(df["metric"], df["higher_is_better"]))
    assert hib["kid"] == False and hib["psnr"] == True and pd.isna(hib["kid-std"])  # noqa: E712 (numpy bools)
    row = df[df["metric"] == "kid"].iloc[0]
    assert "subset size 8" in row["notes"] and "inception" in row["extra"]["metric_weights"]
    assert sum(seen) == 16  # originals and reconstructions, once each
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 1  # reference pool3 features

    # a second tokenizer on the same images: reference features come from the cache
    seen.clear()
    main(["eval", "--tokenizer", "pixels", "--metrics", "fid", "--results", str(tmp_path / "r2"), *args])
    assert sum(seen) == 8
    assert _values(tmp_path / "r2")["fid"] == pytest.approx(0.0, abs=1e-6)  # identical sets


def test_score_paired_folders_match_by_name(tmp_path, stand_in_extractors, make_images):
    ref, cand = make_images(6, 32, 32, seed=1), make_images(6, 32, 32, seed=2)
    save_pngs(ref, tmp_path / "ref", ".png")
    save_pngs(cand, tmp_path / "cand", ".bmp")  # other extension, same names
    main(["score", "--references", str(tmp_path / "ref"), "--candidates", str(tmp_path / "cand"), "--metrics",
          "psnr,fid", "--results", str(tmp_path / "res"), "--device", "cpu", "--batch-size", "4"])
    got = _values(tmp_path / "res")
    ev = Evaluator(("psnr", "fid"), torch.device("cpu"), options={})
    ev.update(ref, cand)
    assert got == pytest.approx(ev.compute()[0], rel=1e-9)
    df = load(tmp_path / "res")
    assert (df["tokenizer"] == "cand").all() and (df["dataset"] == "ref").all() and df["extra"][0]["protocol"] == "paired"


def _npz(path, images=None, **stats):
    arrays = {} if images is None else {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    np.savez(path, **arrays, **stats)
    return path


def test_score_unpaired_npz_with_adm_statistics(tmp_path, stand_in_extractors, make_images):
    ref, cand = make_images(14, 32, 32, seed=3), make_images(9, 32, 32, seed=4)
    save_pngs(ref, tmp_path / "ref")
    _npz(tmp_path / "samples.npz", cand)
    common = ["--candidates", str(tmp_path / "samples.npz"), "--device", "cpu", "--batch-size", "4"]
    main(["score", "--references", str(tmp_path / "ref"), "--metrics", "fid,sfid,precision,kid", "--results",
          str(tmp_path / "a"), *common])
    from_images = _values(tmp_path / "a")
    # an ADM reference batch: stored mu/sigma (FID) and mu_s/sigma_s (sFID) plus the images (precision, KID)
    f = Evaluator(("fid", "sfid"), torch.device("cpu"), options={}).extractor("inception")(ref)
    pool, spatial = f["pool"].double().numpy(), f["spatial"].double().numpy()
    stats = {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False), "mu_s": spatial.mean(0), "sigma_s": np.cov(spatial, rowvar=False)}
    _npz(tmp_path / "VIRTUAL_ref.npz", ref, **stats)
    stand_in_extractors.calls.clear()
    main(["score", "--references", str(tmp_path / "VIRTUAL_ref.npz"), "--metrics", "fid,sfid,precision,kid",
          "--results", str(tmp_path / "b"), *common])
    assert _values(tmp_path / "b") == pytest.approx(from_images, rel=1e-6)
    assert stand_in_extractors.calls["inception"] == 14 + 9
    # statistics alone serve fid/sfid without touching reference images; precision needs them
    _npz(tmp_path / "stats_only.npz", None, **stats)
    stand_in_extractors.calls.clear()
    main(["score", "--references", str(tmp_path / "stats_only.npz"), "--metrics", "fid,sfid", "--results",
          str(tmp_path / "c"), *common])
    assert _values(tmp_path / "c") == pytest.approx({k: from_images[k] for k in ("fid", "sfid")}, rel=1e-6)
    assert stand_in_extractors.calls["inception"] == 9
    with pytest.raises(DataError, match="statistics"):
        from raebench.metrics.scoring import score

        score(str(tmp_path / "stats_only.npz"), str(tmp_path / "samples.npz"), ("precision",), device="cpu", write=False)


def test_each_row_says_whether_stored_statistics_made_it(tmp_path, stand_in_extractors, make_images, capsys):
    """A reference batch with mu/sigma but no mu_s/sigma_s: only the fid row was computed from stored
    statistics (and carries their digest); sfid and precision read its images. Candidates that hold
    statistics (the reference batch on the wrong side, or a sample file the ADM evaluator would take
    mu/sigma from) are scored from their images, with a warning and a note."""
    from raebench.metrics.scoring import stats_digest

    ref, cand = make_images(8, 32, 32, seed=3), make_images(6, 32, 32, seed=4)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(24, 30))
    stats = {"mu": rng.normal(size=24), "sigma": a @ a.T / 30}  # the stand-in pool features are 24-d
    _npz(tmp_path / "VIRTUAL_ref.npz", ref, **stats)
    _npz(tmp_path / "samples.npz", cand, **stats)
    main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "VIRTUAL_ref.npz"),
          "--metrics", "fid,sfid,precision", "--device", "cpu", "--batch-size", "4", "--results", str(tmp_path / "r")])
    df = load(tmp_path / "r").set_index("metric")
    fid = df.loc["fid", "extra"]
    assert fid["protocol"] == "unpaired, stored reference statistics"
    assert fid["reference_statistics"] == {"keys": ["mu", "sigma"], "sha256": stats_digest(stats, ("mu", "sigma"))}
    for m in ("sfid", "precision", "recall"):
        assert df.loc[m, "extra"]["protocol"] == "unpaired" and "reference_statistics" not in df.loc[m, "extra"]
        assert df.loc[m, "extra"]["n_references"] == 8
    assert (df["n_images"] == 6).all()
    captured = capsys.readouterr()
    assert "8 reference images (fid: the reference's stored statistics)" in " ".join(captured.out.split())
    text = " ".join(captured.err.split())
    assert "VIRTUAL_ref.npz holds mu/sigma but no mu_s/sigma_s: sfid is computed from its 8 images" in text
    assert "--samples samples.npz holds stored statistics (mu, sigma), which are not used" in text
    assert "swap --samples and --reference" in text
    note = "the candidates' stored statistics were not used"
    assert note in df.loc["fid", "notes"] and note in df.loc["sfid", "notes"] and note not in df.loc["precision", "notes"]


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # features from the mmap are copies
def test_score_reference_cache_and_paired_errors(tmp_path, stand_in_extractors, make_images, monkeypatch):
    from raebench.metrics.scoring import score

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    ref, cand = make_images(7, 32, 32, seed=5), make_images(7, 32, 32, seed=6)
    save_pngs(ref, tmp_path / "ref")
    save_pngs(cand, tmp_path / "cand")
    a = score(str(tmp_path / "ref"), str(tmp_path / "cand"), ("fid", "kid"), device="cpu", write=False)
    stand_in_extractors.calls.clear()
    b = score(str(tmp_path / "ref"), str(tmp_path / "cand"), ("fid", "kid"), device="cpu", write=False)
    assert stand_in_extractors.calls["inception"] == 7  # candidates only: the references came from the cache
    assert [r.value for r in a.rows] == pytest.approx([r.value for r in b.rows], rel=1e-12)
    save_pngs(cand[:5], tmp_path / "fewer")
    with pytest.raises(DataError, match="same relative name"):
        score(str(tmp_path / "ref"), str(tmp_path / "fewer"), ("psnr",), device="cpu", write=False)


def test_score_from_the_reference_cache_equals_a_cold_run_bit_for_bit(tmp_path, stand_in_extractors, make_images,
                                                                     monkeypatch):
    """Cached reference features reach the metrics in the run's batches: FID's running sums are taken
    about the first batch's mean, so one big chunk gave other float64 roundings (found by
    bench/fuzz_kill_resume.py: a run killed after publishing the cache resumed 1 ulp off)."""
    from raebench.metrics.scoring import score

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    save_pngs(make_images(7, 32, 32, seed=5), tmp_path / "ref")
    save_pngs(make_images(6, 32, 32, seed=6), tmp_path / "cand")
    cold, warm = (score(str(tmp_path / "ref"), str(tmp_path / "cand"), ("fid", "kid"), device="cpu", write=False,
                        batch_size=2) for _ in range(2))
    assert stand_in_extractors.calls["inception"] == 7 + 6 + 6  # the second run read the references from the cache
    assert [r.value for r in warm.rows] == [r.value for r in cold.rows]


def test_eval_excludes_nonfinite_reconstructions_but_caches_every_reference(tmp_path, stand_in_extractors, make_images):
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.tokenizers.reference import BicubicTokenizer

    class HalfNaN(BicubicTokenizer):
        name = "half-nan"

        def decode(self, z):
            x = super().decode(z)
            x[::2] = float("nan")  # every other image of each batch
            return x

    data = save_pngs(make_images(9, 32, 32, seed=8), tmp_path / "data")
    cfg = EvalConfig(tokenizer="half-nan", metrics=("fid", "psnr"), data=str(data), resolution=32, device="cpu",
                     batch_size=4, results_dir=str(tmp_path / "r"))
    out = evaluate(cfg, tokenizer=HalfNaN(8))
    assert out.n_images == 4 and len(out.nonfinite) == 5
    assert stand_in_extractors.calls["inception"] == 9 + 4  # all originals (for the cache), finite reconstructions
    cached = list((tmp_path / "feature-cache" / "features").glob("*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (9, 24)
    stand_in_extractors.calls.clear()
    again = evaluate(cfg, tokenizer=HalfNaN(8))
    assert stand_in_extractors.calls["inception"] == 4  # references from the cache, rows by dataset index
    assert {r.metric: r.value for r in again.rows} == pytest.approx({r.metric: r.value for r in out.rows}, rel=1e-12)


def test_eval_samples_reference_is_score(tmp_path, stand_in_extractors, make_images):
    """`raebench eval --samples S.npz --reference R.npz` (the stage-2 gFID entry point) gives `score`'s numbers."""
    ref, cand = make_images(10, 32, 32, seed=5), make_images(8, 32, 32, seed=6)
    _npz(tmp_path / "ref.npz", ref)
    _npz(tmp_path / "samples.npz", cand)
    main(["score", "--references", str(tmp_path / "ref.npz"), "--candidates", str(tmp_path / "samples.npz"),
          "--metrics", "fid,precision", "--device", "cpu", "--results", str(tmp_path / "a")])
    main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref.npz"),
          "--metrics", "fid,precision", "--device", "cpu", "--results", str(tmp_path / "b")])
    assert _values(tmp_path / "b") == pytest.approx(_values(tmp_path / "a"), rel=1e-9)
    assert set(_values(tmp_path / "b")) >= {"fid", "precision", "recall"}
    assert (load(tmp_path / "a")["domain"] == "open-domain").all() and (load(tmp_path / "b")["domain"] == "open-domain").all()
    # without --metrics: fid, sfid, is, precision (is needs 10 samples)
    _npz(tmp_path / "ten.npz", make_images(10, 32, 32, seed=7))
    main(["eval", "--samples", str(tmp_path / "ten.npz"), "--reference", str(tmp_path / "ref.npz"), "--device", "cpu",
          "--results", str(tmp_path / "c")])
    assert set(_values(tmp_path / "c")) == {"fid", "sfid", "is", "is-std", "precision", "recall"}


def _rows(results) -> list[tuple]:
    df = load(results).sort_values("metric")
    return list(zip(df["metric"], df["value"], df["domain"], df["resolution"], df["n_images"], df["dataset"], df["tokenizer"]))


def test_eval_samples_passes_every_score_flag(tmp_path, make_images, capsys):
    """`eval --samples rec.npz --reference imgs -m psnr,ssim -r 32 --domain in-domain -b 3` is that score call:
    the metrics asked for (not the generation defaults), the crop of the folder, the domain."""
    from _cli import run

    refs = make_images(5, 40, 48, seed=1)
    save_pngs(refs, tmp_path / "imgs")
    _npz(tmp_path / "rec.npz", make_images(5, 32, 32, seed=2))
    flags = ["-m", "psnr,ssim", "-r", "32", "--domain", "in-domain", "-b", "3", "--device", "cpu"]
    code, _, err = run(["score", "--references", str(tmp_path / "imgs"), "--candidates", str(tmp_path / "rec.npz"),
                        *flags, "--results", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = run(["eval", "--samples", str(tmp_path / "rec.npz"), "--reference", str(tmp_path / "imgs"),
                        *flags, "--results", str(tmp_path / "b")], capsys)
    assert code == 0, err
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r[0] for r in b] == ["psnr", "ssim"] and b == a
    assert b[0][2:5] == ("in-domain", 32, 5)
    # errors name the flags the user typed
    _npz(tmp_path / "rec4.npz", make_images(4, 32, 32, seed=2))
    code, _, err = run(["eval", "--samples", str(tmp_path / "rec4.npz"), "--reference", str(tmp_path / "imgs"),
                        *flags, "--results", str(tmp_path / "c")], capsys)
    assert code == 2 and "--samples" in err and "--candidates" not in err, err
    _npz(tmp_path / "stats.npz", None, mu=np.zeros(3))
    code, _, err = run(["score", "--references", str(tmp_path / "stats.npz"), "--candidates", str(tmp_path / "rec.npz"),
                        *flags, "--results", str(tmp_path / "d")], capsys)
    assert code == 2 and "holds no images (an .npz needs arr_0); paired metrics (psnr, ssim)" in " ".join(err.split()), err


@pytest.mark.parametrize("extra, flags", [
    (["--precision", "bf16"], "--precision has no effect"),
    (["--limit", "3", "--seed", "1"], "--limit, --seed have no effect"),
    (["--num-workers", "0"], "--num-workers has no effect"),
    (["--decoder", "d.pt", "--stats", "s.pt", "--weights", "w"], "--weights, --decoder, --stats have no effect"),
    (["--tokenizer-config", "x.yaml"], "--tokenizer-config has no effect"),
    (["-t", "pixels", "--data", "x"], "--tokenizer, --data have no effect"),
])
def test_eval_samples_refuses_flags_without_effect(extra, flags, tmp_path, capsys):
    from _cli import run

    code, _, err = run(["eval", "--samples", "s.npz", "--reference", "r.npz", *extra, "--results", str(tmp_path)], capsys)
    assert code == 2 and flags in err and "as `raebench score` does" in err and "Traceback" not in err, err


@pytest.mark.parametrize("how", ["score", "eval --samples"])
def test_score_reads_raebench_metric_options(how, tmp_path, make_images, monkeypatch):
    """Without --option, score (and eval --samples) take $RAEBENCH_METRIC_OPTIONS as eval does; --option wins."""
    import torchvision

    from raebench.metrics.extractors import fingerprint_path

    torch.manual_seed(0)
    weights = {}
    for k in ("env", "flag"):
        weights[k] = tmp_path / f"alex-{k}.pth"
        torch.save({f"features.{n}": v for n, v in torchvision.models.alexnet().features.state_dict().items()}, weights[k])
    assert fingerprint_path(weights["env"]) != fingerprint_path(weights["flag"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))  # no other place to find AlexNet
    monkeypatch.delenv("RAEBENCH_LPIPS_ALEX_WEIGHTS", raising=False)
    monkeypatch.setenv("RAEBENCH_METRIC_OPTIONS", f"lpips-alex.weights={weights['env']}")
    save_pngs(make_images(2, 32, 32, seed=1), tmp_path / "ref")
    save_pngs(make_images(2, 32, 32, seed=2), tmp_path / "cand")
    pair = (["score", "--references", str(tmp_path / "ref"), "--candidates", str(tmp_path / "cand")] if how == "score" else
            ["eval", "--reference", str(tmp_path / "ref"), "--samples", str(tmp_path / "cand")])
    for res, extra, which in (("e", [], "env"), ("f", ["--option", f"lpips-alex.weights={weights['flag']}"], "flag")):
        main([*pair, "-m", "lpips-alex", "--device", "cpu", "--results", str(tmp_path / res), *extra])
        row = load(tmp_path / res).iloc[0]
        assert row["extra"]["metric_weights"]["lpips-alex"] == fingerprint_path(weights[which])


def test_compare_builds_each_metric_network_once(tmp_path, stand_in_extractors, image_folder, monkeypatch):
    """compare over several tokenizers loads Inception (and the other networks) once, not per tokenizer."""
    from raebench.compare import compare
    from raebench.metrics import EXTRACTORS
    from raebench.metrics.base import shared_network, sharing_networks

    built = []
    spec = EXTRACTORS.get("inception")
    inner = spec.builder
    monkeypatch.setitem(EXTRACTORS._specs, "inception",
                        dataclasses.replace(spec, builder=lambda **kw: built.append(kw) or inner(**kw)))
    table, computed = compare(["bicubic-f8", "bicubic-f16", "pixels"], ("fid", "kid"), data=str(image_folder),
                              resolution=32, batch_size=4, device="cpu", results_dir=str(tmp_path / "res"))
    assert computed == ["bicubic-f8", "bicubic-f16", "pixels"] and len(built) == 1
    assert table.shape[0] == 3
    # outside the block every call builds; inside, one build per key
    assert shared_network(("k",), object) is not shared_network(("k",), object)
    with sharing_networks():
        assert shared_network(("k",), object) is shared_network(("k",), object)


@pytest.mark.parametrize("paired", [True, False])
def test_score_resumes_after_a_crash_with_the_uninterrupted_numbers(tmp_path, stand_in_extractors, make_images,
                                                                    monkeypatch, paired):
    """Killed in the middle (paired batches, or the candidates after the references): the re-run
    continues from the saved position, at another batch size, and writes the uninterrupted numbers."""
    from raebench.evaluator import Evaluator as Ev
    from raebench.metrics.scoring import score

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache-off"))
    ref, cand = make_images(10, 32, 32, seed=7), make_images(10 if paired else 9, 32, 32, seed=8)
    save_pngs(ref, tmp_path / "ref")
    _npz(tmp_path / "cand.npz", cand) if not paired else save_pngs(cand, tmp_path / "cand")
    cands = str(tmp_path / ("cand" if paired else "cand.npz"))
    metrics = ("psnr", "fid") if paired else ("fid", "kid")
    full = score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=str(tmp_path / "full"), batch_size=2)
    hook = "update" if paired else "update_candidates"
    real, calls = getattr(Ev, hook), []

    def dies(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache-crash"))  # no reference features from the full run
    monkeypatch.setattr(Ev, hook, dies)
    res = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=str(res), batch_size=2, save_every=1)
    assert not list((res / "runs").glob("*.jsonl")) and len(list((res / ".work").glob("*/rank0.pt"))) == 1
    calls.clear()
    stand_in_extractors.calls.clear()
    out = score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=str(res), batch_size=3, save_every=1)
    n = len(cand)
    assert stand_in_extractors.calls["inception"] == (n - 6) * (2 if paired else 1)  # 3 batches of 2 were saved
    assert {r.metric: r.value for r in out.rows} == pytest.approx({r.metric: r.value for r in full.rows}, rel=1e-9)
    assert out.n_candidates == n and not list((res / ".work").glob("*/rank0.pt"))


def test_a_resume_past_part_of_the_references_ignores_a_cache_filled_meanwhile(tmp_path, stand_in_extractors,
                                                                              make_images, monkeypatch):
    """An unpaired score killed while streaming the references, then another score of the same
    references (which fills the feature cache), then the re-run: the re-run skipped the rest of the
    references (the cache made it take the cached branch, which feeds nothing to a resumed state), so
    its FID used the first references only (FID 0.80 over 20 of 48 references instead of 0.62)."""
    from raebench.evaluator import Evaluator as Ev
    from raebench.metrics.scoring import score

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    save_pngs(make_images(8, 32, 32, seed=7), tmp_path / "ref")
    cands = str(_npz(tmp_path / "cand.npz", make_images(6, 32, 32, seed=8)))
    metrics = ("fid", "kid")
    full = score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=str(tmp_path / "full"), batch_size=2,
                 write=True)
    for p in (tmp_path / "cache").rglob("*.npy"):
        p.unlink()  # the crash below starts without cached reference features
    real, calls = Ev.update_reference, []

    def dies(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # 2 batches of 2 references saved (save_every=1)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Ev, "update_reference", dies)
    res = str(tmp_path / "crash")
    with pytest.raises(KeyboardInterrupt):
        score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=res, batch_size=2, save_every=1)
    monkeypatch.setattr(Ev, "update_reference", real)
    other = str(_npz(tmp_path / "other.npz", make_images(4, 32, 32, seed=9)))
    score(str(tmp_path / "ref"), other, metrics, device="cpu", results_dir=str(tmp_path / "other"), batch_size=2)
    assert list((tmp_path / "cache").rglob("*.npy"))  # the other job cached the reference features
    out = score(str(tmp_path / "ref"), cands, metrics, device="cpu", results_dir=res, batch_size=2, save_every=1)
    assert {r.metric: r.value for r in out.rows} == pytest.approx({r.metric: r.value for r in full.rows}, rel=1e-9)


def test_a_resume_of_references_fed_from_a_cache_that_is_gone_does_not_count_them_twice(
        tmp_path, stand_in_extractors, make_images, monkeypatch):
    """A score that took its reference features from the cache, killed among the candidates, re-run
    after the cache was cleared: the saved states hold every reference already; streaming them again
    counted each twice."""
    import shutil

    from raebench.evaluator import Evaluator as Ev
    from raebench.metrics.scoring import score

    monkeypatch.setenv("RAEBENCH_CACHE", str(tmp_path / "cache"))
    save_pngs(make_images(8, 32, 32, seed=7), tmp_path / "ref")
    cands = str(_npz(tmp_path / "cand.npz", make_images(6, 32, 32, seed=8)))
    full = score(str(tmp_path / "ref"), cands, ("fid",), device="cpu", results_dir=str(tmp_path / "full"), batch_size=2)
    real, calls = Ev.update_candidates, []

    def dies(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Ev, "update_candidates", dies)
    res = str(tmp_path / "crash")
    with pytest.raises(KeyboardInterrupt):  # references from the cache, then 1 batch of candidates saved
        score(str(tmp_path / "ref"), cands, ("fid",), device="cpu", results_dir=res, batch_size=2, save_every=1)
    monkeypatch.setattr(Ev, "update_candidates", real)
    shutil.rmtree(tmp_path / "cache")
    stand_in_extractors.calls.clear()
    out = score(str(tmp_path / "ref"), cands, ("fid",), device="cpu", results_dir=res, batch_size=2, save_every=1)
    assert stand_in_extractors.calls["inception"] == 4  # the remaining candidates only
    assert out.rows[0].value == pytest.approx(full.rows[0].value, rel=1e-9)


def test_score_reads_folders_with_workers_to_the_same_numbers(tmp_path, make_images):
    from raebench.metrics.scoring import score

    save_pngs(make_images(6, 32, 32, seed=9), tmp_path / "ref")
    save_pngs(make_images(6, 32, 32, seed=10), tmp_path / "cand")
    args = (str(tmp_path / "ref"), str(tmp_path / "cand"), ("psnr", "ssim"))
    a = score(*args, device="cpu", write=False, batch_size=4)
    b = score(*args, device="cpu", write=False, batch_size=4, num_workers=2)
    assert [r.value for r in a.rows] == [r.value for r in b.rows] and b.n_candidates == 6


def test_compare_reuses_only_rows_of_the_same_metric_networks_and_options(image_folder, tmp_path, monkeypatch, capsys):
    """FID rows measured with other Inception weights, or with inception.dtype=float64, used to be
    reused by `compare`, while float64 rows were measured again on every run. Reuse now needs the same
    version (options included) and the same network weights as recorded with the row
    (extra.metric_weights), resolved without loading any network; metric weights that cannot be found
    no longer stop a compare whose rows are all stored."""
    from raebench.cli import main
    from raebench.results import load

    wa = random_inception_weights(tmp_path / "a.pth", seed=0)
    wb = random_inception_weights(tmp_path / "b.pth", seed=1)
    res = tmp_path / "res"
    argv = ["compare", "-t", "bicubic-f8", "--data", str(image_folder), "-r", "32", "-m", "fid", "--device", "cpu",
            "--reported", "none", "--results", str(res)]

    def run_with(weights, options=""):
        monkeypatch.setenv("RAEBENCH_INCEPTION_WEIGHTS", str(weights))
        monkeypatch.setenv("RAEBENCH_METRIC_OPTIONS", options)
        main(argv)
        return capsys.readouterr().out

    assert "computed now: bicubic-f8" in run_with(wa)
    assert "computed now: nothing" in run_with(wa)
    assert "computed now: bicubic-f8" in run_with(wb)  # other weights: measured, not reused
    assert "computed now: nothing" in run_with(wb)
    assert "computed now: bicubic-f8" in run_with(wa, "inception.dtype=float64")
    assert "computed now: nothing" in run_with(wa, "inception.dtype=float64")  # reused, not measured every run
    assert set(load(res)["metric_version"]) == {"fid-tfinception-pool3-eigh-v1", "fid-tfinception-pool3-eigh-v1+dtype=float64"}
    # stored rows are shown even where the metric weights are not at hand (nothing to measure)
    monkeypatch.delenv("RAEBENCH_INCEPTION_WEIGHTS")
    monkeypatch.setenv("RAEBENCH_METRIC_OPTIONS", "")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(argv)
    out = capsys.readouterr().out
    assert "computed now: nothing" in out and "fid" in out


def test_the_reference_plan_is_the_same_on_every_rank_after_a_hard_crash():
    """Rank 0 killed before its first save, rank 1 saved half its references, another job filled the
    cache meanwhile: rank 0 must stream its share (not feed every cached reference while rank 1
    streams its own again: counted twice). One process and the ordinary cases are unchanged."""
    from raebench.metrics.scoring import _reference_plan as plan

    hit, miss = (False, True), (True, False)  # (needs reference features, found them in the cache)
    assert plan(None, [(None, *hit), (5, *hit)]) == "stream"  # rank 0: its share from 0
    assert plan(5, [(None, *hit), (5, *hit)]) == "stream"  # rank 1: from 5
    assert plan(None, [(None, *hit), (None, *hit)]) == "cache"  # nothing saved anywhere: the cache serves
    assert plan(None, [(None, *hit), (0, *hit)]) == "cache"  # rank 1 saved after the cache decision
    assert plan(0, [(None, *hit), (0, *hit)]) == "done"
    assert plan(None, [(None, *miss)]) == "stream"
    assert plan(None, [(None, False, False)]) == "done"  # stored reference statistics: nothing to read


def test_the_reference_plan_agrees_when_the_ranks_saw_the_cache_at_different_times():
    """Each rank looks at the feature cache when it reaches the references; another job publishing it
    in between made rank 0 feed every cached reference while rank 1 streamed its share (counted
    twice), or rank 1 take the cache (feeding nothing) while rank 0 streamed only its own share
    (half the references missing). Every rank now streams its share (served by index where cached)."""
    from raebench.metrics.scoring import _reference_plan as plan

    hit, miss = (False, True), (True, False)
    for views in ([(None, *hit), (None, *miss)], [(None, *miss), (None, *hit)]):
        assert [plan(None, views), plan(None, views)] == ["stream", "stream"]


@pytest.mark.parametrize("job", ["eval", "score"])
def test_a_kill_between_the_rows_and_the_state_removal_adds_no_second_run(tmp_path, stand_in_extractors, make_images,
                                                                          image_folder, monkeypatch, job):
    """SIGKILLed after its rows are written but before its resume state is removed (found by
    bench/fuzz_kill_resume.py), the re-run of the same command resumes that state: it rewrites the
    same run file (the run id is kept in the state) instead of adding a second run of the rows."""
    from raebench.eval_progress import WorkState
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate
    from raebench.metrics.scoring import score
    from raebench.results import load

    res = tmp_path / "res"
    if job == "score":
        save_pngs(make_images(6, 32, 32, seed=1), tmp_path / "ref")
        save_pngs(make_images(6, 32, 32, seed=2), tmp_path / "cand")
        run = lambda: score(str(tmp_path / "ref"), str(tmp_path / "cand"), ("psnr", "fid"), device="cpu",  # noqa: E731
                            results_dir=str(res), batch_size=2, save_every=1)
    else:
        cfg = EvalConfig(tokenizer="pixels", data=str(image_folder), resolution=32, batch_size=2, device="cpu",
                         metrics=("psnr", "fid"), results_dir=str(res))
        run = lambda: evaluate(cfg, save_every=1)  # noqa: E731
    release = WorkState.release

    def killed(self, remove):  # the process dies here: its files stay, the kernel drops its lock
        if remove:
            self._lock.close()
            raise KeyboardInterrupt
        release(self, remove)

    monkeypatch.setattr(WorkState, "release", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    first = load(res)
    assert len(first) == 2 and list((res / ".work").glob("*/rank0.pt"))
    monkeypatch.setattr(WorkState, "release", release)
    run()
    again = load(res)
    assert len(list((res / "runs").glob("*.jsonl"))) == 1 and not (res / ".work").exists()
    assert again["run_id"].tolist() == first["run_id"].tolist()
    assert again["value"].tolist() == first["value"].tolist()
