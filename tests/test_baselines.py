"""Baselines: diffusers VAE adapters, LDM conversion, baseline cards, compare/leaderboard.

Every adapter is checked with a tiny random-weight model of its own diffusers class, saved with
``save_pretrained`` and loaded through the same code that loads the hub id (``build_tokenizer``);
its latents and images must equal diffusers called directly with the published normalisation
(and, for FLUX.2, with diffusers' own Flux2Pipeline patchify helpers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from raebench.baselines import CardError, load_cards, parse_card, reported_frame, reported_rows
from raebench.errors import CheckpointError, DataError
from raebench.export import render
from raebench.leaderboard import compare_table, domain_gap, pivot
from raebench.results import ResultRow
from raebench.tokenizers import TOKENIZERS, build_tokenizer
from raebench.tokenizers.ldm_vae import convert_ldm_vae_state_dict, ldm_vae_config
from raebench.tokenizers.vae_presets import PRESETS, get_preset
from _cli import run as _run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")


D2, U2 = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
REPO = Path(__file__).resolve().parents[1]


def _kl(latent: int = 4, **cfg):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=D2, up_block_types=U2,
                                   layers_per_block=1, latent_channels=latent, **cfg)


def _tiny(preset):
    """A random-weight model of the preset's class with the preset's latent channel count and the
    normalisation entries its released config.json holds (scaling/shift factor or latents_mean/std)."""
    c = preset.latent_channels // 4 if preset.kind == "kl-flux2" else preset.latent_channels
    if preset.kind == "kl":
        if preset.norm == "config-stats":
            g = torch.Generator().manual_seed(1)
            extra = dict(latents_mean=torch.randn(c, generator=g).tolist(), latents_std=(torch.rand(c, generator=g) + 0.5).tolist())
        else:
            extra = dict(scaling_factor=preset.scale, shift_factor=preset.shift or None)
            if c == 16:  # SD3.5 and FLUX.1 have no quant convs
                extra.update(use_quant_conv=False, use_post_quant_conv=False)
        return _kl(c, **extra)
    if preset.kind == "kl-flux2":
        torch.manual_seed(0)
        m = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 64), down_block_types=D2, up_block_types=U2,
                                         layers_per_block=1, latent_channels=c)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as trained weights have
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2.0)
        return m
    if preset.kind == "dc":
        torch.manual_seed(0)
        return diffusers.AutoencoderDC(
            latent_channels=c, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(16, 32),
            decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=preset.scale)
    raise AssertionError(preset.kind)


def _direct(preset, m, x):
    """Normalised latents and reconstructions computed straight from diffusers (independent of vae.py)."""
    xm = x * 2 - 1
    if preset.kind == "dc":
        raw = m.encode(xm).latent
        z = raw * preset.scale
        return z, (m.decode(z / preset.scale).sample + 1) / 2
    raw = m.encode(xm).latent_dist.mode()
    if preset.kind == "kl-flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        mean = m.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(m.bn.running_var.view(1, -1, 1, 1) + m.config.batch_norm_eps)
        z = (Flux2Pipeline._patchify_latents(raw) - mean) / std
        return z, (m.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample + 1) / 2
    if preset.norm == "config-stats":
        mean = torch.tensor(m.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(m.config.latents_std).view(1, -1, 1, 1)
        z = (raw - mean) / std
        return z, (m.decode(z * std + mean).sample + 1) / 2
    z = (raw - preset.shift) * preset.scale  # the SD3/FLUX pipelines' convention
    return z, (m.decode(z / preset.scale + preset.shift).sample + 1) / 2


HUB_PRESETS = [p for p in PRESETS if p.kind != "kl-ldm" and p.name in TOKENIZERS]


@pytest.mark.parametrize("preset", HUB_PRESETS, ids=lambda p: p.name)
@torch.no_grad()
def test_adapter_matches_diffusers(preset, tmp_path):
    m = _tiny(preset).eval()
    sub = preset.weights[0].subfolder
    m.save_pretrained(tmp_path / sub if sub else tmp_path)  # a repo-shaped folder: subfolder/ as on the hub
    tok = build_tokenizer(preset.name, weights=str(tmp_path))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = tok.encode(x)
    z_ref, rec_ref = _direct(preset, m, x)
    f = 32 // z.shape[-1]
    assert z.shape == (2, preset.latent_channels, 32 // f, 32 // f)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.decode(z), rec_ref, rtol=1e-5, atol=1e-5)
    # the normalisation inverts exactly: decode sees the raw latents encode produced
    torch.testing.assert_close(tok.decode(z_ref), tok.reconstruct(x), rtol=1e-5, atol=1e-5)
    # reconstruct = diffusers' own encode (posterior mode; DC-AE's deterministic latent) then decode, unnormalised
    enc = m.encode(x * 2 - 1)
    plain = (m.decode(enc.latent if preset.kind == "dc" else enc.latent_dist.mode()).sample + 1) / 2
    torch.testing.assert_close(tok.reconstruct(x), plain, rtol=1e-5, atol=1e-5)
    assert tok.weights_id.startswith("local:") and tok.name == preset.name
    # the downsampling factor is the loaded config's (these tiny models have fewer levels than the releases)
    assert tok.downsample == 32 // z.shape[-1]
    # a side that is no multiple of it used to encode silently (33 px as 32 px) and decode to another size
    with pytest.raises(DataError, match=f"multiples of {tok.downsample} .*not 33x32"):
        tok.encode(torch.rand(1, 3, 33, 32))
    with pytest.raises(DataError, match="RGB images"):  # grayscale/RGBA tensors: one sentence, not a conv error
        tok.encode(torch.rand(1, 4, 32, 32))


def test_weights_id_names_the_release_only_for_its_own_hub_snapshot(tmp_path):
    """A --weights folder inside a Hub cache snapshot was labelled with the *preset's* repository whatever
    the snapshot held (madebyollin's fp16-fix as stabilityai/sdxl-vae), as was any folder under a directory
    called 'snapshots'; a `repo@` id means the released weights, beside which compare shows the card's
    numbers. Only the preset's own snapshot gets it now; the rest are content fingerprints."""
    from raebench.metrics.extractors import fingerprint_path
    from raebench.tokenizers.vae import _hub_snapshot

    rev = "0123456789abcdef0123456789abcdef01234567"
    m = _kl(scaling_factor=0.13025)
    own = tmp_path / "hub" / "models--stabilityai--sdxl-vae" / "snapshots" / rev
    other = tmp_path / "hub" / "models--madebyollin--sdxl-vae-fp16-fix" / "snapshots" / rev
    mine = tmp_path / "runs" / "snapshots" / "my-finetune"
    for folder in (own, other, mine):
        m.save_pretrained(folder)
    fp = fingerprint_path(other)
    assert build_tokenizer("sdxl-vae", weights=str(own)).weights_id == f"stabilityai/sdxl-vae@{rev[:12]}@{fp}"
    assert build_tokenizer("sdxl-vae", weights=str(other)).weights_id == f"local:madebyollin/sdxl-vae-fp16-fix@{fp}"
    assert build_tokenizer("sdxl-vae", weights=str(mine)).weights_id == f"local:my-finetune@{fp}"
    # `hf download` leaves snapshot files as symlinks into blobs/: the file's snapshot is still found
    blob = tmp_path / "hub" / "models--hustvl--x" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"0")
    link = tmp_path / "hub" / "models--hustvl--x" / "snapshots" / rev / "latents_stats.pt"
    link.parent.mkdir(parents=True)
    try:
        link.symlink_to(blob)
    except OSError:
        pytest.skip("no symlinks here")
    assert _hub_snapshot(link) == ("hustvl/x", rev)


def test_a_vae_folder_that_does_not_fit_is_refused(tmp_path):
    """diffusers only warns about missing or unused weights (a missing one stays uninitialised or on the
    meta device); raebench refuses the folder, naming the keys. Legacy attention names still load."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = "diffusion_pytorch_model.safetensors"
    ok = tmp_path / "ok"
    ref = _kl().eval()
    ref.save_pretrained(ok)

    def variant(name, sd_edit=None, cfg_edit=None):
        d = tmp_path / name
        shutil.copytree(ok, d)
        if sd_edit:
            sd = load_file(str(d / weights))
            sd_edit(sd)
            save_file(sd, str(d / weights))
        if cfg_edit:
            cfg = json.loads((d / "config.json").read_text())
            cfg_edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    _kl(latent=16).save_pretrained(tmp_path / "c16")
    (Path(variant("badjson")) / "config.json").write_text("{not json")
    cases = [
        (variant("missing", lambda sd: sd.pop("decoder.conv_out.weight")), r"1 missing \(decoder\.conv_out\.weight\)"),
        (variant("unused", lambda sd: sd.update(extra=torch.zeros(2))), r"1 unused \(extra\)"),
        (variant("shape", lambda sd: sd.update({"decoder.conv_out.bias": torch.zeros(5)})),
         r"do not fit a diffusers AutoencoderKL as its config.json describes it: decoder.conv_out.bias has shape \(5\) in the file, \(3\) in the model"),
        (variant("wider", cfg_edit=lambda c: c.update(block_out_channels=[32, 128])), r"as its config.json describes it: \S+ has shape"),
        (variant("deeper", cfg_edit=lambda c: c.update(layers_per_block=2)), r"\d+ missing \("),
        (variant("unet", cfg_edit=lambda c: c.update(_class_name="UNet2DModel")), "holds UNet2DModel weights"),
        (str(tmp_path / "badjson"), "is not a readable JSON file"),
        (str(tmp_path / "c16"), "16 latent channels; this tokenizer has 4"),
    ]
    for folder, message in cases:
        with pytest.raises(CheckpointError, match=message):
            build_tokenizer("sd-vae-ft-ema", weights=folder)

    def legacy(sd):  # the attention names of older diffusers exports
        for k in [k for k in sd if ".attentions." in k]:
            new = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
            sd[new.replace(".to_out.0.", ".proj_attn.")] = sd.pop(k)
    folder = variant("legacy", legacy)
    assert any(".query." in k for k in load_file(str(Path(folder) / weights)))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_tokenizer("sd-vae-ft-ema", weights=folder).reconstruct(x),
                                   build_tokenizer("sd-vae-ft-ema", weights=str(ok)).reconstruct(x), rtol=0, atol=0)


def test_a_folder_of_another_vae_of_the_same_class_and_width_is_refused(tmp_path, caplog):
    """SD3.5's and FLUX.1's VAEs (or SD's and SDXL's) share class, width and every weight name, so strict
    loading accepts one for the other; their config.json scaling/shift factors differ, and the preset's
    constants would normalise the other's latents wrongly under the preset's name."""
    import shutil

    sd35 = get_preset("sd3.5-vae")
    _kl(16, scaling_factor=sd35.scale, shift_factor=sd35.shift, use_quant_conv=False,
        use_post_quant_conv=False).save_pretrained(tmp_path / "sd35" / "vae")
    with pytest.raises(CheckpointError, match=r"another VAE than flux1-vae: its config.json gives scaling_factor 1\.5305, "
                                              r"shift_factor 0\.0609.*looks like sd3\.5-vae"):
        build_tokenizer("flux1-vae", weights=str(tmp_path / "sd35"))
    assert build_tokenizer("sd3.5-vae", weights=str(tmp_path / "sd35")).scale.item() == pytest.approx(1.5305)

    _kl(4, scaling_factor=0.13025).save_pretrained(tmp_path / "sdxl")
    with pytest.raises(CheckpointError, match="another VAE than sd-vae-ft-ema.*looks like sdxl-vae or sdxl-vae-fp16-fix"):
        build_tokenizer("sd-vae-ft-ema", weights=str(tmp_path / "sdxl"))
    # a config that states no factor (diffusers exports before scaling_factor existed) is accepted
    shutil.copytree(tmp_path / "sdxl", tmp_path / "legacy")
    cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())
    del cfg["scaling_factor"], cfg["shift_factor"]
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(cfg))
    assert build_tokenizer("sdxl-vae", weights=str(tmp_path / "legacy")).scale.item() == pytest.approx(0.13025)

    dc = get_preset("dc-ae-f32c32")
    m = _tiny(dc)
    m.register_to_config(scaling_factor=0.41407)  # dc-ae-f32c32-sana-1.0's, same class and width
    m.save_pretrained(tmp_path / "sana")
    with pytest.raises(CheckpointError, match=r"scaling_factor 0\.41407.*if these really are dc-ae-f32c32's weights, "
                                              r"set scaling_factor 0\.3189"):
        build_tokenizer("dc-ae-f32c32", weights=str(tmp_path / "sana"))
    # the released snapshot from the Hub (no --weights) is only warned about: the preset's constants are
    # its authors' published ones, and refusing would lock users out of the released weights
    import logging

    from raebench.tokenizers.vae import _check_config_normalisation

    with caplog.at_level(logging.WARNING, logger="raebench.tokenizers.vae"):
        _check_config_normalisation(get_preset("flux1-vae"), tmp_path / "sd35" / "vae", refuse=False)
    assert "states other constants than flux1-vae" in caplog.text and "the preset's constants are used" in caplog.text


def test_e2e_vavae_config_statistics_are_checked_at_load(tmp_path):
    """latents_mean/latents_std of the wrong length failed at the first encode with a broadcasting
    RuntimeError; a zero std gave infinite latents without a word."""
    good = dict(latents_mean=[0.0] * 32, latents_std=[1.0] * 32)
    cases = {
        "short": (dict(latents_mean=[0.0] * 16, latents_std=[1.0] * 16), "16 latents_mean and 16 latents_std entries for a VAE with 32"),
        "zero": ({**good, "latents_std": [0.0] * 32}, "not positive and finite"),
        "nan": ({**good, "latents_mean": [float("nan")] * 32}, "non-finite latents_mean"),
    }
    for name, (stats, message) in cases.items():
        _kl(32, **stats).save_pretrained(tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            build_tokenizer("e2e-vavae", weights=str(tmp_path / name))
    _kl(32, **good).save_pretrained(tmp_path / "good")
    z = build_tokenizer("e2e-vavae", weights=str(tmp_path / "good")).encode(torch.rand(1, 3, 32, 32))
    assert z.shape == (1, 32, 16, 16) and torch.isfinite(z).all()


def test_dc_ae_parameter_count_is_that_of_the_released_config():
    """dc-ae-f32c32-in-1.0's config from diffusers' scripts/convert_dcae_to_diffusers.py (the script that made
    the -diffusers repositories); efficientvit's own DCAE of that name has the same count."""
    res, vit = ["ResBlock"] * 3, ["EfficientViTBlock"] * 3
    with torch.device("meta"):
        m = diffusers.AutoencoderDC(
            latent_channels=32, encoder_block_types=res + vit, decoder_block_types=res + vit,
            encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
            encoder_layers_per_block=[0, 4, 8, 2, 2, 2], decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
            encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
            decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3, decoder_act_fns=["relu"] * 3 + ["silu"] * 3)
    assert sum(p.numel() for p in m.parameters()) == get_preset("dc-ae-f32c32").params
    assert TOKENIZERS.get("va-vae-f16d32").native_resolutions == (256,)  # trained at 256 only


def test_ls_metadata_needs_no_weights_or_diffusers():
    code = ("import sys, raebench.tokenizers as t; "
            "shapes = {s.name: s.latent_shape(256) for s in t.TOKENIZERS if s.family == 'vae'}; "
            "print(shapes['sd-vae-ft-ema'], shapes['dc-ae-f32c32'], shapes['va-vae-f16d32'], 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(4,", "32,", "32)", "(32,", "8,", "8)", "(32,", "16,", "16)", "False"]
    assert get_preset("flux2-vae").latent_shape(256) == (128, 16, 16)


# ---------------------------------------------------------------------------------------------
# Weights: offline error, HF cache route, --weights route (CLI)
# ---------------------------------------------------------------------------------------------


def _png_folder(root: Path, n: int = 2) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"im{i}.png")
    return root


def _hub_sd_vae_ft_ema(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """sd-vae-ft-ema's files in a Hugging Face cache laid out as `hf download` leaves it (refs/main ->
    snapshots/<hash>/), used as the Hub cache: (snapshot hash, repo folder)."""
    snap_hash = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--stabilityai--sd-vae-ft-ema"
    _kl().save_pretrained(repo / "snapshots" / snap_hash)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snap_hash)
    _use_hf_home(monkeypatch, tmp_path / "hf")
    return snap_hash, repo


def _use_hf_home(monkeypatch, home: Path) -> None:
    """Point the Hub cache at ``home`` (huggingface_hub reads HF_HOME at import; its functions read
    ``constants.HF_HUB_CACHE`` at call time)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))


def test_eval_offline_fails_in_one_sentence_then_runs_from_the_hf_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _png_folder(tmp_path / "imgs")
    args = ["eval", "-t", "sd-vae-ft-ema", "--data", str(data), "-r", "32", "--results", str(tmp_path / "res"), "--device", "cpu"]
    _use_hf_home(monkeypatch, tmp_path / "empty-hf")
    code, out, err = _run(args, capsys)
    assert code == 2, err
    msg = " ".join(err.split())
    assert "Traceback" not in err and "'stabilityai/sd-vae-ft-ema'" in msg and "--weights" in msg
    assert msg.rstrip(".").count(". ") == 0  # one sentence

    # a Hugging Face cache laid out as `hf download` leaves it: refs/main -> snapshots/<hash>/
    snap_hash, repo = _hub_sd_vae_ft_ema(tmp_path, monkeypatch)
    weights = repo / "snapshots" / snap_hash / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".away"))  # a partly fetched snapshot (config only) counts as missing
    code, out, err = _run(args, capsys)
    assert code == 2 and "'stabilityai/sd-vae-ft-ema'" in " ".join(err.split()) and "hf download" in err, err
    weights.with_suffix(".away").rename(weights)
    code, out, err = _run(args, capsys)
    assert code == 0, err
    rows = [json.loads(line) for f in (tmp_path / "res" / "runs").glob("*.jsonl") for line in f.read_text().splitlines()]
    from raebench.metrics.extractors import fingerprint_path

    content = fingerprint_path(weights.parent)  # the snapshot holds config.json and the safetensors only
    assert {row["weights_id"] for row in rows} == {f"stabilityai/sd-vae-ft-ema@{snap_hash[:12]}@{content}"}


def test_the_hub_copy_and_a_local_copy_of_the_same_weights_are_the_same_weights(tmp_path, capsys, monkeypatch):
    """Weights reached through the Hub cache were identified by repo and snapshot, a --weights copy of the
    same files by their content: compare measured them again, the leaderboard gave them two rows, and a
    stage-2 run trained on one refused to resume on the other. Both identities now end with the content
    fingerprint; rows stored with the Hub label alone (before) still count for today's Hub weights."""
    import shutil

    from raebench.leaderboard import pivot
    from raebench.results import load
    from raebench.stage2.latents import same_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap_hash, repo = _hub_sd_vae_ft_ema(tmp_path, monkeypatch)
    copy = tmp_path / "my-vae"
    shutil.copytree(repo / "snapshots" / snap_hash, copy)
    (copy / "README.md").write_text("my notes")  # not read by the loader: not part of the identity
    res = str(tmp_path / "res")
    common = ["--data", str(_png_folder(tmp_path / "imgs")), "-r", "32", "-m", "psnr", "--results", res,
              "--device", "cpu", "--reported", "none"]
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", *common], capsys)
    assert code == 0 and "computed now: sd-vae-ft-ema" in out, err
    hub_id = load(res)["weights_id"].iloc[0]
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", *common, "--weights", f"sd-vae-ft-ema={copy}"], capsys)
    assert code == 0 and "computed now: nothing" in out, err  # the Hub copy's row serves the local copy
    local_id = build_tokenizer("sd-vae-ft-ema", weights=str(copy)).weights_id
    assert local_id.startswith("local:my-vae@") and local_id != hub_id and same_weights(hub_id, local_id)
    assert not same_weights(hub_id, build_tokenizer("sd-vae-ft-ema", weights=str(_other_weights(tmp_path))).weights_id)

    # a row measured from the copy (with --recompute) and the Hub's: one leaderboard row
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", *common, "--weights", f"sd-vae-ft-ema={copy}",
                           "--recompute"], capsys)
    assert code == 0, err
    rows = load(res)
    assert set(rows["weights_id"]) == {hub_id, local_id}
    assert list(pivot(rows, gaps=False).index) == ["sd-vae-ft-ema"]  # the released label, no [local:...] row

    # a row stored before identities carried content (the Hub label alone) is reused for today's Hub weights
    legacy = f"stabilityai/sd-vae-ft-ema@{snap_hash[:12]}"
    assert same_weights(legacy, hub_id) and not same_weights(legacy, local_id.replace("local:my-vae", "local:x"))
    for f in (tmp_path / "res" / "runs").glob("*.jsonl"):
        f.write_text(f.read_text().replace(hub_id, legacy).replace(local_id, legacy))
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", *common], capsys)
    assert code == 0 and "computed now: nothing" in out, err
    assert list(pivot(load(res), gaps=False).index) == ["sd-vae-ft-ema"]


def _other_weights(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=D2, up_block_types=U2, layers_per_block=1,
                            latent_channels=4).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def test_eval_and_compare_with_local_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    data = _png_folder(tmp_path / "imgs")
    _kl().save_pretrained(tmp_path / "w")
    res = str(tmp_path / "res")
    code, out, err = _run(["eval", "-t", "sd-vae-ft-ema", "--weights", str(tmp_path / "w"), "--data", str(data),
                           "-r", "256", "--results", res, "--device", "cpu"], capsys)
    assert code == 0, err
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", "-t", "bicubic-f8", "--data", str(data), "-r", "256",
                           "--results", res, "--device", "cpu", "--weights", f"sd-vae-ft-ema={tmp_path / 'w'}"], capsys)
    assert code == 0, err
    assert "computed now: bicubic-f8" in out  # sd-vae-ft-ema's rows were reused
    # the card reports the released weights, not these local ones: not shown beside them by default
    assert "sd-vae-ft-ema (reported)" not in out and "23.80" not in out
    assert "measured: same images, n=2" in out
    code, out, err = _run(["compare", "-t", "sd-vae-ft-ema", "-t", "bicubic-f8", "--data", str(data), "-r", "256",
                           "--results", res, "--device", "cpu", "--weights", f"sd-vae-ft-ema={tmp_path / 'w'}",
                           "--reported", "all"], capsys)  # asked for: every published number
    assert code == 0, err
    assert "sd-vae-ft-ema (reported)" in out and "23.80" in out and "n=5000" in out and "coco-val2017" in out

    lb = tmp_path / "lb.tex"
    assert _run(["leaderboard", "-f", "latex", "-o", str(lb), "--results", res], capsys)[0] == 0
    tex = lb.read_text()
    assert r"\toprule" in tex and r"\textbf{" in tex and "coco-val2017 n=5000 reported/psnr" in tex
    assert "imgs n=2/psnr" in tex  # measured column shows its n beside the reported one


# ---------------------------------------------------------------------------------------------
# LDM-format checkpoints (VA-VAE)
# ---------------------------------------------------------------------------------------------


def _to_ldm(sd: dict, num_levels: int) -> dict:
    """diffusers AutoencoderKL keys -> LDM keys, written independently of vae.py's mapping."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[1] == "down_blocks":
            kind = {"resnets": "block", "attentions": "attn", "downsamplers": "downsample"}[p[3]]
            rest = p[5:] if kind == "downsample" else [p[4], *p[5:]]
            p = [p[0], "down", p[2], kind, *rest]
        elif p[1] == "up_blocks":
            kind = {"resnets": "block", "attentions": "attn", "upsamplers": "upsample"}[p[3]]
            rest = p[5:] if kind == "upsample" else [p[4], *p[5:]]
            p = [p[0], "up", str(num_levels - 1 - int(p[2])), kind, *rest]
        elif p[1] == "mid_block":
            p = [p[0], "mid", f"block_{int(p[3]) + 1}" if p[2] == "resnets" else "attn_1", *p[4:]]
        elif p[1] == "conv_norm_out":
            p = [p[0], "norm_out", *p[2:]]
        p = ["nin_shortcut" if x == "conv_shortcut" else x for x in p]
        if "attn" in p or "attn_1" in p:
            ren = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            i = p.index("attn") + 2 if "attn" in p else p.index("attn_1") + 1
            p = [*p[:i], ren[p[i]], *[x for x in p[i + 1:] if x != "0"]]
            if p[-1] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # linear -> 1x1 conv
        out[".".join(p)] = v
    return out


def test_ldm_conversion_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    m = _kl()
    sd = m.state_dict()
    ldm = _to_ldm(sd, 2)
    assert set(ldm) != set(sd)
    ref = convert_ldm_vae_checkpoint(ldm, dict(m.config))  # diffusers' own single-file converter
    config, mine = convert_ldm_vae_state_dict({**ldm, "loss.logvar": torch.zeros(())})
    assert set(mine) == set(ref) == set(sd)
    for k in sd:
        torch.testing.assert_close(mine[k], ref[k].reshape(mine[k].shape), rtol=0, atol=0)
        torch.testing.assert_close(mine[k], sd[k], rtol=0, atol=0)
    assert config["block_out_channels"] == [32, 64] and config["latent_channels"] == 4 and config["layers_per_block"] == 1


def _vavae_like():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 2 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8)


def test_ldm_attention_levels_follow_ldm_attention():
    """The one part diffusers' converter lacks: attention inside a resolution level (LDM's
    attn_resolutions). Checked against LDM's AttnBlock formula written out here."""
    m = _vavae_like()
    ldm = _to_ldm(m.state_dict(), 3)
    config, conv = convert_ldm_vae_state_dict(ldm)
    assert config["down_block_types"][-1] == "AttnDownEncoderBlock2D" and config["up_block_types"][0] == "AttnUpDecoderBlock2D"
    m2 = diffusers.AutoencoderKL(**config)
    m2.load_state_dict(conv, strict=True)
    h = torch.randn(2, 64, 4, 4)
    pre = "encoder.down.2.attn.0."
    w = {k[len(pre):]: v for k, v in ldm.items() if k.startswith(pre)}
    hn = torch.nn.functional.group_norm(h, 32, w["norm.weight"], w["norm.bias"], eps=1e-6)
    q, k, v = (torch.nn.functional.conv2d(hn, w[f"{n}.weight"], w[f"{n}.bias"]).flatten(2) for n in "qkv")  # (B, C, HW)
    att = torch.softmax(q.transpose(1, 2) @ k * 64**-0.5, dim=-1)  # (B, HW_q, HW_k)
    o = (v @ att.transpose(1, 2)).view_as(h)
    ref = h + torch.nn.functional.conv2d(o, w["proj_out.weight"], w["proj_out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(m2.encoder.down_blocks[2].attentions[0](h), ref, rtol=1e-4, atol=1e-5)


def _vavae_shaped():
    """VA-VAE's layout at the smallest widths: 5 levels (f16), attention in the last, 32 latent channels."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32,) * 5, down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=32)


@torch.no_grad()
def test_va_vae_loads_ldm_checkpoint_and_stats(tmp_path):
    m = _vavae_shaped().eval()
    ldm = _to_ldm(m.state_dict(), 5)
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(1)  # training-only keys are dropped
    ldm["foundation_model.model.proj.weight"] = torch.zeros(1)
    torch.save({"state_dict": ldm, "epoch": 3}, tmp_path / "vavae-imagenet256-f16d32-dinov2.pt")
    g = torch.Generator().manual_seed(2)
    mean, std = torch.randn(1, 32, 1, 1, generator=g), torch.rand(1, 32, 1, 1, generator=g) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    tok = build_tokenizer("va-vae-f16d32", weights=str(tmp_path))
    x = torch.rand(2, 3, 32, 32, generator=g)
    z = tok.encode(x)
    assert z.shape == (2, 32, 2, 2) and tok.downsample == 16
    z_ref = (m.encode(x * 2 - 1).latent_dist.mode() - mean) / std
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    # five random-weight levels amplify the last-bit difference of z / (1 / std) and z * std to ~5e-5
    torch.testing.assert_close(tok.decode(z), (m.decode(z_ref * std + mean).sample + 1) / 2, rtol=1e-4, atol=2e-4)
    for bad in (0.0, -1.0, float("nan")):  # every latent would be non-finite or flipped: refuse the file instead
        torch.save({"mean": mean, "std": std.clone().fill_(bad)}, tmp_path / "latents_stats.pt")
        with pytest.raises(CheckpointError, match="std that is not positive and finite"):
            build_tokenizer("va-vae-f16d32", weights=str(tmp_path))


def test_va_vae_missing_files_are_named_together_and_following_the_message_loads_it(tmp_path, monkeypatch):
    """Offline with an empty cache, va-vae-f16d32 named only its checkpoint; fetching that file as told
    then failed on latents_stats.pt. Now one sentence names both with one `hf download` command; a
    local checkpoint without the statistics beside it says how to put them there."""
    import re

    from raebench.errors import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _use_hf_home(monkeypatch, tmp_path / "hf")
    with pytest.raises(MissingWeightsError) as e:
        build_tokenizer("va-vae-f16d32")
    msg = str(e.value)
    cmd = "hf download hustvl/vavae-imagenet256-f16d32-dinov2 vavae-imagenet256-f16d32-dinov2.pt latents_stats.pt"
    assert f"`{cmd}`" in msg and f"cache at {tmp_path / 'hf' / 'hub'} " in msg, msg
    # follow it: the two files where `hf download` puts them (random weights of VA-VAE's layout)
    m = _vavae_shaped().eval()
    root = tmp_path / "hf" / "hub" / "models--hustvl--vavae-imagenet256-f16d32-dinov2"
    snap = root / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("b" * 40)
    torch.save({"state_dict": _to_ldm(m.state_dict(), 5)}, snap / "vavae-imagenet256-f16d32-dinov2.pt")
    with pytest.raises(MissingWeightsError, match=re.escape("`hf download hustvl/vavae-imagenet256-f16d32-dinov2 "
                                                            "latents_stats.pt`")):
        build_tokenizer("va-vae-f16d32")  # one file left: named alone, with its own flag
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, snap / "latents_stats.pt")
    tok = build_tokenizer("va-vae-f16d32")
    assert tok.encode(torch.rand(1, 3, 32, 32)).shape == (1, 32, 2, 2)
    from raebench.metrics.extractors import fingerprint_path

    release = (f"hustvl/vavae-imagenet256-f16d32-dinov2@{'b' * 12}:vavae-imagenet256-f16d32-dinov2.pt"
               f"@{fingerprint_path(snap / 'vavae-imagenet256-f16d32-dinov2.pt')}")
    assert tok.weights_id == f"{release}+stats:{fingerprint_path(snap / 'latents_stats.pt')}"
    from raebench.weights import same_weights  # as recorded before the checkpoint's own fingerprint was in it

    before = f"hustvl/vavae-imagenet256-f16d32-dinov2@{'b' * 12}:vavae-imagenet256-f16d32-dinov2.pt"
    assert same_weights(before, tok.weights_id)
    assert same_weights(f"{before}+stats:{fingerprint_path(snap / 'latents_stats.pt')}", tok.weights_id)
    assert not same_weights(f"{before}+stats:000000000000", tok.weights_id)
    # the released checkpoint with one's own statistics, kept in a folder that happens to be called 'snapshots'
    # (they were left out of the identity: the released id then named other latents)
    mine = tmp_path / "runs" / "snapshots" / "stats.pt"
    mine.parent.mkdir(parents=True)
    torch.save({"mean": torch.ones(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, mine)
    assert build_tokenizer("va-vae-f16d32", stats=str(mine)).weights_id == f"{release}+stats:{fingerprint_path(mine)}"
    # a local checkpoint: its statistics belong beside it
    local = tmp_path / "local"
    local.mkdir()
    (snap / "vavae-imagenet256-f16d32-dinov2.pt").rename(local / "vavae-imagenet256-f16d32-dinov2.pt")
    with pytest.raises(MissingWeightsError, match=re.escape(
            f"`hf download hustvl/vavae-imagenet256-f16d32-dinov2 latents_stats.pt --local-dir {local}`")):
        build_tokenizer("va-vae-f16d32", weights=str(local / "vavae-imagenet256-f16d32-dinov2.pt"))


def test_va_vae_refuses_an_ldm_checkpoint_of_another_autoencoder(tmp_path):
    """SD's kl-f8 in LDM format (4 channels, f8) with 4-channel statistics used to load as va-vae-f16d32 and
    encode 4x32x32 latents under a name whose registry entry says 32x16x16."""
    torch.manual_seed(0)
    klf8 = diffusers.AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4)
    torch.save({"state_dict": _to_ldm(klf8.state_dict(), 4)}, tmp_path / "kl-f8.pt")
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "latents_stats.pt")
    with pytest.raises(CheckpointError, match=r"4 latent channels at 1/8 resolution; va-vae-f16d32 has 32 at 1/16"):
        build_tokenizer("va-vae-f16d32", weights=str(tmp_path))


@dataclass
class _NotATensor:
    x: int = 1


def test_ldm_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"state_dict": _to_ldm(_vavae_like().state_dict(), 3), "hparams": _NotATensor()}, tmp_path / "ckpt.pt")
    torch.save({"mean": torch.zeros(8), "std": torch.ones(8)}, tmp_path / "latents_stats.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        build_tokenizer("va-vae-f16d32", weights=str(tmp_path))


def test_ldm_config_inference_for_the_real_va_vae_layout():
    with torch.device("meta"):
        real = diffusers.AutoencoderKL(
            block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=32,
            down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4)
    assert sum(p.numel() for p in real.parameters()) == get_preset("va-vae-f16d32").params
    cfg = ldm_vae_config(_to_ldm(real.state_dict(), 5))
    assert cfg["block_out_channels"] == [128, 128, 256, 256, 512] and cfg["latent_channels"] == 32


# ---------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------


def _arxiv_ids(text: str) -> set[str]:
    import re

    return set(re.findall(r"arXiv:(\d{4}\.\d{4,5})", text))


def test_every_vae_has_a_card_consistent_with_its_preset():
    cards = {c.tokenizer: c for c in load_cards()}
    for p in PRESETS:
        card = cards[p.name]
        assert list(card.latent["shape_at_256"]) == list(p.latent_shape(256))
        assert card.source["repo"] == p.weights[0].repo_id and card.source["subfolder"] == p.weights[0].subfolder
        if p.norm == "scale":  # both constants: (mode - shift) * scale
            assert str(p.scale) in card.latent["normalisation"]
            assert not p.shift or str(p.shift) in card.latent["normalisation"], p.name
        assert card.citation and card.verified and card.gated == p.weights[0].gated
        assert _arxiv_ids(p.citation) <= _arxiv_ids(card.citation), p.name  # the same paper
        for r in card.reported:  # a number at a resolution the weights have (or are published at)
            assert r.resolution in p.resolutions, (p.name, r.label, r.resolution)
    for name in ("rae-dinov2-b", "rae-siglip2-b", "rae-mae-b"):
        assert name in cards


def test_every_rae_release_has_a_card_consistent_with_it():
    """The RAE cards name the files the release loads, its latent shape at the release's own resolution
    (hidden size x resolution/16 x resolution/16; the diffusers AutoencoderRAE docs list 768 x 32 x 32 for
    the i512 decoder), the RAE paper, and report numbers only at that resolution."""
    from raebench.tokenizers.rae import RAE_REPO, RELEASES

    cards = {c.tokenizer: c for c in load_cards()}
    for name, r in RELEASES.items():
        card = cards[name]
        assert card.source["repo"] == RAE_REPO and list(card.source["files"]) == [r.decoder_file, r.stats_file]
        shape = card.latent.get(f"shape_at_{r.resolution}")
        assert shape is not None and list(shape) == [r.hidden_size, r.grid, r.grid], name
        if r.resolution != 256:
            assert card.latent["shape_at_256"] is None  # no release at 256 px behind this card
        assert _arxiv_ids(card.citation) == {"2510.11690"} and "2025" in card.citation
        assert not card.gated
        assert card.reported and all(x.resolution == r.resolution for x in card.reported)


def test_reported_numbers_carry_their_protocol():
    rows = {(r.tokenizer, r.dataset, r.metric): r for r in reported_rows()}
    sd = rows[("sd-vae-ft-mse", "coco-val2017", "fid")]
    assert (sd.value, sd.n_images, sd.resolution, sd.source, sd.domain) == (4.70, 5000, 256, "reported", "open-domain")
    assert rows[("sd-vae-ft-ema", "coco-val2017", "psnr")].value == 23.8
    # RAE's SD-VAE rFID names no variant: a variant row, not shown beside ft-EMA by default
    assert ("sd-vae-ft-ema", "imagenet-val", "fid") not in rows
    sd_rae = {(r.tokenizer, r.dataset, r.metric): r for r in reported_rows(include_variants=True)}[
        ("sd-vae-ft-ema", "imagenet-val", "fid")]
    assert sd_rae.extra["secondary"] is True and sd_rae.extra["weights_match"] is False
    rae = rows[("rae-dinov2-b", "imagenet-val", "fid")]
    assert (rae.value, rae.n_images) == (0.57, 50000)  # the released noise-augmented decoder, rFID-50k
    assert ("rae-mae-b", "imagenet-val", "fid") not in rows  # reported for a clean-latent decoder: a variant
    assert reported_frame(["rae-mae-b"], include_variants=True)["value"].tolist() == [0.16]
    for r in reported_rows(include_variants=True):
        assert r.extra["reference"] and r.extra["citation"] and r.higher_is_better is not None


def test_card_schema_is_strict():
    base = {"name": "x", "tokenizer": "x", "title": "t", "loader": "l", "source": {}, "licence": "MIT", "gated": False,
            "latent": {}, "citation": "c"}
    assert parse_card(base).name == "x"
    with pytest.raises(CardError, match="unknown key"):
        parse_card({**base, "licenze": "MIT"})
    with pytest.raises(CardError, match="unknown key"):
        parse_card({**base, "reported": [{"metric": "psnr", "value": 1, "dataset": "d", "n_images": 1,
                                          "reference": "r", "source": "s", "n_imgs": 2}]})


# ---------------------------------------------------------------------------------------------
# Leaderboard, compare, domain gap
# ---------------------------------------------------------------------------------------------


def _row(tok, dataset, domain, metric, value, n, hib, fp="f"):
    return ResultRow(tokenizer=tok, weights_id="w", dataset=dataset, split="val", domain=domain, resolution=256,
                     n_images=n, metric=metric, value=value, higher_is_better=hib, metric_version="v",
                     data_fingerprint=f"{fp}{dataset}{n}", run_id="r", date="2026-01-01")


def _frame(rows):
    from dataclasses import asdict

    return pd.DataFrame([asdict(r) for r in rows])


def test_domain_gap_and_leaderboard_columns():
    rows = [
        _row("a", "imagenet-val", "in-domain", "psnr", 25.0, 100, True), _row("a", "coco-val2017", "open-domain", "psnr", 22.0, 50, True),
        _row("b", "imagenet-val", "in-domain", "psnr", 24.0, 100, True), _row("b", "coco-val2017", "open-domain", "psnr", 23.0, 50, True),
        _row("a", "coco-val2017", "open-domain", "psnr", 30.0, 7, True),  # another n: its own column, not mixed in
    ]
    df = _frame(rows)
    gap = domain_gap(df)
    assert gap.set_index("tokenizer")["gap"].to_dict() == {"a": -3.0, "b": -1.0}  # largest-n run per dataset
    table = pivot(df)
    assert table.loc["a", "coco-val2017 n=7/psnr"] == 30.0 and table.loc["a", "coco-val2017 n=50/psnr"] == 22.0
    assert table.loc["b", "gap coco-val2017 - imagenet-val/psnr"] == -1.0
    md = render(table, "md", {"psnr": True})
    assert "**-1.0000**" in md and "| 30.00 |" in md  # n=7: a lone value, not bold


def test_compare_ranks_reported_numbers_only_within_one_protocol():
    toks = ["sd-vae-ft-ema", "sd-vae-ft-mse", "rae-dinov2-b"]
    meas = _frame([_row("sd-vae-ft-ema", "coco-val2017", "open-domain", "psnr", 20.0, 3, True),
                   _row("sd-vae-ft-mse", "coco-val2017", "open-domain", "psnr", 21.0, 3, True)])
    rep = reported_frame(toks)
    t = compare_table(meas, toks, 256, reported=rep)
    row = t.loc[("coco-val2017", "psnr")]
    assert row["best"] == "sd-vae-ft-mse" and row["sd-vae-ft-mse (reported)"] == 24.5
    assert row["best (reported)"] == "sd-vae-ft-mse (reported)"  # both model-card rows: n=5000, same reference
    assert "measured: same images, n=3" in row["protocol"] and "n=5000" in row["protocol"]
    fid = t.loc[("imagenet-val", "fid")]  # only the released RAE decoder's number; RAE's SD-VAE row is a variant
    assert fid["rae-dinov2-b (reported)"] == 0.57 and pd.isna(fid["sd-vae-ft-ema (reported)"])
    assert "n=50000" in fid["protocol"] and fid["best (reported)"] == ""  # nothing to rank it against

    rep.loc[(rep["tokenizer"] == "sd-vae-ft-mse") & (rep["metric"] == "psnr"), "n_images"] = 100
    row = compare_table(meas, toks, 256, reported=rep).loc[("coco-val2017", "psnr")]
    assert row["best (reported)"] == "" and "not ranked" in row["protocol"] and "n=100" in row["protocol"]
    tex = render(t, "latex", bold=set())
    assert r"$\Delta$ sd-vae-ft-mse" in tex and "--" in tex


def test_flux_presets_parameter_count_and_gating():
    """FLUX.2's parameter count is that of diffusers' AutoencoderKLFlux2 with its default config (what
    FLUX.2-dev's config holds); FLUX.1-schnell's repository is gated, so the missing-weights message
    says how to get access."""
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "AutoencoderKLFlux2"):
        pytest.skip("this diffusers has no AutoencoderKLFlux2")
    with torch.device("meta"):
        model = diffusers.AutoencoderKLFlux2()
    assert sum(p.numel() for p in model.parameters()) == get_preset("flux2-vae").params
    assert all(w.gated for w in get_preset("flux1-vae").weights)


def test_a_pipeline_folder_points_at_its_vae_subfolder(tmp_path):
    """A diffusers pipeline download (model_index.json, vae/, unet/) given to a preset without a subfolder was
    told to give 'a diffusers folder'; the sentence now names the vae/ folder to pass."""
    from raebench.errors import MissingWeightsError

    _kl().save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=f"holds one in '{tmp_path / 'pipe' / 'vae'}'; pass that folder"):
        build_tokenizer("sd-vae-ft-ema", weights=str(tmp_path / "pipe"))
    assert build_tokenizer("sd-vae-ft-ema", weights=str(tmp_path / "pipe" / "vae")).encode(torch.rand(1, 3, 8, 8)).shape == (1, 4, 4, 4)


def test_a_full_download_of_the_repo_has_the_identity_of_the_files_the_hub_cache_fetched(tmp_path):
    """Only config.json and diffusion_pytorch_model.safetensors are fetched and read (DIFFUSERS_FILES):
    a `hf download --local-dir` of the whole repo also holds other safetensors and JSON files (sdxl-vae's
    single-file sdxl_vae.safetensors, a fp16 variant), which diffusers does not load here; they must not
    make the same weights other weights."""
    import shutil

    from raebench.tokenizers.vae import _weights_id
    from raebench.weights import same_weights

    snap = tmp_path / "hub" / "models--stabilityai--sdxl-vae" / "snapshots" / ("0" * 40)
    _kl().save_pretrained(snap)
    full = tmp_path / "sdxl-vae"
    shutil.copytree(snap, full)
    torch.save({}, full / "diffusion_pytorch_model.bin")
    (full / "sdxl_vae.safetensors").write_bytes(b"another file format of the same weights")
    (full / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"fp16 variant")
    (full / "notes.json").write_text("{}")
    preset = get_preset("sdxl-vae")
    hub, local = _weights_id(preset, snap), _weights_id(preset, full)
    assert hub.startswith("stabilityai/sdxl-vae@000000000000@") and local.startswith("local:sdxl-vae@")
    assert same_weights(hub, local)
    (full / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert not same_weights(hub, _weights_id(preset, full))
