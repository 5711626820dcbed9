"""CLI: cache-latents -> train stage2 -> sample, on 4x4 'pixels' latents (seconds on CPU)."""

import numpy as np
import pytest
from typer.testing import CliRunner

import raebench.cli as cli
from raebench.cli import stage2_cmds

pytestmark = pytest.mark.usefixtures("one_thread")


if "stage2_cmds" not in cli.MODULES:  # until the lead lists the module
    stage2_cmds.register(cli.app)


def run(args):
    res = CliRunner().invoke(cli.app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_cache_train_sample(tmp_path, image_folder):
    cache = tmp_path / "cache"
    run(["cache-latents", "-t", "pixels", "--data", str(image_folder), "-o", str(cache), "-r", "4", "-b", "4",
         "--device", "cpu"])
    assert (cache / "meta.json").is_file()
    args = ["train", "stage2", "-p", "tiny", "--latents", str(cache), "-o", str(tmp_path / "run"), "--num-classes", "2",
            "-b", "4", "--epochs", "1", "--device", "cpu"]
    assert '"global_batch": 4' in run(args + ["--dry-run"])
    run(args)
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    assert ck.is_file()
    run(["sample", "-c", str(ck), "-n", "6", "--steps", "3", "--cfg-scale", "2", "--cfg-interval", "0.1,1.0",
         "-b", "4", "-o", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "g.png"), "--device", "cpu"])
    s = np.load(tmp_path / "s.npz")
    assert s["arr_0"].shape == (6, 4, 4, 3) and s["arr_0"].dtype == np.uint8
    # score copies the sampling settings into its rows: a gFID row says how its samples were made
    from raebench.metrics.scoring import score

    out = score(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), ("psnr",), device="cpu", write=False)
    made = out.rows[0].extra["sampling"]
    assert (made["steps"], made["cfg_scale"], made["cfg_interval"], made["n"]) == (3, 2.0, [0.1, 1.0], 6)
    assert made["method"] == "euler" and made["tokenizer"] == "pixels" and made["tokenizer_weights"] == "none"
    from raebench.metrics.extractors import fingerprint_path

    assert made["source"] == f"last.pt@{fingerprint_path(ck)}"  # content, not a modification time
    assert sorted(s["arr_1"].tolist()) == [0, 0, 0, 1, 1, 1] and "tf32" not in made
    run(["sample", "-c", str(ck), "-n", "2", "--steps", "2", "-b", "2", "-o", str(tmp_path / "t.npz"), "--tf32",
         "--device", "cpu"])
    import json

    assert json.loads(str(np.load(tmp_path / "t.npz")["raebench_settings"]))["tf32"] is True


def test_sample_checks_a_tokenizer_other_than_the_runs(caplog):
    """Another decoder that reads the model's latents is allowed, with a warning; one that cannot is one
    sentence before any sampling."""
    import logging

    from raebench.errors import RaebenchError
    from raebench.tokenizers.reference import PixelTokenizer

    with caplog.at_level(logging.WARNING):
        stage2_cmds._check_decoder(PixelTokenizer(), "bicubic-f8", "pixels", (3, 4, 4))
    assert "decoding with bicubic-f8, but the model was trained on latents of pixels" in caplog.text

    class FourChannels(PixelTokenizer):
        def decode(self, z):
            return z.view(z.shape[0], 4, *z.shape[2:])[:, :3]

    with pytest.raises(RaebenchError, match=r"--tokenizer vae cannot decode the model's latents of shape \(3, 4, 4\) "
                                            r"\(trained on pixels\): RuntimeError"):
        stage2_cmds._check_decoder(FourChannels(), "vae", "pixels", (3, 4, 4))


def test_sample_from_official_yaml(tmp_path):
    """`raebench sample --config official.yaml`: the official model and decoder, ADM npz out."""
    from test_stage2_official import ORACLE, official_yaml

    if not (ORACLE / "ditdh_ema.pt").exists():
        pytest.skip("oracle fixtures not present")
    official_yaml(tmp_path)
    run(["sample", "--config", str(tmp_path / "official.yaml"), "-n", "4", "--num-classes", "10", "-b", "2",
         "-o", str(tmp_path / "s.npz"), "--device", "cpu"])
    s = np.load(tmp_path / "s.npz")
    assert s["arr_0"].shape == (4, 64, 64, 3) and s["arr_0"].dtype == np.uint8
    import json

    made = json.loads(str(s["raebench_settings"]))  # the YAML's sampler as resolved, and the weights behind it
    assert (made["method"], made["steps"], made["cfg_scale"], made["cfg_interval"]) == ("euler", 12, 1.0, [0.0, 1.0])
    assert made["model"].startswith("stage2_model.pt@") and made["tokenizer"].startswith("official:model.pt@")
    # --quantize truncate: the official sample_ddp.py's uint8 conversion of the same decoded samples
    run(["sample", "--config", str(tmp_path / "official.yaml"), "-n", "4", "--num-classes", "10", "-b", "2",
         "-o", str(tmp_path / "t.npz"), "--device", "cpu", "--quantize", "truncate"])
    diff = s["arr_0"].astype(int) - np.load(tmp_path / "t.npz")["arr_0"].astype(int)
    assert set(np.unique(diff)) <= {0, 1} and diff.any()
    res = CliRunner().invoke(cli.app, ["sample", "--config", str(tmp_path / "official.yaml"), "-n", "4",
                                       "-o", str(tmp_path / "x.npz"), "--quantize", "nearest"])
    assert res.exit_code != 0 and "--quantize takes round or truncate" in str(res.exception)


@pytest.mark.parametrize("tokenizer", ["sd-vae-ft-ema", "rae-dinov2-b"])
def test_missing_tokenizer_weights_name_no_flag_these_commands_lack(tmp_path, image_folder, monkeypatch, capsys,
                                                                    tokenizer):
    """cache-latents and train stage2 --tokenizer take no --weights: their missing-weights sentence must
    not tell the user to pass one (eval, which has the flag, still offers it)."""
    import huggingface_hub.constants as hc
    from _cli import run as run_main

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command, argv in [
        ("raebench cache-latents", ["cache-latents", "-t", tokenizer, "--data", str(image_folder),
                                    "-o", str(tmp_path / "cache"), "--device", "cpu"]),
        ("raebench train stage2", ["train", "stage2", "-p", "tiny", "-t", tokenizer, "--data", str(image_folder),
                                   "-o", str(tmp_path / "run"), "--device", "cpu"]),
    ]:
        code, _, err = run_main(argv, capsys)
        assert code == 2 and "Traceback" not in err, err
        msg = " ".join(err.split())
        assert "pass a local copy" not in msg and f"`{command}` has no --weights option" in msg, msg
        assert str(tmp_path / "hub") in msg
    code, _, err = run_main(["eval", "-t", tokenizer, "--results", str(tmp_path / "res"), "--device", "cpu"], capsys)
    assert code == 2 and "pass a local copy with --weights" in " ".join(err.split()), err
