"""``raebench analyze`` re-runs compute only missing rows; per-tokenizer weights, official configs
and bf16 enter the rows' identity; ``raebench ls references`` loads nothing."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ORACLE
from raebench.analysis.reuse import part_of
from raebench.results import load
from _cli import run
from _locking import lock_state_at_unlink

FAST = ["--reference", "random-proj", "--perceptual", "rmse", "--no-plots", "--mutual-k", "3", "--knn-k", "3",
        "--n-diag", "2", "--interp-pairs", "1", "--interp-steps", "2", "--sigmas", "1", "-r", "32", "--device", "cpu"]


def _runs(res: Path) -> set[str]:
    return {p.name for p in (res / "runs").glob("*.jsonl")}


def _new_rows(res: Path, before: set[str]):
    df = load(res, latest=False)
    return df[~df["run_id"].isin({Path(n).stem for n in before})]


def test_rerun_computes_only_missing_parts(image_folder: Path, tmp_path: Path, capsys):
    res = tmp_path / "res"
    base = ["analyze", "-t", "pixels", "-t", "bicubic-f8", "--data", str(image_folder), *FAST, "--results", str(res)]
    code, out, err = run(base, capsys)
    assert code == 0, err
    first = load(res)
    assert {part_of(m) for m in first["metric"]} == {"probe", "align:random-proj", "spectrum", "robust", "interp"}

    before = _runs(res)  # the same command again: nothing is encoded or written, the table shows stored values
    code, out, err = run(base, capsys)
    assert code == 0, err
    assert _runs(res) == before and "every row reused" in " ".join(err.split())
    assert "latent-erank" in out and "align-cka-random-proj" in out

    # a new σ: only the robustness rows are measured and written
    code, out, err = run([*base, "--sigmas", "0.5,1"], capsys)
    assert code == 0, err
    new = _new_rows(res, before)
    assert set(new["metric"]) == {"robust-psnr-vs-decode-s0.5", "robust-psnr-vs-image-s0.5", "robust-rmse-vs-decode-s0.5",
                                  "robust-rmse-vs-image-s0.5", "robust-psnr-vs-decode-s1", "robust-psnr-vs-image-s1",
                                  "robust-rmse-vs-decode-s1", "robust-rmse-vs-image-s1"}
    assert set(new["tokenizer"]) == {"pixels", "bicubic-f8"}
    old = first.set_index(["tokenizer", "metric"])["value"]
    for t, m, v in zip(new["tokenizer"], new["metric"], new["value"]):  # the same images, the same numbers
        if (t, m) in old.index:
            assert v == pytest.approx(old[(t, m)], rel=1e-12)

    # another data subset (fingerprint), another seed, or --recompute: everything again
    before = _runs(res)
    code, out, err = run([*base, "--limit", "6"], capsys)
    assert code == 0, err
    assert len(_new_rows(res, before)) == len(first)
    before = _runs(res)
    code, out, err = run([*base, "--recompute"], capsys)
    assert code == 0, err
    assert len(_new_rows(res, before)) == len(first)


def test_each_tokenizers_rows_are_stored_as_it_finishes(image_folder: Path, tmp_path: Path, capsys, monkeypatch):
    """Killed while the second tokenizer is measured: the first one's rows are already stored, so
    the re-run measures only the second."""
    import raebench.analysis.run as run_mod

    real, seen = run_mod.measure, []

    def dies_on_the_second(cfg, acc, *a, **k):
        seen.append(acc.tok.name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(cfg, acc, *a, **k)

    res = tmp_path / "res"
    base = ["analyze", "-t", "pixels", "-t", "bicubic-f8", "--data", str(image_folder), *FAST, "--results", str(res)]
    monkeypatch.setattr(run_mod, "measure", dies_on_the_second)
    code, _, _ = run(base, capsys)
    assert code != 0 and seen == ["pixels", "bicubic-f8"]
    assert set(load(res)["tokenizer"]) == {"pixels"}
    monkeypatch.setattr(run_mod, "measure", real)
    before = _runs(res)
    code, _, err = run(base, capsys)
    assert code == 0, err
    assert set(_new_rows(res, before)["tokenizer"]) == {"bicubic-f8"}


def test_per_tokenizer_weights_are_part_of_the_identity(image_folder: Path, tmp_path: Path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4)
    vae.save_pretrained(tmp_path / "w1")
    vae.save_pretrained(tmp_path / "w1-copy")  # the same weights elsewhere
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)  # other weights: one tensor changed
    vae.save_pretrained(tmp_path / "w2")
    res = tmp_path / "res"
    base = ["analyze", "-t", "sd-vae-ft-ema", "-t", "pixels", "--data", str(image_folder), *FAST, "--results", str(res)]
    code, out, err = run([*base, "--weights", f"sd-vae-ft-ema={tmp_path / 'w1'}"], capsys)
    assert code == 0, err
    df = load(res)
    wid = set(df.loc[df["tokenizer"] == "sd-vae-ft-ema", "weights_id"])
    from raebench.metrics.extractors import fingerprint_path

    assert wid == {f"local:w1@{fingerprint_path(tmp_path / 'w1')}"}
    before = _runs(res)
    code, out, err = run([*base, "--weights", f"sd-vae-ft-ema={tmp_path / 'w1-copy'}"], capsys)  # the same weights
    assert code == 0, err
    assert _new_rows(res, before).empty  # reused: weights are compared by content, not by folder name
    before = _runs(res)
    code, out, err = run([*base, "--weights", f"sd-vae-ft-ema={tmp_path / 'w2'}"], capsys)  # other weights
    assert code == 0, err
    new = _new_rows(res, before)
    assert set(new["tokenizer"]) == {"sd-vae-ft-ema"}  # pixels reused, the VAE measured again
    assert set(new["weights_id"]) == {f"local:w2@{fingerprint_path(tmp_path / 'w2')}"}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-t", "pixels", "--weights", "bicubic-f8=/w"], "not among the analysed tokenizers"),
        (["-t", "pixels", "--decoder", "pixels=/d.pt"], "takes no --decoder"),
        (["-t", "pixels", "--weights", "pixels"], "NAME=PATH"),
        (["-t", "pixels", "--precision", "fp16"], "Unknown --precision"),
        (["--reference", "none"], "Give at least one --tokenizer"),
        (["-t", "pixels", "-t", "pixels"], "Two tokenizers are named pixels"),
    ],
)
def test_analyze_option_errors_are_one_sentence(argv, needle, tmp_path: Path, capsys):
    code, out, err = run(["analyze", *argv, "--limit", "2", "-r", "32", "--results", str(tmp_path), "--device", "cpu"],
                         capsys)
    assert code == 2, (out, err)
    assert needle in " ".join(err.split()) and "Traceback" not in err


def test_bf16_rows_are_versioned_apart_and_close_to_fp32(image_folder: Path, tmp_path: Path, capsys):
    res = tmp_path / "res"
    base = ["analyze", "-t", "bicubic-f8", "--data", str(image_folder), *FAST, "--results", str(res)]
    assert run(base, capsys)[0] == 0
    code, out, err = run([*base, "--precision", "bf16"], capsys)  # the fp32 rows are not reused for bf16
    assert code == 0, err
    df = load(res)
    bf = df[df["extra"].map(lambda e: e["precision"] == "bf16")].set_index("metric")
    fp = df[df["extra"].map(lambda e: e["precision"] == "fp32")].set_index("metric")
    assert len(bf) == len(fp) > 10 and set(bf.index) == set(fp.index)
    for m in bf.index:
        assert "-bf16" in bf.loc[m, "metric_version"] and "-bf16" not in fp.loc[m, "metric_version"]
    for m in ("latent-std", "latent-token-norm-mean", "robust-psnr-vs-image-s1"):
        assert bf.loc[m, "value"] == pytest.approx(fp.loc[m, "value"], rel=0.05), m


@pytest.mark.skipif(not (ORACLE / "meta.json").exists(), reason="oracle fixtures not present")
def test_official_config_tokenizer(tmp_path: Path, capsys, make_images):
    """--tokenizer-config: the official YAML of the tiny oracle RAE, analysed beside a named tokenizer."""
    import yaml
    from PIL import Image

    m = json.loads((ORACLE / "meta.json").read_text())
    params = {
        "encoder_cls": "Dinov2withNorm", "encoder_config_path": f"{ORACLE}/encoder",
        "encoder_input_size": m["encoder_input_size"], "encoder_params": {"dinov2_path": f"{ORACLE}/encoder", "normalize": True},
        "decoder_config_path": f"{ORACLE}/decoder", "decoder_patch_size": m["decoder_patch_size"],
        "pretrained_decoder_path": f"{ORACLE}/decoder/model.pt", "noise_tau": 0.0, "reshape_to_2d": True,
        "normalization_stat_path": f"{ORACLE}/stat.pt",
    }
    (tmp_path / "rae.yaml").write_text(yaml.safe_dump({"stage_1": {"target": "stage1.RAE", "params": params}}))
    data = tmp_path / "imgs"
    data.mkdir()
    for i, im in enumerate(make_images(6, 72, 80)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(data / f"{i}.png")
    res = tmp_path / "res"
    fast = [a if a != "32" else str(m["image_size"]) for a in FAST]
    code, out, err = run(["analyze", "--tokenizer-config", str(tmp_path / "rae.yaml"), "-t", "bicubic-f8", "--data", str(data),
                          *fast, "--results", str(res)], capsys)
    assert code == 0, err
    df = load(res)
    rae = df[df["tokenizer"] == "rae-official-rae"].set_index("metric")  # named after the YAML
    assert set(df["tokenizer"]) == {"rae-official-rae", "bicubic-f8"}
    assert rae["weights_id"].str.startswith("official:model.pt@").all()
    assert rae.loc["latent-erank", "extra"]["latent_shape"] == m["latent_shape"]


def test_ls_references_loads_no_weights(monkeypatch, capsys):
    from raebench.analysis.references import REFERENCES, ReferenceSpec

    def no_build(*a, **k):
        raise AssertionError("ls must not build a reference")

    monkeypatch.setattr(ReferenceSpec, "build", no_build)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run(["ls", "references"], capsys)
    assert code == 0, err
    for spec in REFERENCES:
        assert spec.name in out and spec.version in out
    assert "--reference-weights dinov2-b=PATH" in out


def _tiny_vit_file(path: Path, seed: int) -> Path:
    """Random weights for the 1-block ViT reference ``test-tiny-vit`` (registered here if needed),
    loaded by the timm + weights.resolve path that serves dinov2-b."""
    import safetensors.torch
    import timm

    from raebench.analysis.references import REFERENCES, ReferenceSpec, register_reference

    arch, tiny = "vit_small_patch16_224.augreg_in21k", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    if "test-tiny-vit" not in REFERENCES:
        register_reference(ReferenceSpec("test-tiny-vit", "1-block ViT, random weights (tests)", "test-tiny-vit-v1",
                                         arch=arch, input_size=32, model_kwargs=tiny))
    torch.manual_seed(seed)
    safetensors.torch.save_file(timm.create_model(arch, pretrained=False, img_size=32, **tiny).state_dict(), str(path))
    return path


def test_other_reference_weights_are_missing_rows(image_folder: Path, tmp_path: Path, capsys):
    """The reference's weights are in the alignment rows' version: other weights are measured again
    (and give the numbers of a fresh run), the same weights under another name are reused."""
    w0, w1 = _tiny_vit_file(tmp_path / "w0.safetensors", 0), _tiny_vit_file(tmp_path / "w1.safetensors", 1)
    base = ["analyze", "-t", "pixels", "--data", str(image_folder), *FAST, "--reference", "test-tiny-vit"]

    def analyze(res: Path, weights: Path):
        code, out, err = run([*base, "--reference-weights", f"test-tiny-vit={weights}", "--results", str(res)], capsys)
        assert code == 0, err
        return err

    res = tmp_path / "res"
    analyze(res, w0)
    first = load(res).set_index("metric")
    before = _runs(res)
    err = analyze(res, w1)
    assert "every row reused" not in err
    new = _new_rows(res, before).set_index("metric")
    assert set(new.index) == {"align-mutual-knn-test-tiny-vit", "align-cknna-test-tiny-vit", "align-cka-test-tiny-vit"}
    assert new.loc["align-cka-test-tiny-vit", "value"] != first.loc["align-cka-test-tiny-vit", "value"]
    assert new.loc["align-cka-test-tiny-vit", "extra"]["reference_weights"] != first.loc["align-cka-test-tiny-vit", "extra"]["reference_weights"]
    analyze(tmp_path / "fresh", w1)
    fresh = load(tmp_path / "fresh").set_index("metric")
    for m in new.index:
        assert new.loc[m, "value"] == fresh.loc[m, "value"] and new.loc[m, "metric_version"] == fresh.loc[m, "metric_version"]
    # a copy of w1 elsewhere is the same weights: nothing is measured
    before = _runs(res)
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(w1.read_bytes())
    assert "every row reused" in " ".join(analyze(res, copy).split()) and _runs(res) == before


def test_every_setting_that_changes_a_value_is_in_its_version():
    """Each setting, changed alone, changes the version of exactly the parts whose values it changes."""
    from dataclasses import replace

    from raebench.analysis.diffusability import ProbeConfig
    from raebench.analysis.config import AnalyzeConfig, metric_versions

    cfg = AnalyzeConfig(tokenizers=("pixels",))
    cases = {
        # the CLI passes the run's seed to the probe's config too
        "seed": (dict(seed=1, probe=ProbeConfig(seed=1)), {"probe", "knn", "mknn", "cknna", "cka", "robust", "interp", "diffuse"}),
        "n_diag": (dict(n_diag=4), {"robust", "interp"}),
        "interp_pairs": (dict(interp_pairs=2), {"interp"}),
        "interp_steps": (dict(interp_steps=3), {"interp"}),
        "knn_k": (dict(knn_k=5), {"knn"}),
        "mutual_k": (dict(mutual_k=5), {"mknn", "cknna"}),
        "align_images": (dict(align_images=64), {"mknn", "cknna", "cka"}),
        "cka_debiased": (dict(cka_debiased=True), {"cka"}),
        "probe_method": (dict(probe_method="ridge"), {"probe"}),
        "probe_batchnorm": (dict(probe_batchnorm=False), {"probe"}),
        "probe_images": (dict(probe_images=64), {"diffuse"}),
        "probe": (dict(probe=ProbeConfig(steps=10)), {"diffuse"}),
        "precision": (dict(precision="bf16"), {"probe", "knn", "mknn", "cknna", "cka", "spectrum", "robust", "interp", "diffuse"}),
    }
    v0 = metric_versions(cfg)
    for name, (change, parts) in cases.items():
        v1 = metric_versions(replace(cfg, **change))
        assert {k for k in v0 if v0[k] != v1[k]} == parts, name


def test_n_diag_change_measures_the_interpolation_again(image_folder: Path, tmp_path: Path, capsys):
    res = tmp_path / "res"
    base = ["analyze", "-t", "bicubic-f8", "--data", str(image_folder), *FAST, "--reference", "none"]
    assert run([*base, "--results", str(res)], capsys)[0] == 0  # FAST: --n-diag 2
    before = _runs(res)
    code, out, err = run([*base, "--n-diag", "6", "--results", str(res)], capsys)
    assert code == 0, err
    new = _new_rows(res, before).set_index("metric")
    assert {"interp-rmse-step-mean", "interp-rmse-path-ratio"} <= set(new.index)
    assert run([*base, "--n-diag", "6", "--results", str(tmp_path / "fresh")], capsys)[0] == 0
    fresh = load(tmp_path / "fresh").set_index("metric")
    assert new.loc["interp-rmse-step-mean", "value"] == fresh.loc["interp-rmse-step-mean", "value"]
    assert "-n6-" in new.loc["interp-rmse-step-mean", "metric_version"]


def test_parts_the_data_cannot_give_are_nan_rows_that_reruns_reuse(tmp_path: Path, capsys):
    """Two classes of one readable image each and two unreadable files: the test split is empty and
    2 valid images are too few for --mutual-k 3. Both parts are NaN rows with a note, and the same
    command again reuses them (before, every re-run encoded everything again)."""
    from PIL import Image

    data = tmp_path / "data"
    for c, v in (("c0", 60), ("c1", 200)):
        (data / c).mkdir(parents=True)
        arr = np.full((40, 40, 3), v, np.uint8)
        arr[::3] = 255 - v
        Image.fromarray(arr).save(data / c / "ok.png")
    (data / "c1" / "broken1.png").write_bytes(b"not an image")
    (data / "c1" / "broken2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = tmp_path / "res"
    cmd = ["analyze", "-t", "pixels", "--data", str(data), *FAST, "--results", str(res)]
    code, out, err = run(cmd, capsys)
    assert code == 0, err
    df = load(res).set_index("metric")
    for m in ("probe-linear-top1", "probe-knn-top1", "align-mutual-knn-random-proj", "align-cknna-random-proj",
              "align-cka-random-proj"):
        assert np.isnan(df.loc[m, "value"]), m
    notes = df.loc["probe-linear-top1", "notes"]
    assert "linear probe and kNN are NaN" in notes and "alignment with random-proj is NaN: 2 valid images" in notes
    before = _runs(res)
    code, out, err = run(cmd, capsys)
    assert code == 0, err
    assert _runs(res) == before and "every row reused" in " ".join(err.split())


def test_constant_images_give_nan_not_perfect_scores(tmp_path: Path, capsys):
    """Identical grey images: every neighbour is a tie (mutual kNN and CKNNA were 1.0) and no σ adds
    noise to latents with std 0 (robustness was 100 dB)."""
    from PIL import Image

    data = tmp_path / "grey"
    for i in range(8):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(data / f"c{i % 2}" / f"{i}.png")
    res = tmp_path / "res"
    code, out, err = run(["analyze", "-t", "pixels", "--data", str(data), *FAST, "--plots", "--results", str(res)], capsys)
    assert code == 0, err
    assert len(list((res / "analysis").glob("*/alignment.png"))) == 1  # every bar NaN: labelled, not a crash
    df = load(res).set_index("metric")
    for m in ("align-mutual-knn-random-proj", "align-cknna-random-proj", "align-cka-random-proj", "probe-knn-top1",
              "robust-psnr-vs-decode-s1", "robust-psnr-vs-image-s1", "robust-rmse-vs-decode-s1"):
        assert np.isnan(df.loc[m, "value"]), m
    assert df.loc["latent-std", "value"] == 0
    notes = df.loc["robust-psnr-vs-decode-s1", "notes"]
    assert "alignment with random-proj is NaN: the latents are the same for every image" in notes
    assert "decoder robustness is NaN: the latents do not vary" in notes and "kNN accuracy is NaN" in notes


def test_sigma_tags_are_exact():
    from raebench.analysis.reuse import sigma_tag

    assert [sigma_tag(s) for s in (0.1, 0.25, 1.0, 2.0, 1e-7)] == ["s0.1", "s0.25", "s1", "s2", "s1e-07"]
    assert sigma_tag(0.1234567) != sigma_tag(0.1234568)
    for s in (0.1234567, 1 / 3, 0.30000000000000004):
        assert float(sigma_tag(s)[1:]) == s


def test_unmeasured_rows_carry_the_images_they_had_not_zero(image_folder: Path, tmp_path: Path, capsys):
    """Alignment with --mutual-k 10 on 8 images is NaN (with a note); its rows used to say n_images 0,
    which made an all-NaN `n=0` leaderboard column; they now say the 8 images the measured rows use."""
    res = tmp_path / "res"
    fast = [a if a != "3" or i == 0 or FAST[i - 1] != "--mutual-k" else "10" for i, a in enumerate(FAST)]
    code, out, err = run(["analyze", "-t", "pixels", "--data", str(image_folder), *fast, "--results", str(res)], capsys)
    assert code == 0, err
    df = load(res)
    align = df[df["metric"].str.startswith("align-")]
    assert len(align) == 3 and align["value"].isna().all() and (align["n_images"] == 8).all()
    assert "needs more than --mutual-k 10" in align["notes"].iloc[0]
    assert set(df["n_images"]) == {8} | set(df[df["metric"].str.startswith(("robust-", "interp-"))]["n_images"])


def test_an_unmeasured_row_says_the_n_of_its_parts_measured_rows(image_folder: Path, tmp_path: Path, capsys):
    """A part that cannot be measured for one tokenizer (e.g. the diffusability probe over its token
    limit) writes NaN rows with the n that the part's measured rows record for another (robust/interp:
    the diagnostic subset, not every image), so the leaderboard keeps one column."""
    from types import SimpleNamespace

    from raebench.analysis.config import AnalyzeConfig
    from raebench.analysis.measure import _part_n
    from raebench.analysis.reuse import part_of

    res = tmp_path / "res"
    fast = list(FAST)
    fast[fast.index("--n-diag") + 1] = "3"
    args = fast  # (the diffusability probe, n = min(--probe-images, n), takes a minute here: not run)
    code, out, err = run(["analyze", "-t", "bicubic-f8", "--data", str(image_folder), *args, "--results", str(res)], capsys)
    assert code == 0, err
    df = load(res)
    cfg = AnalyzeConfig(tokenizers=("bicubic-f8",), n_diag=3, interp_pairs=1, probe_images=5)
    rep = SimpleNamespace(n_align=8)
    seen = {}
    for metric, n in zip(df["metric"], df["n_images"]):
        seen.setdefault(part_of(metric), set()).add(int(n))
    assert {"robust", "interp", "spectrum", "probe", "align:random-proj"} <= set(seen)
    for part, ns in seen.items():
        assert ns == {_part_n(part, cfg, rep, 8)}, part


PLOTTED = [a for a in FAST if a != "--no-plots"]
FIGURES = {"alignment.png", "spectra.png", "robustness.png", "reconstructions.png", "interpolation.png"}


def _figure_dirs(res: Path) -> dict[str, set[str]]:
    return {d.name: {p.name for p in d.glob("*.png")} for d in (res / "analysis").iterdir() if d.name != "probes"}


def test_a_run_killed_while_drawing_has_its_figures_drawn_by_the_rerun(image_folder: Path, tmp_path: Path, capsys,
                                                                      monkeypatch):
    """Killed after every row was stored, with two of the five figures drawn: the same command again
    measures the parts behind the missing figures once more and draws them (its rows, equal to the
    stored ones, make the new folder theirs), and a third run finds everything and does nothing.
    Before, the re-run reused every row and drew nothing, leaving the incomplete folder silently."""
    from raebench.analysis import plots

    res = tmp_path / "res"
    base = ["analyze", "-t", "bicubic-f8", "--data", str(image_folder), *PLOTTED, "--results", str(res)]

    def killed(*a, **k):
        raise KeyboardInterrupt

    def unrendered(fig, path):  # figures are built, not rendered: most of the time (test_analysis_cli renders them)
        plots.atomic_write_bytes(path, b"png")
        return path

    monkeypatch.setattr(plots, "_save", unrendered)
    with monkeypatch.context() as m:
        m.setattr(plots, "plot_alignment", killed)  # drawn third, after robustness.png and spectra.png
        code, _, _ = run(base, capsys)
    assert code != 0
    first = load(res)
    assert set(first["tokenizer"]) == {"bicubic-f8"}
    (killed_dir, drawn), = _figure_dirs(res).items()
    assert drawn == {"robustness.png", "spectra.png"}

    before = _runs(res)
    code, _, err = run(base, capsys)
    assert code == 0, err
    assert "figures" in err and killed_dir in " ".join(err.split())  # it says why it measured again
    dirs = _figure_dirs(res)
    (new_dir,) = set(dirs) - {killed_dir}
    assert dirs[new_dir] == FIGURES
    new = _new_rows(res, before)
    # spectra.png was drawn before the kill: the spectrum rows stay those of the killed run
    assert {part_of(m) for m in new["metric"]} == {"probe", "align:random-proj", "robust", "interp"}
    old = first.set_index(["tokenizer", "metric"])["value"]
    for t, m, v in zip(new["tokenizer"], new["metric"], new["value"]):  # the same images, the same numbers
        assert v == pytest.approx(old[(t, m)], rel=1e-12, nan_ok=True)

    before = _runs(res)
    code, _, err = run(base, capsys)
    assert code == 0, err
    assert _runs(res) == before and "every row reused" in " ".join(err.split())
    assert set(_figure_dirs(res)) == {killed_dir, new_dir}


def test_figures_show_the_stored_probe_and_alignment_values_of_parts_not_measured_again(image_folder: Path,
                                                                                       tmp_path: Path):
    """A re-run that measures only a new σ draws the alignment bars from the stored rows; before, the
    reports of the reused parts were empty and alignment.png labelled every stored value "NaN"."""
    from raebench.analysis.config import AnalyzeConfig
    from raebench.analysis.run import analyze

    common = {"tokenizers": ("pixels", "bicubic-f8"), "data": str(image_folder), "references": ("random-proj",),
              "perceptual": "rmse", "mutual_k": 3, "knn_k": 3, "n_diag": 2, "interp_pairs": 1, "interp_steps": 2,
              "resolution": 32, "device": "cpu", "results_dir": str(tmp_path / "res")}
    first = analyze(AnalyzeConfig(**common, sigmas=(1.0,), plots=False))
    again = analyze(AnalyzeConfig(**common, sigmas=(0.5, 1.0), plots=False))
    assert [r.computed for r in again.reports] == [("robust",), ("robust",)]
    for a, b in zip(first.reports, again.reports):
        assert b.probe == a.probe and b.probe
        assert b.alignment == a.alignment and b.alignment


# ---------------------------------------------------------------------------------------------
# the reuse rules, without a model
# ---------------------------------------------------------------------------------------------


def _cfg(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"n_diag": 4, "sigmas": (0.1,), "interp_pairs": 1, "seed": 0, "diffusability": False, **kw})


_VERSIONS = {k: f"{k}-v1" for k in ("probe", "knn", "mknn", "cknna", "cka", "spectrum", "robust", "interp", "diffuse")}


def _stored(*specs):
    from dataclasses import asdict

    from raebench.results import ResultRow

    rows = []
    for metric, version, kw in specs:
        base = dict(tokenizer="t", weights_id="w", dataset="d", split="all", domain="open-domain", resolution=32,
                    n_images=4, metric=metric, value=1.0, higher_is_better=None, metric_version=version, seed=0,
                    data_fingerprint="fp", run_id="20260101T000000-t")
        rows.append(asdict(ResultRow(**{**base, **kw})))
    return pd.DataFrame(rows)


def test_directions_of_analysis_metrics():
    from raebench.analysis.reuse import higher_is_better

    assert higher_is_better("robust-psnr-vs-decode-s0.1") is True
    assert higher_is_better("robust-lpips-vs-image-s0.1") is False
    assert higher_is_better("interp-rmse-step-mean") is None and higher_is_better("interp-rmse-path-ratio") is False
    assert higher_is_better("probe-knn-top1") is True and higher_is_better("diffuse-latent-fd") is False
    assert higher_is_better("latent-erank") is None


def test_parts_the_listing_rules_out_are_not_expected():
    from raebench.analysis.reuse import expected_rows

    assert "probe" not in expected_rows(_cfg(), _VERSIONS, {}, 1, 4, None, None)  # one class: no probe
    assert "probe" in expected_rows(_cfg(), _VERSIONS, {}, 2, 4, None, None)
    none = expected_rows(_cfg(n_diag=8), _VERSIONS, {}, 2, 0, None, None)  # --n-diag above the images listed
    assert "robust" not in none and "interp" not in none


def test_stored_rows_are_measured_rows_of_this_seed_and_reuse_skips_parts_to_measure():
    from raebench.analysis.reuse import (
        expected_rows,
        missing_parts,
        reusable_rows,
        stored_rows,
    )

    df = _stored(("latent-erank", "spectrum-v1", {}), ("latent-std", "spectrum-v1", {"seed": 1}),
                 ("latent-std", "spectrum-v1", {"source": "reported"}))
    mine = stored_rows(df, "t", "w", "d", "fp", 32, 0)
    assert mine["metric"].tolist() == ["latent-erank"]
    expected = {"spectrum": [("latent-erank", "spectrum-v1")], "probe": [("probe-knn-top1", "knn-v1")]}
    assert missing_parts(expected, mine) == {"probe"}
    assert [r.metric for r in reusable_rows(mine, expected, set())] == ["latent-erank"]
    assert reusable_rows(mine, expected, {"spectrum"}) == []  # measured again: its stored rows are not shown too
    assert set(expected_rows(_cfg(), _VERSIONS, {}, 2, 4, None, None)) >= {"probe", "spectrum", "robust", "interp"}


def test_unmeasured_rows_need_no_figure(tmp_path: Path):
    from raebench.analysis.reuse import undrawn_parts

    expected = {"spectrum": [("latent-erank", "spectrum-v1")]}
    df = _stored(("latent-erank", "spectrum-v1", {"extra": {"unmeasured": True}}))
    assert undrawn_parts(df, expected, set(), "t", tmp_path) == {}
    df = _stored(("latent-erank", "spectrum-v1", {}))
    assert undrawn_parts(df, expected, set(), "t", tmp_path) == {"spectrum": ("20260101T000000", ["spectra.png"])}


def test_without_locks_no_run_is_taken_for_live(tmp_path: Path, monkeypatch):
    import errno
    import fcntl

    from raebench.analysis.reuse import drawing, is_live

    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    with drawing(tmp_path, "stamp"):
        assert is_live(tmp_path, "stamp")
        monkeypatch.setattr(fcntl, "flock", flock)
        monkeypatch.setattr("raebench.locks._warned_unlockable", set())
        assert not is_live(tmp_path, "stamp")  # cannot tell: its parts are checked for figures, as before markers


def test_the_live_marker_is_removed_while_still_held(tmp_path: Path, monkeypatch):
    from raebench.analysis.reuse import _live_marker, drawing

    marker = _live_marker(tmp_path, "stamp")
    seen = lock_state_at_unlink(monkeypatch, marker)
    with drawing(tmp_path, "stamp"):
        pass
    assert seen == ["held"] and not marker.exists()


def test_a_decoder_that_gives_nan_for_noisy_latents_makes_those_parts_nan_with_a_note(image_folder: Path, tmp_path: Path,
                                                                                      capsys, monkeypatch):
    """The robustness and interpolation probes decode latents the pass never saw (noisy, interpolated); a
    decoder that turns them into NaN/Inf gave 8-bit images of whatever the cast made of NaN (0 on this CPU)
    and a robustness PSNR computed from them. Now those parts are NaN rows with a note; the rest is measured."""
    from raebench.tokenizers.reference import PixelTokenizer

    real = PixelTokenizer.decode

    def nan_off_the_pixel_grid(self, z):  # clean images are multiples of 1/255; noisy or mixed ones are not
        x = real(self, z).clone()
        x[((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-2)] = float("nan")
        return x

    monkeypatch.setattr(PixelTokenizer, "decode", nan_off_the_pixel_grid)
    res = tmp_path / "res"
    code, out, err = run(["analyze", "-t", "pixels", "--data", str(image_folder), *FAST, "--results", str(res)], capsys)
    assert code == 0, err
    df = load(res).set_index("metric")
    for m in ("robust-psnr-vs-decode-s1", "robust-psnr-vs-image-s1", "interp-rmse-step-mean"):
        assert np.isnan(df.loc[m, "value"]), m
    notes = df.loc["robust-psnr-vs-decode-s1", "notes"]
    assert "decoder robustness is NaN: the decoder gave NaN/Inf images" in notes
    assert "interpolation is NaN: the decoder gave NaN/Inf images" in notes
    assert np.isfinite(df.loc["align-cka-random-proj", "value"]) and np.isfinite(df.loc["latent-std", "value"])
