"""``raebench analyze`` re-runs compute only missing rows; per-tokenizer weights, official configs
and bf16 enter the rows' identity; ``raebench ls references`` loads nothing."""

import json
from pathlib import Path

import pytest
import torch

from conftest import ORACLE
from raebench.analysis.reuse import part_of
from raebench.results import load
from _cli import run

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


def test_per_tokenizer_weights_are_part_of_the_identity(image_folder: Path, tmp_path: Path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4)
    vae.save_pretrained(tmp_path / "w1")
    vae.save_pretrained(tmp_path / "w2")
    res = tmp_path / "res"
    base = ["analyze", "-t", "sd-vae-ft-ema", "-t", "pixels", "--data", str(image_folder), *FAST, "--results", str(res)]
    code, out, err = run([*base, "--weights", f"sd-vae-ft-ema={tmp_path / 'w1'}"], capsys)
    assert code == 0, err
    df = load(res)
    wid = set(df.loc[df["tokenizer"] == "sd-vae-ft-ema", "weights_id"])
    assert wid == {f"local:{(tmp_path / 'w1').resolve()}"}
    before = _runs(res)
    code, out, err = run([*base, "--weights", f"sd-vae-ft-ema={tmp_path / 'w2'}"], capsys)  # other weights
    assert code == 0, err
    new = _new_rows(res, before)
    assert set(new["tokenizer"]) == {"sd-vae-ft-ema"}  # pixels reused, the VAE measured again
    assert set(new["weights_id"]) == {f"local:{(tmp_path / 'w2').resolve()}"}


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
