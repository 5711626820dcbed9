"""DiT-DH / LightningDiT: oracle velocities, strict loading, presets, the width rule."""

import json
import pickle
import warnings

import pytest
import torch

from raebench.errors import CheckpointError
from raebench.stage2.checkpoints import load_stage2_state, read_state_dict
from raebench.stage2.models import (
    MODELS, DiTDH, LightningDiT, WidthWarning, build_model, count_params, sincos_pos_embed_2d,
)

from conftest import ORACLE

pytestmark = pytest.mark.usefixtures("one_thread")


needs_oracle = pytest.mark.skipif(not (ORACLE / "ditdh_ema.pt").exists(), reason="oracle fixtures not present")


def oracle_model() -> DiTDH:
    meta = json.loads((ORACLE / "meta.json").read_text())
    return load_stage2_state(DiTDH(**meta["ditdh_params"]), ORACLE / "ditdh_ema.pt").eval()


def oracle_io() -> dict:
    from safetensors.torch import load_file

    return load_file(str(ORACLE / "ditdh_io.safetensors"))


@needs_oracle
def test_velocity_matches_official():
    model, io = oracle_model(), oracle_io()
    with torch.no_grad():
        v = model(io["dit_x"], io["dit_t"], io["dit_y"])
    assert v.shape == io["dit_v"].shape
    assert (v - io["dit_v"]).abs().max() < 1e-5


@needs_oracle
def test_fresh_buffers_match_checkpoint():
    """pos_embed and RoPE tables we compute equal the official ones stored in the checkpoint."""
    meta = json.loads((ORACLE / "meta.json").read_text())
    fresh = DiTDH(**meta["ditdh_params"]).state_dict()
    ckpt = read_state_dict(ORACLE / "ditdh_ema.pt")
    for k in ("pos_embed", "enc_feat_rope.freqs_cos", "enc_feat_rope.freqs_sin", "dec_feat_rope.freqs_sin"):
        torch.testing.assert_close(fresh[k], ckpt[k], atol=1e-6, rtol=0)


def _tiny(**kw) -> DiTDH:
    args = dict(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2), num_classes=5)
    return DiTDH(**{**args, **kw})


def test_strict_loading_lists_problems():
    model = _tiny()
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("s_projector.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["final_layer.linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_stage2_state(_tiny(), bad)
    msg = str(e.value)
    assert "missing: s_projector.weight" in msg and "unexpected: extra.weight" in msg
    assert "final_layer.linear.bias" in msg and "shape mismatch" in msg
    load_stage2_state(_tiny(), sd)  # the exact state loads


def test_checkpoint_file_roundtrip_and_unsafe_pickle(tmp_path):
    model = _tiny()
    torch.save({"ema": model.state_dict(), "model": {}}, tmp_path / "ck.pt")
    other = load_stage2_state(_tiny(), tmp_path / "ck.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"ema": Evil()}, protocol=2))
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "missing.pt")


@pytest.mark.parametrize("name", MODELS.names())
def test_presets_build_on_meta(name):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", WidthWarning)
        model = build_model(name, in_channels=768, input_size=16)
        out = model(torch.zeros(2, 768, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 768, 16, 16)


def test_ditdh_xl_parameter_count():
    with torch.device("meta"):
        model = build_model("ditdh-xl", in_channels=768, input_size=16)
    assert abs(count_params(model) / 1e6 - 838.7) < 0.05


def test_width_rule_warns():
    with pytest.warns(WidthWarning):
        _tiny(in_channels=40)  # 32 < 40
    with pytest.warns(WidthWarning):
        LightningDiT(input_size=4, in_channels=40, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WidthWarning)
        _tiny()


@pytest.mark.parametrize("kw", [dict(), dict(use_rope=False, use_pos_embed=False), dict(use_qknorm=True),
                                dict(use_swiglu=False, use_rmsnorm=False), dict(wo_shift=True),
                                dict(patch_size=2), dict(patch_size=[2, 1])])
def test_ditdh_variants_run_and_train(kw):
    """Every switch builds, runs forward/backward (the official code crashes on several of these)."""
    torch.manual_seed(0)
    model = _tiny(**kw)
    for p in model.parameters():  # leave adaLN-Zero so gradients reach every block
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 8, 4, 4)
    out = model(x, torch.rand(3), torch.tensor([0, 1, 5]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lightningdit_forward_and_keys():
    model = LightningDiT(input_size=4, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=5, learn_sigma=True)
    out = model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 5]))
    assert out.shape == (2, 8, 4, 4)
    keys = set(model.state_dict())
    assert {"pos_embed", "feat_rope.freqs_cos", "x_embedder.proj.weight", "blocks.1.mlp.w12.weight",
            "final_layer.adaLN_modulation.1.weight", "t_embedder.W", "y_embedder.embedding_table.weight"} <= keys


def test_sincos_table_layout():
    pe = sincos_pos_embed_2d(8, 3)  # first half: column index, second half: row index
    assert pe.shape == (9, 8)
    assert torch.equal(pe[0, :4], pe[3, :4]) and not torch.equal(pe[0, 4:], pe[3, 4:])
