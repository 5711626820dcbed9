"""Frozen encoders: the RAE recipe for each family, checked against independent computations."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from raebench.errors import CheckpointError, RaebenchError
from raebench.rae.encoders import HF_FAMILIES, load_hf_encoder, load_timm_encoder, wrap_hf_model

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def save_model(model, path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(mean), "image_std": list(std)}))
    return path


def images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_tokens(model, x, input_size, mean, std, **kw):
    """The official wrappers: resize, normalise, run the model with the final norm's affine removed."""
    x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return model(x, **kw).last_hidden_state


def test_siglip_vision_tower_from_full_checkpoint(tmp_path):
    """A full SiglipModel folder (as google/siglip2-base-patch16-256) loads its vision tower only."""
    torch.manual_seed(0)
    cfg = T.SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        vision_config=dict(image_size=32, patch_size=8, **TINY),
    )
    full = T.SiglipModel(cfg).eval()
    save_model(full, tmp_path)
    enc = load_hf_encoder(tmp_path, input_size=32)
    assert (enc.num_prefix_tokens, enc.patch_size, enc.grid_size) == (0, 8, 4)
    ref_model = full.vision_model
    ref_model.post_layernorm.weight = None  # exactly what the official SigLIP2wNorm does
    ref_model.post_layernorm.bias = None
    x = images(size=48)
    with torch.no_grad():
        ref = reference_tokens(ref_model, x, 32, (0.5,) * 3, (0.5,) * 3, interpolate_pos_encoding=True)
    z = enc(x)
    assert z.shape == (2, 32, 4, 4)
    assert (z - ref.transpose(1, 2).reshape(2, 32, 4, 4)).abs().max() < 1e-5
    assert not hasattr(enc.backbone, "head")


def test_mae_keeps_every_patch_in_order(tmp_path):
    """MAE with mask_ratio 0.75 in its config: no masking, no shuffling, interpolated positions."""
    torch.manual_seed(0)
    cfg = T.ViTMAEConfig(image_size=32, patch_size=8, mask_ratio=0.75, decoder_hidden_size=16,
                         decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32, **TINY)
    full = T.ViTMAEForPreTraining(cfg).eval()
    save_model(full, tmp_path, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    enc = load_hf_encoder(tmp_path, input_size=40)  # 5x5 tokens from a 4x4-position checkpoint
    x = images()
    z = enc(x)
    assert z.shape == (2, 32, 5, 5)
    # independent computation: patch embedding + interpolated positions, CLS, blocks, plain LN
    vit = full.vit
    xi = enc.preprocess(x)
    with torch.no_grad():
        emb = vit.embeddings
        pos = emb.interpolate_pos_encoding(torch.zeros(1, 26, 32), 40, 40)
        h = emb.patch_embeddings(xi) + pos[:, 1:]
        h = torch.cat([(emb.cls_token + pos[:, :1]).expand(2, -1, -1), h], dim=1)
        for layer in vit.layers:
            h = layer(h)
        h = F.layer_norm(h, (32,), eps=cfg.layer_norm_eps)[:, 1:]
    assert (z - h.transpose(1, 2).reshape(2, 32, 5, 5)).abs().max() < 1e-5
    assert torch.equal(enc(x), z)  # deterministic: nothing random left


def test_dinov2_affine_option_and_frozen(tmp_path):
    torch.manual_seed(0)
    model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=28, patch_size=14, num_register_tokens=2, **TINY))
    with torch.no_grad():
        model.layernorm.weight.uniform_(0.5, 2.0)
    save_model(model, tmp_path)
    plain = load_hf_encoder(tmp_path, input_size=28)
    affine = load_hf_encoder(tmp_path, input_size=28, affine_final_norm=True)
    assert plain.num_prefix_tokens == 3
    x = images(size=28)
    with torch.no_grad():
        ref = model(pixel_values=(x - 0.5) / 0.5).last_hidden_state[:, 3:]  # the model's own affine LN
    assert (affine(x) - ref.transpose(1, 2).reshape(2, 32, 2, 2)).abs().max() < 1e-5
    assert (plain(x) - affine(x)).abs().max() > 1e-3
    plain.train()
    assert not plain.backbone.training
    assert not any(p.requires_grad for p in plain.parameters())
    z = plain(x.requires_grad_(True))
    assert not z.requires_grad


@pytest.mark.parametrize(
    "model_type,make",
    [
        ("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(image_size=28, patch_size=14, **TINY))),
        ("vit", lambda: T.ViTModel(T.ViTConfig(image_size=28, patch_size=14, **TINY))),
        ("clip_vision_model", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(image_size=28, patch_size=14, **TINY))),
        ("dinov3_vit", lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(image_size=28, patch_size=14, num_register_tokens=4, **TINY))),
        ("ijepa", lambda: T.IJepaModel(T.IJepaConfig(image_size=28, patch_size=14, **TINY))),
    ],
)
def test_generic_hf_vits(model_type, make):
    """Any ViT of a supported model_type plugs in; prefix tokens and the pre-norm state are right."""
    assert model_type in HF_FAMILIES
    torch.manual_seed(0)
    model = make().eval()
    fam = HF_FAMILIES[model_type]
    x = images(size=28)
    xi = (x - 0.5) / 0.5
    with torch.no_grad():
        hs = model(pixel_values=xi, output_hidden_states=True).hidden_states[-1]  # last block, pre-norm
    eps = getattr(model, fam.norm_for_eps).eps
    enc = wrap_hf_model(model, model_type, input_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
    ref = F.layer_norm(hs, (32,), eps=eps)[:, enc.num_prefix_tokens :]
    assert (enc(x) - ref.transpose(1, 2).reshape(2, 32, 2, 2)).abs().max() < 1e-5


def test_timm_vit():
    timm = pytest.importorskip("timm")
    del timm
    enc = load_timm_encoder("vit_tiny_patch16_224.augreg_in21k", input_size=32, pretrained=False)
    assert (enc.hidden_size, enc.patch_size, enc.num_prefix_tokens) == (192, 16, 1)
    assert enc(images(size=50)).shape == (2, 192, 2, 2)


def test_folder_errors(tmp_path):
    model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=28, patch_size=14, **TINY))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_hf_encoder(tmp_path, input_size=28)
    save_model(model, tmp_path)
    with pytest.raises(RaebenchError, match="multiple of the encoder patch size 14"):
        load_hf_encoder(tmp_path, input_size=30)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip2"}))
    with pytest.raises(RaebenchError, match="NaFlex"):
        load_hf_encoder(tmp_path, input_size=28)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "resnet"}))
    with pytest.raises(RaebenchError, match="not supported"):
        load_hf_encoder(tmp_path, input_size=28)


def test_missing_backbone_weights_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=28, patch_size=14, **TINY))
    save_model(model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(k for k in sd if "layer.1" in k)
    save_file({k: v for k, v in sd.items() if k != dropped}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing \(encoder\.layer\.1\."):  # transformers 5 renames the key
        load_hf_encoder(tmp_path, input_size=28)


def test_broken_encoder_folders_are_checkpoint_errors(tmp_path):
    """A mis-shaped weight, a truncated safetensors file and invalid JSON are one-sentence errors."""
    from safetensors.torch import load_file, save_file

    model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=28, patch_size=14, **TINY))
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    intact = weights.read_bytes()
    sd = load_file(str(weights))
    key = next(k for k in sd if k.endswith("layer.0.mlp.fc1.bias"))
    save_file({**sd, key: torch.zeros(sd[key].numel() + 1)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 not matching in shape \(\('encoder\.layer\.0\.mlp\.fc1\.bias'"):
        load_hf_encoder(tmp_path, input_size=28)
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match="Cannot load the encoder"):
        load_hf_encoder(tmp_path, input_size=28)
    weights.write_bytes(intact)
    load_hf_encoder(tmp_path, input_size=28)  # intact again: loads
    for name in ("config.json", "preprocessor_config.json"):
        good = (tmp_path / name).read_text()
        (tmp_path / name).write_text("{not json")
        with pytest.raises(CheckpointError, match=f"{name}' is not a readable JSON file"):
            load_hf_encoder(tmp_path, input_size=28)
        (tmp_path / name).write_text("[1, 2]")
        with pytest.raises(CheckpointError, match="must hold a JSON object"):
            load_hf_encoder(tmp_path, input_size=28)
        (tmp_path / name).write_text(good)


def test_build_encoder_names(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from raebench.errors import MissingWeightsError
    from raebench.rae.encoders import build_encoder

    model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=28, patch_size=14, **TINY))
    save_model(model, tmp_path / "enc")
    assert build_encoder(str(tmp_path / "enc"), input_size=28).grid_size == 2  # a local folder by name
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="facebook/dinov2-with-registers-base"):
        build_encoder("dinov2-b", input_size=224)
    assert build_encoder("dinov2-b", input_size=28, local=tmp_path / "enc").source == "facebook/dinov2-with-registers-base"
    with pytest.raises(MissingWeightsError, match="no download source"):
        build_encoder("not-a-model", input_size=28)
