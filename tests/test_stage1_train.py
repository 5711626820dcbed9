"""Stage-1 training end to end on CPU with the tiny preset: a random-weight HF encoder saved to a
temporary folder, a tiny decoder, random LPIPS/DINO backbones, eight synthetic images."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raebench.checkpoint import load_state
from raebench.errors import CheckpointError, RaebenchError
from raebench.stage1.config import preset
from raebench.stage1.train import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    root = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    enc = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32,
        num_register_tokens=4,
    ))
    enc.save_pretrained(root / "encoder")
    (root / "encoder" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48] / 48
    for i in range(8):
        img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
                        for _ in range(3)], -1)
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
    return {"root": root, "encoder": str(root / "encoder"), "data": str(root / "images")}


def _cfg(assets, **kw):
    return preset("tiny", encoder=assets["encoder"], data=assets["data"], **kw)


def _log(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_l1_falls_by_a_third(assets, tmp_path):
    cfg = _cfg(assets, epochs=10, lpips_weight=0.0, gan_weight=0.0, lr=3e-3, final_lr=1e-3, sample_every=0)
    out = train(cfg, tmp_path / "run")
    rows = _log(tmp_path / "run")
    assert out["step"] == 20 and len(rows) == 20
    first, last = float(rows[0]["l1"]), np.mean([float(r["l1"]) for r in rows[-3:]])
    assert last <= 0.7 * first, (first, last)


@pytest.mark.parametrize("train_pos_embed", [True, False])
def test_the_decoder_positions_train_as_in_the_official_trainer(assets, tmp_path, train_pos_embed):
    """train_stage1.py calls decoder.requires_grad_(True): the sin-cos positions, created frozen, are
    trained (optimizer and EMA) with the rest of the decoder; train_pos_embed=false keeps them fixed."""
    from raebench.rae.decoder import sincos_pos_embed

    cfg = _cfg(assets, lpips_weight=0.0, gan_weight=0.0, sample_every=0, max_steps=2, train_pos_embed=train_pos_embed)
    train(cfg, tmp_path / "run")
    ck = load_state(tmp_path / "run" / "checkpoints" / "last.pt")
    init = sincos_pos_embed(cfg.decoder_hidden, cfg.grid)[None]
    for which in ("model", "ema"):
        assert torch.equal(ck[which]["decoder_pos_embed"], init) is not train_pos_embed, which
    assert len(ck["opt"]["state"]) == len(ck["model"]) - (not train_pos_embed)  # every parameter is optimised


def test_lpips_and_gan_switch_on_at_their_steps_with_finite_losses(assets, tmp_path):
    # 2 steps/epoch: LPIPS from step 0, discriminator updates from epoch 1 (step 2), GAN from epoch 1.5 (step 3)
    cfg = _cfg(assets, epochs=3, disc_start_epoch=1, gan_start_epoch=1.5, precision="bf16", val_every=6, sample_every=6)
    out = train(cfg, tmp_path / "run")
    rows = _log(tmp_path / "run")
    assert out["step"] == 6 and [int(r["step"]) for r in rows] == list(range(1, 7))
    for r in rows:  # the row of step s describes update s - 1
        s = int(r["step"]) - 1
        assert (r["lpips"] != "") and float(r["lpips"]) > 0
        assert (r["disc_loss"] != "") == (s >= 2)
        assert (r["gan"] != "") == (s >= 3)
        assert (float(r["gan_weight_eff"]) > 0) == (s >= 3)
        for k in ("l1", "lpips", "gan", "adaptive_weight", "total", "disc_loss", "logits_real", "logits_fake"):
            if r[k] != "":
                assert np.isfinite(float(r[k])), (k, r)
    assert float(rows[-1]["adaptive_weight"]) <= 1e4
    assert (tmp_path / "run" / "samples" / "step-0000006.png").is_file()
    val = list(csv.DictReader(open(tmp_path / "run" / "val.csv")))
    assert val and np.isfinite(float(val[-1]["psnr"])) and 0 < float(val[-1]["ssim"]) <= 1


def _resume_cfg(assets, **kw):
    # GAN and discriminator from step 1 so the resumed part covers their states; no LPIPS (stateless, slow)
    return _cfg(assets, epochs=2, lpips_weight=0.0, gan_start_epoch=0.5, disc_start_epoch=0.5, sample_every=0, **kw)


def test_stop_and_resume_reproduces_the_uninterrupted_run(assets, tmp_path):
    train(_resume_cfg(assets), tmp_path / "full")
    part = train(_resume_cfg(assets, max_steps=2), tmp_path / "split")  # "killed" after 2 of 4 steps
    assert part["step"] == 2 and part["decoder"] is None
    assert load_state(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 2
    train(_resume_cfg(assets), tmp_path / "split")  # the same command again: resumes
    a = load_state(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_state(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4 and a["disc_updates"] == b["disc_updates"] == 3
    for key in ("model", "ema", "disc"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for key in ("opt", "disc_opt"):
        for i, st in a[key]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[key]["state"][i][k])), (key, i, k)
    # the saved torch generator too: the loader's iterator drew its base seed from it, once more per resume
    # (found by bench/fuzz_kill_resume.py), so a resumed checkpoint held another state than an uninterrupted one
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    la, lb = _log(tmp_path / "full"), _log(tmp_path / "split")
    assert [r["step"] for r in lb] == ["1", "2", "3", "4"]
    assert [(r["l1"], r["gan"], r["disc_loss"]) for r in la] == [(r["l1"], r["gan"], r["disc_loss"]) for r in lb]
    # a different trajectory in the same run folder is refused in one sentence
    with pytest.raises(RaebenchError, match="other settings"):
        train(_resume_cfg(assets, lr=1e-4), tmp_path / "split")


def test_resume_checks_the_encoders_weights_not_its_path(assets, tmp_path):
    """The same encoder copied elsewhere resumes; other weights in the same folder are refused; a
    second job on the run folder is refused while the first holds it."""
    import shutil

    from transformers import Dinov2WithRegistersModel

    from raebench.locks import OutputLock

    enc = tmp_path / "enc"
    shutil.copytree(assets["encoder"], enc)
    cfg = dataclasses.replace(_cfg(assets, epochs=1, lpips_weight=0.0, sample_every=0, gan_weight=0.0), encoder=str(enc))
    assert train(dataclasses.replace(cfg, max_steps=1), tmp_path / "run")["step"] == 1
    moved = tmp_path / "moved"
    shutil.copytree(enc, moved)
    assert train(dataclasses.replace(cfg, encoder=str(moved), max_steps=2), tmp_path / "run")["step"] == 2
    model = Dinov2WithRegistersModel.from_pretrained(enc)
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight.mul_(1.5)  # retrained, same path and config
    model.save_pretrained(enc)
    with pytest.raises(RaebenchError, match=r"other settings or data \(encoder weights: [0-9a-f]{16} -> [0-9a-f]{16}"):
        train(cfg, tmp_path / "run")
    held = OutputLock(tmp_path / "run", "test job", "wait").acquire()
    try:
        with pytest.raises(RaebenchError, match=r"Another stage-1 training job is writing"):
            train(dataclasses.replace(cfg, encoder=str(moved)), tmp_path / "run")
    finally:
        held.release()


def test_temporaries_of_a_killed_job_are_removed_from_every_run_folder(assets, tmp_path):
    """A job killed inside a sample-grid save or the decoder export left `.NAME.XXXX.tmp` in samples/
    or decoder/ for good (only the run folder and checkpoints/ were swept); the next job removes them."""
    run = tmp_path / "run"
    orphans = [run / "samples" / ".step-0000002.png.k1ll3d_x.tmp", run / "decoder" / ".model.pt.k1ll3d_x.tmp",
               run / "checkpoints" / ".last.pt.k1ll3d_x.tmp", run / ".log.csv.k1ll3d_x.tmp"]
    for p in orphans:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    cfg = _cfg(assets, epochs=1, lpips_weight=0.0, gan_weight=0.0, sample_every=0, max_steps=1)
    assert train(cfg, run)["step"] == 1
    assert [p for p in orphans if p.exists()] == []


def test_torchrun_two_processes_match_one_process(assets, tmp_path):
    common = ["--preset", "tiny", "--data", assets["data"], "--encoder", assets["encoder"], "--epochs", "2",
              "--set", "gan_start_epoch=0.5", "--set", "disc_start_epoch=0.5", "--set", "sample_every=0",
              "--set", "lpips_weight=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "raebench",
           "train", "stage1", *common, "--grad-accum", "1", "--results", str(tmp_path / "two"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`broadcast_buffers` is deprecated" not in proc.stderr, proc.stderr[-3000:]  # torch 2.14's FutureWarning
    # what every rank meets alike is said once, by rank 0 (the random backbone's warning was said by each)
    assert proc.stderr.count("random weights") == 1, proc.stderr[-3000:]
    cfg = _resume_cfg(assets, grad_accum=2)  # the same global batch of 4 as 2 micro-batches in one process
    train(cfg, tmp_path / "one")
    a = load_state(tmp_path / "one" / "checkpoints" / "last.pt")
    b = load_state(tmp_path / "two" / "stage1" / "tiny" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for k, v in a[key].items():
            torch.testing.assert_close(b[key][k], v, rtol=1e-4, atol=1e-5, msg=f"{key}.{k}")
    # the discriminator is compared as a function: the biases of convolutions followed by a
    # normalisation get only rounding-noise gradients, which Adam amplifies, but they cancel out
    from raebench.stage1.discriminator import build_discriminator

    x = torch.rand(4, 3, 32, 32) * 2 - 1
    logits = []
    for ck in (a, b):
        d = build_discriminator(cfg).eval()
        d.heads.load_state_dict(ck["disc"])
        with torch.no_grad():
            logits.append(d(x))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    la, lb = _log(tmp_path / "one"), _log(tmp_path / "two" / "stage1" / "tiny")
    for ra, rb in zip(la, lb):
        for k in ("l1", "gan", "disc_loss"):
            if ra[k] != "":
                assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4, abs=1e-6), (k, ra["step"])


def test_exported_decoder_loads_strictly_and_serves_as_the_rae_tokenizer(assets, tmp_path):
    from typer.testing import CliRunner

    from raebench.cli import app
    from raebench.rae.decoder import build_decoder, official_config
    from raebench.rae.stats import LatentStats
    from raebench.tokenizers.rae import RAERelease, build_rae

    run = tmp_path / "stage1" / "tiny"
    res = CliRunner().invoke(app, ["train", "stage1", "--preset", "tiny", "--data", assets["data"], "--encoder",
                                   assets["encoder"], "--epochs", "1", "--set", "lpips_weight=0", "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    dec_dir = run / "decoder"  # written at the end of training (EMA weights)
    res = CliRunner().invoke(app, ["export-decoder", str(run), "--out", str(tmp_path / "model_dec"), "--weights", "model"])
    assert res.exit_code == 0, res.output
    ck = load_state(run / "checkpoints" / "last.pt")
    for d, which in ((dec_dir, "ema"), (tmp_path / "model_dec", "model")):
        assert {p.name for p in d.iterdir()} >= {"model.pt", "model.safetensors", "config.json"}
        sd = torch.load(d / "model.pt", map_location="cpu", weights_only=True)  # a plain state dict, official keys
        assert set(sd) == set(ck[which]) and "decoder_layers.0.attention.attention.query.weight" in sd
        cfg = official_config(d, latent_dim=32, patch_size=8, grid_size=4)
        for f in ("model.pt", "model.safetensors"):
            dec = build_decoder(cfg, d / f)  # strict
            assert all(torch.equal(dec.state_dict()[k], v) for k, v in ck[which].items())
    bad = dict(ck["ema"])
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected"):
        build_decoder(official_config(dec_dir, latent_dim=32, patch_size=8, grid_size=4), bad)

    # the tokenizer builder behind `raebench eval --tokenizer rae-... --decoder DIR`, on the tiny encoder
    LatentStats(torch.zeros(32, 4, 4), torch.ones(32, 4, 4)).save(tmp_path / "stat.pt")
    release = RAERelease("tiny-test", "", "local/tiny-encoder", 32, 8, 32, "unused/model.pt", "unused/stat.pt", decoder_patch=8)
    tok = build_rae(release, decoder=str(dec_dir / "model.pt"), stats=str(tmp_path / "stat.pt"), encoder=assets["encoder"]).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours = build_decoder(official_config(dec_dir, latent_dim=32, patch_size=8, grid_size=4), ck["ema"])(tok.encode_features(x))
        ours = ours * tok.encoder.std + tok.encoder.mean
        torch.testing.assert_close(tok.decode(tok.encode(x)), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["decoder", "discriminator"])
def test_a_non_finite_gradient_stops_before_the_parameters_change(assets, tmp_path, monkeypatch, which):
    """One Inf gradient in a later step, with finite losses (the loss check alone would pass it): the run
    stops at that step and the checkpoint keeps the last good, finite state."""
    import raebench.stage1.discriminator as s1d
    import raebench.stage1.train as s1
    from raebench.checkpoint import load_state
    from raebench.errors import RaebenchError

    def poison_third_backward(module):  # 2 micro-batches a step: the third is in the module's second update
        p = next(q for q in module.parameters() if q.requires_grad)
        calls = {"n": 0}

        def hook(g):
            calls["n"] += 1
            return torch.full_like(g, float("inf")) if calls["n"] == 3 else g
        p.register_hook(hook)
        return module

    if which == "decoder":
        real = s1.build_trainable_rae
        monkeypatch.setattr(s1, "build_trainable_rae", lambda cfg: (lambda tok: (poison_third_backward(tok.decoder), tok)[1])(real(cfg)))
        cfg = _cfg(assets, lpips_weight=0.0, gan_weight=0.0, sample_every=0, ckpt_every=1, max_steps=4)
    else:
        real = s1d.build_discriminator
        monkeypatch.setattr(s1d, "build_discriminator", lambda cfg: (lambda d: (poison_third_backward(d.heads), d)[1])(real(cfg)))
        cfg = _resume_cfg(assets, ckpt_every=1)
    run = tmp_path / "run"
    with pytest.raises(RaebenchError, match=f"the {which} gradients became non-finite") as e:
        train(cfg, run)
    stopped = int(str(e.value).split("step ")[1].split(":")[0])
    ck = load_state(run / "checkpoints" / "last.pt")
    assert ck["step"] == stopped - 1
    for part in ("model", "ema", "disc"):
        assert all(torch.isfinite(v).all() for v in ck.get(part, {}).values() if v.is_floating_point()), part


def test_resuming_on_other_images_is_refused(assets, tmp_path):
    import shutil

    from raebench.errors import RaebenchError

    data = tmp_path / "images"
    shutil.copytree(assets["data"], data)
    cfg = preset("tiny", encoder=assets["encoder"], data=str(data), lpips_weight=0.0, gan_weight=0.0, sample_every=0,
                 max_steps=1)
    train(cfg, tmp_path / "run")
    shutil.copy(data / "0.png", data / "extra.png")  # the same folder, one image more
    with pytest.raises(RaebenchError, match=r"other settings or data \(data fingerprint: .*data n: 8 -> 9"):
        train(dataclasses.replace(cfg, max_steps=2), tmp_path / "run")
    (data / "extra.png").unlink()
    assert train(dataclasses.replace(cfg, max_steps=2), tmp_path / "run")["step"] == 2  # the same images: resumes


def test_discriminator_inputs_and_passes_follow_the_official_trainer(assets, tmp_path, monkeypatch):
    """The decoder's GAN term scores the raw reconstruction (not clamped, not on the 8-bit grid); the
    discriminator update scores clamped 8-bit fakes, then reals, in two train-mode forwards."""
    import raebench.stage1.discriminator as dmod

    calls = []
    real_build = dmod.build_discriminator

    def build(cfg):
        disc = real_build(cfg)
        inner = disc.forward

        def forward(x):
            calls.append((disc.training, x.detach().clone()))
            return inner(x)
        disc.forward = forward
        return disc
    monkeypatch.setattr(dmod, "build_discriminator", build)
    cfg = _resume_cfg(assets, diffaug_translation=0.0, diffaug_color=False, grad_accum=1, max_steps=2)  # GAN at step 2
    train(cfg, tmp_path / "run")
    on_grid = lambda x: torch.allclose(torch.round((x + 1) * 127.5) / 127.5 - 1, x, atol=1e-6)  # noqa: E731
    gen = [x for training, x in calls if not training]
    disc_passes = [(training, x) for training, x in calls if training]
    assert gen and not any(on_grid(x) for x in gen)  # raw reconstructions
    assert len(disc_passes) % 2 == 0 and disc_passes
    fakes, reals = disc_passes[0::2], disc_passes[1::2]
    assert all(on_grid(x) and x.abs().max() <= 1 for _, x in fakes)  # clamped, quantised fakes first
    assert all(x.shape == f.shape for (_, x), (_, f) in zip(reals, fakes))


def test_every_missing_weight_is_named_in_one_error(assets, tmp_path, monkeypatch):
    """Encoder, LPIPS backbone and discriminator backbone missing together: one error names all three
    (a user fetching one file per attempt would otherwise start the run three times)."""
    import huggingface_hub.constants as hc

    from raebench.errors import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = preset("tiny", encoder="facebook/dinov2-with-registers-base", data=assets["data"], lpips_weights=None,
                 disc_weights=None, disc_backbone="vit_small_patch8_224.dino")
    with pytest.raises(MissingWeightsError) as e:
        train(cfg, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("3 weights are missing:"), msg
    for needle in ("facebook/dinov2-with-registers-base", "timm/vgg16.tv_in1k", "timm/vit_small_patch8_224.dino"):
        assert needle in msg
    # one missing: its own sentence, as before
    with pytest.raises(MissingWeightsError) as e:
        train(dataclasses.replace(cfg, encoder=assets["encoder"], lpips_weights="random"), tmp_path / "run")
    assert "timm/vit_small_patch8_224.dino" in str(e.value) and "\n" not in str(e.value)
