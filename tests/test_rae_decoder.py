"""The ViT decoder: official presets, parameter counts, strict and safe checkpoint loading."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from raebench.errors import CheckpointError
from raebench.rae.decoder import (
    DecoderConfig,
    RAEDecoder,
    build_decoder,
    count_parameters,
    load_decoder_weights,
    official_config,
    preset_config,
    save_official,
    sincos_pos_embed,
)
from raebench.tokenizers.rae import decoder_param_count

TINY = DecoderConfig(latent_dim=8, hidden_size=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4, grid_size=3)


@pytest.mark.parametrize("preset,expected", [("B", 86.4e6), ("L", 304.2e6), ("XL", 415.4e6)])
def test_preset_parameter_counts(preset, expected):
    """Counted on the meta device (nothing allocated) at the released setting: 768-wide DINOv2-B, 16x16 tokens."""
    cfg = preset_config(preset, latent_dim=768)
    n = count_parameters(cfg)
    assert abs(n - expected) / expected < 0.005
    assert n == decoder_param_count(768, cfg.hidden_size, cfg.depth, cfg.mlp_dim)


def test_xl_preset_matches_official_config():
    cfg = preset_config("XL", latent_dim=768)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps) == (1152, 28, 16, 4096, 1e-12)
    official = {  # configs/decoder/ViTXL/config.json of the official repository
        "decoder_hidden_size": 1152, "decoder_intermediate_size": 4096, "decoder_num_attention_heads": 16,
        "decoder_num_hidden_layers": 28, "hidden_size": 768, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "patch_size": "SHOULD BE RELOADED", "qkv_bias": True, "num_channels": 3,
    }
    assert official_config(official, latent_dim=768, patch_size=16, grid_size=16) == cfg


def test_sincos_positions_match_official_layout():
    from conftest import ORACLE

    if not (ORACLE / "decoder/model.pt").exists():
        pytest.skip("oracle fixtures not present")
    sd = torch.load(ORACLE / "decoder/model.pt", weights_only=True)
    d, n = sd["decoder_pos_embed"].shape[-1], sd["decoder_pos_embed"].shape[1]
    assert torch.allclose(sincos_pos_embed(d, int((n - 1) ** 0.5))[None], sd["decoder_pos_embed"], atol=1e-7)


def test_forward_shapes_and_resampled_grid():
    torch.manual_seed(0)
    dec = RAEDecoder(TINY).eval()
    assert dec(torch.randn(2, 8, 3, 3)).shape == (2, 3, 12, 12)
    assert dec(torch.randn(2, 8, 5, 5)).shape == (2, 3, 12, 12)  # other token grids are resampled
    # unpatchify puts token (i, j)'s values at pixels [i*p:(i+1)*p, j*p:(j+1)*p], channel last in the token
    patches = torch.zeros(1, 9, 4 * 4 * 3)
    patches[0, 5, 2] = 1.0  # token (1, 2), pixel (0, 0) of the patch, channel 2
    img = dec.unpatchify(patches)
    assert img[0, 2, 4, 8] == 1.0 and img.sum() == 1.0


def test_strict_loading_names_the_problem(tmp_path):
    dec = RAEDecoder(TINY)
    sd = dec.state_dict()
    load_decoder_weights(RAEDecoder(TINY), sd)  # exact fit loads

    bad = dict(sd)
    del bad["trainable_cls_token"]
    bad["decoder_layers.0.attention.attention.qkv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing keys: trainable_cls_token.*1 unexpected keys: decoder_layers.0.attention.attention.qkv.weight"):
        load_decoder_weights(RAEDecoder(TINY), bad)
    with pytest.raises(CheckpointError, match=r"decoder_embed.weight \(16, 8\) vs \(16, 12\)"):
        load_decoder_weights(RAEDecoder(DecoderConfig(**{**TINY.__dict__, "latent_dim": 12})), sd)
    with pytest.raises(CheckpointError, match="decoder_layers.2"):
        load_decoder_weights(RAEDecoder(DecoderConfig(**{**TINY.__dict__, "depth": 3})), sd)


def test_checkpoint_formats(tmp_path):
    torch.manual_seed(0)
    dec = RAEDecoder(TINY)
    sd = dec.state_dict()
    z = torch.randn(1, 8, 3, 3)
    ref = dec(z)
    # the official model.pt, a training checkpoint with EMA and DDP prefixes, a full RAE state dict, safetensors
    torch.save(sd, tmp_path / "model.pt")
    torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "model": {}, "step": 3}, tmp_path / "train.pt")
    torch.save({**{f"decoder.{k}": v for k, v in sd.items()}, "encoder.w": torch.zeros(1)}, tmp_path / "rae.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    for name in ("model.pt", "train.pt", "rae.pt", "model.safetensors"):
        assert torch.equal(build_decoder(TINY, tmp_path / name)(z), ref), name


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"decoder_embed.weight": Payload()}, f)
    with pytest.raises(CheckpointError):
        build_decoder(TINY, tmp_path / "evil.pt")
    assert not marker.exists()


def test_save_official_round_trip(tmp_path):
    torch.manual_seed(0)
    dec = RAEDecoder(TINY)
    save_official(dec, tmp_path / "dec")
    cfg = json.loads((tmp_path / "dec/config.json").read_text())
    back = official_config(tmp_path / "dec", latent_dim=cfg["hidden_size"], patch_size=cfg["patch_size"], grid_size=3)
    assert back == TINY
    z = torch.randn(1, 8, 3, 3)
    assert torch.equal(build_decoder(back, tmp_path / "dec/model.pt")(z), dec(z))


def test_save_official_killed_midway_leaves_the_earlier_files_whole(tmp_path, monkeypatch):
    from pathlib import Path

    dec = RAEDecoder(TINY)
    save_official(dec, tmp_path / "dec")
    before = (tmp_path / "dec/config.json").read_bytes()

    def half_then_die(self, data, *a, **k):  # a write cut off halfway (a kill, a full disk)
        with open(self, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_die)
    monkeypatch.setattr(Path, "write_text", half_then_die)
    with pytest.raises(OSError):
        save_official(RAEDecoder(TINY), tmp_path / "dec")
    monkeypatch.undo()
    assert (tmp_path / "dec/config.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["config.json", "model.pt"]  # no temporary left


def test_malformed_decoder_configs_are_checkpoint_errors(tmp_path):
    base = {"decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
            "decoder_intermediate_size": 32}
    with pytest.raises(CheckpointError, match="has a value of the wrong type"):
        official_config({**base, "decoder_num_hidden_layers": "two"}, latent_dim=8, patch_size=4, grid_size=3)
    for text, needle in [("{oops", "is not a readable JSON file"), ("[1]", "must hold a JSON object")]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=needle):
            official_config(tmp_path, latent_dim=8, patch_size=4, grid_size=3)


def test_dropout_configs_are_refused():
    with pytest.raises(CheckpointError, match="hidden_dropout_prob"):
        official_config(
            {"decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
             "decoder_intermediate_size": 32, "hidden_dropout_prob": 0.1},
            latent_dim=8, patch_size=4, grid_size=3,
        )


def _bilinear_half_pixel(z: np.ndarray, out: int) -> np.ndarray:
    """(C, h, w) -> (C, out, out): bilinear with pixel centres at i + 0.5 (align_corners=False), the
    source coordinate clamped at 0 and the last index, written out with numpy."""
    def axis(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, fr = axis(z.shape[1])
    c0, c1, fc = axis(z.shape[2])
    rows = z[:, r0] * (1 - fr)[None, :, None] + z[:, r1] * fr[None, :, None]
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc


def test_other_token_grids_are_resampled_bilinearly_with_half_pixel_centres():
    """The official ``interpolate_latent``: embedded tokens resized with bilinear, align_corners=False.
    The embedding is affine and bilinear weights sum to 1, so resampling the latent first is the same."""
    torch.manual_seed(0)
    dec = RAEDecoder(TINY).eval()
    for side in (5, 2):  # down- and upsampled to the decoder's 3 x 3 grid
        z = torch.randn(2, 8, side, side, dtype=torch.float64)
        z3 = torch.from_numpy(np.stack([_bilinear_half_pixel(x, 3) for x in z.numpy()]))
        with torch.no_grad():
            torch.testing.assert_close(dec(z.float()), dec(z3.float()), rtol=1e-5, atol=1e-5)
