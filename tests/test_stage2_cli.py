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
    assert '"num_workers": 2' in run(args + ["--num-workers", "2", "--dry-run"])  # tiny's own default is 0
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
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the run's tokenizer by another of its names is the same one
        stage2_cmds._check_decoder(PixelTokenizer(), "rae-dinov2-b", "rae-dinov2", (3, 4, 4))
    assert "decoding with" not in caplog.text

    class FourChannels(PixelTokenizer):
        def decode(self, z):
            return z.view(z.shape[0], 4, *z.shape[2:])[:, :3]

    with pytest.raises(RaebenchError, match=r"--tokenizer vae cannot decode the model's latents of shape \(3, 4, 4\) "
                                            r"\(trained on pixels\): RuntimeError"):
        stage2_cmds._check_decoder(FourChannels(), "vae", "pixels", (3, 4, 4))
    # a decoder that takes the latents but gives no RGB image (pixels on 32-channel latents) is refused too
    with pytest.raises(RaebenchError, match=r"--tokenizer pixels turns the model's latents of shape \(32, 2, 2\) "
                                            r"into \(32, 2, 2\), not RGB images \(trained on rae-dinov2-b\)"):
        stage2_cmds._check_decoder(PixelTokenizer(), "pixels", "rae-dinov2-b", (32, 2, 2))


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
def test_missing_tokenizer_weights_name_the_local_copy_option(tmp_path, image_folder, monkeypatch, capsys, tokenizer):
    """cache-latents, train stage2 --tokenizer and sample take --weights as eval does: their
    missing-weights sentence names it, as eval's does."""
    import huggingface_hub.constants as hc
    from _cli import run as run_main

    ck = _pixels_run(tmp_path, image_folder)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv in [
        ["cache-latents", "-t", tokenizer, "--data", str(image_folder), "-o", str(tmp_path / "cache2")],
        ["train", "stage2", "-p", "tiny", "-t", tokenizer, "-r", "256", "--data", str(image_folder),
         "-o", str(tmp_path / "run2")],
        ["sample", "-c", str(ck), "-t", tokenizer, "-n", "2", "-o", str(tmp_path / "s.npz")],
        ["eval", "-t", tokenizer, "--results", str(tmp_path / "res")],
    ]:
        code, _, err = run_main(argv + ["--device", "cpu"], capsys)
        msg = " ".join(err.split())
        assert code == 2 and "Traceback" not in err, err
        assert "pass a local copy with --weights" in msg and "has no --weights option" not in msg, (argv[0], msg)
        assert str(tmp_path / "hub") in msg


def _pixels_run(tmp_path, image_folder):
    """A tiny stage-2 run on 'pixels' latents (3x4x4): its checkpoint."""
    run(["cache-latents", "-t", "pixels", "--data", str(image_folder), "-o", str(tmp_path / "pcache"), "-r", "4",
         "--device", "cpu"])
    run(["train", "stage2", "-p", "tiny", "--latents", str(tmp_path / "pcache"), "-o", str(tmp_path / "prun"),
         "--num-classes", "2", "-b", "4", "--max-steps", "1", "--device", "cpu"])
    return tmp_path / "prun" / "checkpoints" / "last.pt"


@pytest.fixture
def tiny_rae(tmp_path, monkeypatch):
    """rae-dinov2-b shrunk to 32 px (a 2x2 grid of 32 channels, tiny random encoder and decoder) with an
    empty Hugging Face cache offline, so only a --weights folder can supply it. Returns
    ``make(folder, seed)``, which writes the release's files in --weights layout (a new decoder per seed)."""
    import dataclasses
    import json

    import huggingface_hub.constants as hc
    import torch
    import transformers as T

    from raebench.rae import decoder as dec
    from raebench.rae.decoder import RAEDecoder, preset_config
    from raebench.tokenizers import rae

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = dataclasses.replace(rae.RELEASES["rae-dinov2-b"], decoder_preset="TINY", resolution=32)
    monkeypatch.setitem(rae.RELEASES, "rae-dinov2-b", r)
    monkeypatch.setitem(dec.DECODER_PRESETS, "TINY", dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64))

    def make(folder, seed=0):
        torch.manual_seed(0)  # the same encoder in every folder
        enc = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=14, num_register_tokens=4))
        enc.save_pretrained(folder / r.encoder_repo)
        (folder / r.encoder_repo / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
        torch.manual_seed(seed)
        for rel, obj in ((r.decoder_file, RAEDecoder(preset_config("TINY", latent_dim=32, grid_size=2)).state_dict()),
                         (r.stats_file, {"mean": torch.zeros(32, 2, 2), "var": torch.ones(32, 2, 2)})):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, folder / rel)
        return folder

    return make


def test_local_weights_are_used_and_recorded_from_cache_to_samples(tmp_path, image_folder, tiny_rae, capsys):
    """--weights DIR serves cache-latents, train stage2 --tokenizer and sample (nothing is in the Hugging
    Face cache); the weights' identity goes into the cache's meta.json, from there into the checkpoint
    (and from on-the-fly encoding too), and sample warns when it decodes with other weights."""
    import json
    import shutil

    import torch
    from _cli import run as run_main

    w = tiny_rae(tmp_path / "w")
    cache = tmp_path / "cache"
    run(["cache-latents", "-t", "rae-dinov2-b", "--weights", str(w), "--data", str(image_folder), "-o", str(cache),
         "-r", "32", "-b", "4", "--device", "cpu"])
    wid = json.loads((cache / "meta.json").read_text())["tokenizer_weights"]
    assert wid.startswith("local:model.pt@") and "+enc:" in wid and "+stats:" in wid
    moved = shutil.copytree(w, tmp_path / "elsewhere")  # identity is content, not path
    common = ["--num-classes", "2", "-b", "4", "--max-steps", "1", "--device", "cpu"]
    run(["train", "stage2", "-p", "tiny", "--latents", str(cache), "-o", str(tmp_path / "run")] + common)
    run(["train", "stage2", "-p", "tiny", "-t", "rae-dinov2-b", "--weights", str(moved), "--data", str(image_folder),
         "-r", "32", "-o", str(tmp_path / "fly")] + common)
    for r in ("run", "fly"):
        ck = torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)
        assert ck["data"]["tokenizer_weights"] == wid, r
        assert json.loads((tmp_path / r / "config.json").read_text())["data_identity"]["tokenizer_weights"] == wid
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    sample = ["sample", "-c", str(ck), "-n", "2", "--steps", "2", "-b", "2", "--device", "cpu"]
    code, _, err = run_main(sample + ["--weights", str(moved), "-o", str(tmp_path / "a.npz")], capsys)
    assert code == 0 and "other weights" not in err, err
    assert json.loads(str(np.load(tmp_path / "a.npz")["raebench_settings"]))["tokenizer_weights"] == wid
    other = tiny_rae(tmp_path / "w2", seed=1)  # another decoder
    code, _, err = run_main(sample + ["--weights", str(other), "-o", str(tmp_path / "b.npz")], capsys)
    msg = " ".join(err.split())
    assert code == 0 and "the samples decode latents with other weights than they were trained on" in msg, err
    assert wid in msg
    # nothing in the cache and no --weights: one sentence naming the option
    code, _, err = run_main(sample + ["-o", str(tmp_path / "c.npz")], capsys)
    assert code == 2 and "pass a local copy with --weights" in " ".join(err.split()), err
    # a resumed run may find its weights in another folder of the same content, not other weights
    fly = ["train", "stage2", "-p", "tiny", "-t", "rae-dinov2-b", "--data", str(image_folder), "-r", "32",
           "-o", str(tmp_path / "fly"), "--num-classes", "2", "-b", "4", "--max-steps", "2", "--device", "cpu"]
    code, _, err = run_main(fly + ["--weights", str(other)], capsys)
    assert code == 2 and "data tokenizer_weights" in " ".join(err.split()), err
    run(fly + ["--weights", str(w)])
    assert torch.load(tmp_path / "fly" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_local_weights_options_are_refused_where_they_do_nothing(tmp_path):
    for argv, words in [
        (["train", "stage2", "--latents", str(tmp_path), "--weights", str(tmp_path)], "--weights would be ignored"),
        (["train", "stage2", "--decoder", str(tmp_path), "--data", str(tmp_path)], "add --tokenizer NAME"),
        (["sample", "--config", str(tmp_path / "x.yaml"), "--weights", str(tmp_path), "-o", str(tmp_path / "s.npz")],
         "--weights go with --checkpoint"),
    ]:
        res = CliRunner().invoke(cli.app, argv)
        assert res.exit_code != 0 and words in " ".join(str(res.exception).split()), (argv, res.exception)


def test_old_caches_and_checkpoints_without_weights_identity_still_work(tmp_path, image_folder):
    """A cache and a run of an older raebench record no tokenizer_weights: the cache is kept as it is (not
    refused as one of other settings), a run resumes on it, and sample decodes from it."""
    import json

    import torch

    cache = tmp_path / "cache"
    run(["cache-latents", "-t", "pixels", "--data", str(image_folder), "-o", str(cache), "-r", "4", "--device", "cpu"])
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["tokenizer_weights"] == "none"
    del meta["tokenizer_weights"]  # as an older raebench wrote it
    (cache / "meta.json").write_text(json.dumps(meta))
    run(["cache-latents", "-t", "pixels", "--data", str(image_folder), "-o", str(cache), "-r", "4", "--device", "cpu"])
    assert "tokenizer_weights" not in json.loads((cache / "meta.json").read_text())  # kept, not encoded again
    args = ["train", "stage2", "-p", "tiny", "--latents", str(cache), "-o", str(tmp_path / "run"), "--num-classes", "2",
            "-b", "4", "--device", "cpu"]
    run(args + ["--max-steps", "1"])
    ck_path = tmp_path / "run" / "checkpoints" / "last.pt"
    assert "tokenizer_weights" not in torch.load(ck_path, weights_only=True)["data"]
    # the cache now records its weights (rebuilt by this raebench) but the run does not: it resumes, still unrecorded
    meta["tokenizer_weights"] = "none"
    (cache / "meta.json").write_text(json.dumps(meta))
    run(args + ["--max-steps", "2"])
    ck = torch.load(ck_path, weights_only=True)
    assert ck["step"] == 2 and "tokenizer_weights" not in ck["data"]
    run(["sample", "-c", str(ck_path), "-n", "2", "--steps", "2", "-b", "2", "-o", str(tmp_path / "s.npz"),
         "--device", "cpu"])


def test_sample_compares_the_decoders_weights_with_the_runs(caplog):
    """Other weights of the run's tokenizer (named by an alias too): a warning; the same: nothing; a run
    that records none: one line of note; another tokenizer: left to _check_decoder."""
    import logging

    with caplog.at_level(logging.INFO):
        stage2_cmds._check_decoder_weights(_Tok("pixels", "none"), "pixels", None)
        stage2_cmds._check_decoder_weights(_Tok("pixels", "none"), "pixels", "none")
        stage2_cmds._check_decoder_weights(_Tok("rae-dinov2-b", "local:a"), "rae-dinov2", "local:b")
        stage2_cmds._check_decoder_weights(_Tok("bicubic-f8", "none"), "pixels", "other")
    notes = [r for r in caplog.records if r.name == stage2_cmds.log.name]
    assert len(notes) == 2 and notes[0].levelno == logging.INFO
    assert "does not record which weights of pixels encoded its latents" in notes[0].message
    assert notes[1].levelno == logging.WARNING and "decoding with rae-dinov2-b weights local:a" in notes[1].message
    assert "trained on latents encoded with local:b" in notes[1].message


class _Tok:
    def __init__(self, name, weights_id):
        self.name, self.weights_id = name, weights_id


def test_local_weights_are_compared_by_content_not_by_their_file_name(tmp_path, image_folder):
    """A local weights identity carries the file's (or diffusers folder's) name as a readable label:
    a renamed --decoder file of the same content is the same weights for a cache, a resumed run and
    sample; other content is not."""
    import pytest as _pt
    import torch

    from raebench.errors import DataError
    from raebench.stage2.latents import cache_latents, same_weights
    from raebench.stage2.train import compare_data

    a = "local:mydec.pt@c7e3066b6b9c+enc:4aaba2c68c32+stats:33c55aeb9909"
    renamed = "local:renamed.pt@c7e3066b6b9c+enc:4aaba2c68c32+stats:33c55aeb9909"
    other = "local:mydec.pt@31e96cfa6543+enc:4aaba2c68c32+stats:33c55aeb9909"
    assert same_weights(a, renamed) and not same_weights(a, other)
    assert same_weights("diffusers:RAE-a@0123456789ab", "diffusers:RAE b@0123456789ab")
    assert not same_weights("diffusers:x@0123456789ab", "local:x@0123456789ab")
    assert not same_weights("nyu-visionx/RAE-collections:decoders/a/model.pt", "nyu-visionx/RAE-collections:decoders/b/model.pt")
    assert not same_weights(a, None) and same_weights(None, None)
    assert compare_data({"n": 1, "tokenizer_weights": a}, {"n": 1, "tokenizer_weights": renamed}) == []
    assert compare_data({"n": 1, "tokenizer_weights": a}, {"n": 1, "tokenizer_weights": other})

    class Pool(torch.nn.Module):
        name = "pool"

        def __init__(self, weights_id):
            super().__init__()
            self.weights_id = weights_id

        def encode(self, x):
            return torch.nn.functional.avg_pool2d(x, 8)

    out = cache_latents(Pool(a), str(image_folder), tmp_path / "lat", resolution=16, batch_size=8)
    before = (out / "meta.json").read_text()
    cache_latents(Pool(renamed), str(image_folder), out, resolution=16, batch_size=8)  # kept as it is
    assert (out / "meta.json").read_text() == before
    with _pt.raises(DataError, match="tokenizer_weights"):
        cache_latents(Pool(other), str(image_folder), out, resolution=16, batch_size=8)


def test_sample_says_its_notes_on_the_main_rank_only(caplog, monkeypatch):
    """Under torchrun every rank runs the checks: the note and the warnings are said once, by rank 0."""
    import logging

    from raebench import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with caplog.at_level(logging.INFO):
        stage2_cmds._check_decoder_weights(_Tok("pixels", "none"), "pixels", None)
        stage2_cmds._check_decoder_weights(_Tok("pixels", "local:a@0123456789ab"), "pixels", "none")
        stage2_cmds._check_decoder(_PixelsTok(), "bicubic-f8", "pixels", (3, 4, 4))
    assert not [r for r in caplog.records if r.name == stage2_cmds.log.name]


def _PixelsTok():
    from raebench.tokenizers.reference import PixelTokenizer

    return PixelTokenizer()


def test_stage2_commands_build_the_tokenizer_at_their_resolution(tmp_path, image_folder, capsys):
    """cache-latents and train stage2 --tokenizer build the tokenizer at --resolution, as eval does: a
    size the tokenizer cannot encode is one sentence before any image is read (it was a ValueError
    traceback from the first batch); pixels take any size."""
    from _cli import run as run_main

    for argv, tries in ((["cache-latents", "-t", "bicubic-f8", "-r", "4", "-o", str(tmp_path / "c")], "(try 8)."),
                        (["train", "stage2", "-p", "tiny", "-t", "bicubic-f8", "-r", "12", "-o", str(tmp_path / "r")],
                         "(try 8 or 16).")):
        code, _, err = run_main(argv + ["--data", str(image_folder), "--device", "cpu"], capsys)
        msg = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and "bicubic-f8 needs a resolution divisible by 8" in msg, msg
        assert tries in msg, msg
    code, _, err = run_main(["cache-latents", "-t", "pixels", "-r", "4", "-o", str(tmp_path / "p"), "--data",
                             str(image_folder), "--device", "cpu"], capsys)
    assert code == 0, err


def test_sample_refuses_a_grid_name_pillow_cannot_write_before_sampling(tmp_path, capsys):
    """--grid without .png was a Pillow traceback ("unknown file extension") after all the sampling."""
    from _cli import run as run_main

    code, _, err = run_main(["sample", "-c", str(tmp_path / "no-run"), "-n", "2", "-o", str(tmp_path / "s.npz"),
                             "--grid", str(tmp_path / "grid"), "--device", "cpu"], capsys)
    msg = " ".join(err.split())
    assert code == 2 and "--grid" in msg and "must end in .png" in msg and "Traceback" not in err, err
