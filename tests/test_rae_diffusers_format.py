"""RAEs in diffusers' format (``diffusers.AutoencoderRAE``) read into raebench's RAETokenizer.

diffusers' AutoencoderRAE is an independent implementation of the RAE (encoder wrapper, ViT-MAE decoder, latent
normalisation). At a 16 x 16 token grid, where its decoder positions equal the official ones, raebench must give
its latents and reconstructions; at other grids the positions differ and raebench keeps the official ones.
"""

import json

import pytest
import torch

from raebench.errors import CheckpointError, MissingWeightsError, RaebenchError
from raebench.rae.decoder import sincos_pos_embed
from raebench.rae.diffusers_format import is_diffusers_rae, load_diffusers_rae, tokenizer_from_autoencoder_rae

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "AutoencoderRAE"):
    pytest.skip("this diffusers has no AutoencoderRAE", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = {"dinov2": 14, "siglip2": 16, "mae": 16}


def _autoencoder(encoder_type: str, grid: int, scaling_factor: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    hs = 128  # diffusers builds encoders with head dim 64: 2 heads
    model = diffusers.AutoencoderRAE(
        encoder_type=encoder_type, encoder_hidden_size=hs, encoder_patch_size=PATCH[encoder_type],
        encoder_num_hidden_layers=2, encoder_input_size=grid * PATCH[encoder_type], decoder_hidden_size=64,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128, patch_size=2,
        latents_mean=torch.randn(hs, grid, grid) * 0.1, latents_std=torch.rand(hs, grid, grid) + 0.5,
        scaling_factor=scaling_factor,
    ).eval()
    with torch.no_grad():  # away from the zero CLS token and default inits, so every weight matters
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("encoder_type", ["dinov2", "siglip2", "mae"])
def test_same_latents_and_reconstructions_as_diffusers_at_a_16x16_grid(encoder_type):
    try:
        model = _autoencoder(encoder_type, grid=16, scaling_factor=0.7)
    except AttributeError as e:  # diffusers 0.42 reaches for SiglipVisionModel.vision_model, gone in transformers 5
        pytest.skip(f"this diffusers cannot build its {encoder_type} encoder with this transformers: {e}")
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        z_ref = model.encode(x).latent  # before conversion: it must not change the diffusers model
        x_ref = model.decode(z_ref).sample
        tok = tokenizer_from_autoencoder_rae(model).eval()
        z = tok.encode(x)
        rec = tok.decode(z_ref)
        assert torch.equal(model.encode(x).latent, z_ref)
    assert z.shape == z_ref.shape == (2, 128, 16, 16)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=5e-6)  # measured 4.8e-7
    torch.testing.assert_close(rec, x_ref, rtol=1e-5, atol=5e-6)  # measured 2.4e-7


def test_other_grids_keep_the_official_positions_where_diffusers_differs():
    model = _autoencoder("dinov2", grid=4)
    tok = tokenizer_from_autoencoder_rae(model)
    official = sincos_pos_embed(64, 4)[None]
    torch.testing.assert_close(tok.decoder.decoder_pos_embed, official, rtol=0, atol=0)
    assert (model.decoder.decoder_pos_embed - official).abs().max() > 0.5  # diffusers: positions x 16 / grid
    # with diffusers' positions put back, the decoders agree: the rest of the mapping is exact
    with torch.no_grad():
        tok.decoder.decoder_pos_embed.copy_(model.decoder.decoder_pos_embed)
        z = torch.randn(2, 128, 4, 4)
        torch.testing.assert_close(tok.decode(z), model.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_folder_round_trip_safetensors_only(tmp_path):
    model = _autoencoder("dinov2", grid=4)
    model.save_pretrained(tmp_path / "rae")
    assert is_diffusers_rae(tmp_path / "rae") and not is_diffusers_rae(tmp_path)
    tok = load_diffusers_rae(tmp_path / "rae")
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(x), model.encode(x).latent, rtol=1e-4, atol=1e-4)
    assert tok.weights_id.startswith("diffusers:rae@")
    # a pickled copy of the same weights is refused rather than unpickled
    (tmp_path / "rae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "rae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_diffusers_rae(tmp_path / "rae")
    with pytest.raises(MissingWeightsError, match="AutoencoderRAE"):
        load_diffusers_rae(tmp_path)


def test_a_folder_that_does_not_fit_is_refused(tmp_path):
    """diffusers leaves a missing encoder weight randomly initialised and drops unused ones; raebench refuses."""
    import shutil

    from safetensors.torch import load_file, save_file

    _autoencoder("dinov2", grid=2).save_pretrained(tmp_path / "ok")
    weights = "diffusion_pytorch_model.safetensors"
    keys = list(load_file(str(tmp_path / "ok" / weights)))
    enc = next(k for k in keys if k.startswith("encoder.") and "layer.0" in k and k.endswith("weight"))
    dec = next(k for k in keys if k.startswith("decoder.") and k.endswith("weight"))
    for name, edit, message in [("enc", lambda sd: sd.pop(enc), r"1 missing \(encoder\."),
                                ("dec", lambda sd: sd.pop(dec), r"1 missing \(decoder\."),
                                ("extra", lambda sd: sd.update(extra=torch.zeros(2)), r"1 unused \(extra\)")]:
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        sd = load_file(str(tmp_path / name / weights))
        edit(sd)
        save_file(sd, str(tmp_path / name / weights))
        with pytest.raises(CheckpointError, match=message):
            load_diffusers_rae(tmp_path / name)
    load_diffusers_rae(tmp_path / "ok")


def test_rae_entry_takes_a_diffusers_folder_and_checks_it_is_that_release(tmp_path):
    from raebench.tokenizers import build_tokenizer

    model = _autoencoder("dinov2", grid=4)
    model.save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match="rae-dinov2-b"):  # 128-wide DINOv2 is no released RAE
        build_tokenizer("rae-dinov2-b", weights=str(tmp_path / "small"))
    # the released layout (DINOv2-B width, 16 x 16 grid at 224 px, patch-16 decoder: 256 px), with 1 encoder layer
    torch.manual_seed(1)
    release = diffusers.AutoencoderRAE(
        encoder_type="dinov2", encoder_hidden_size=768, encoder_patch_size=14, encoder_num_hidden_layers=1,
        decoder_hidden_size=64, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=128, patch_size=16, encoder_input_size=224,
        latents_mean=torch.randn(768, 16, 16) * 0.1, latents_std=torch.rand(768, 16, 16) + 0.5,
    ).eval()
    release.save_pretrained(tmp_path / "release")
    assert json.loads((tmp_path / "release" / "config.json").read_text())["_class_name"] == "AutoencoderRAE"
    tok = build_tokenizer("rae-dinov2-b", weights=str(tmp_path / "release"), resolution=256)
    assert tok.name == "rae-dinov2-b" and tok.weights_id.startswith("diffusers:release@")
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(tok.encode(x), release.encode(x).latent, rtol=1e-5, atol=5e-6)
        torch.testing.assert_close(tok.reconstruct(x), release(x).sample, rtol=1e-5, atol=5e-6)
    with pytest.raises(RaebenchError, match="decodes 256 px"):
        build_tokenizer("rae-dinov2-b", weights=str(tmp_path / "release"), resolution=512)


def test_weights_as_a_hub_repo_id_fetches_config_and_safetensors_only(tmp_path, monkeypatch):
    import huggingface_hub

    from raebench.rae.diffusers_format import DIFFUSERS_FILES, diffusers_rae_folder
    from raebench.tokenizers import get_tokenizer_spec

    model = _autoencoder("dinov2", grid=4)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    repo = get_tokenizer_spec("rae-dinov2-b").extra["diffusers_repo"]
    assert repo == "nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08"
    assert diffusers_rae_folder(repo) == tmp_path / "snapshot"
    assert calls == [(repo, DIFFUSERS_FILES, True)]  # conftest sets HF_HUB_OFFLINE=1: the cache only
    tok = load_diffusers_rae(diffusers_rae_folder(repo))
    assert tok.encode(torch.rand(1, 3, 56, 56)).shape == (1, 128, 4, 4)

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MissingWeightsError, match="no local folder.*hf download nyu-visionx/RAE-dinov2"):
        diffusers_rae_folder(repo)
    assert diffusers_rae_folder(tmp_path / "missing") is None  # a local path is never looked up on the Hub


def test_tiny_or_zero_latent_std_converts_exactly():
    """std + 1e-5 is diffusers' divisor even where std is 0: the converted statistics keep it (no negative var)."""
    model = _autoencoder("dinov2", grid=4)
    with torch.no_grad():
        model._latents_std[:8] = 0.0
        model._latents_std[8:16] = 1e-4
    tok = tokenizer_from_autoencoder_rae(model)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        z, z_ref = tok.encode(x), model.encode(x).latent
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5 * z_ref.abs().max().item())


def test_an_encoder_diffusers_cannot_build_is_a_sentence(tmp_path):
    try:
        _autoencoder("siglip2", grid=2)
        pytest.skip("this diffusers builds SigLIP2 encoders")
    except AttributeError:
        pass
    from safetensors.torch import save_file

    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderRAE", "encoder_type": "siglip2", "encoder_hidden_size": 128, "encoder_patch_size": 16,
        "encoder_num_hidden_layers": 1, "encoder_input_size": 32, "decoder_hidden_size": 64,
        "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 128, "patch_size": 2,
    }))
    save_file({"unused": torch.zeros(1)}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="cannot build the AutoencoderRAE.*official release files"):
        load_diffusers_rae(folder)


def test_a_diffusers_without_autoencoder_rae_is_a_sentence(tmp_path, monkeypatch):
    import sys
    import types

    folder = tmp_path / "rae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderRAE"}))
    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(__version__="0.31.0"))  # no AutoencoderRAE
    with pytest.raises(CheckpointError, match=r"diffusers 0\.31\.0 has no AutoencoderRAE; upgrade diffusers"):
        load_diffusers_rae(folder)
