"""RAE against the official implementation's outputs (../shared/oracle/rae-official-tiny).

The oracle files are loaded through the code paths that load the released checkpoints: the
registry builder (:func:`build_rae`) and the official-YAML reader (:func:`from_official_config`).
"""

import json
import re
import shutil

import pytest
import torch
import yaml

from conftest import ORACLE
from raebench.errors import CheckpointError, MissingWeightsError

needs_oracle = pytest.mark.skipif(not (ORACLE / "meta.json").exists(), reason="oracle fixtures not present")
pytestmark = needs_oracle

TOL = 1e-5


def oracle_io() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ORACLE / "rae_io.safetensors"))


def meta() -> dict:
    return json.loads((ORACLE / "meta.json").read_text())


def official_yaml(path, root, *, stage2: bool = False, **overrides) -> dict:
    """An official-format YAML (configs/stage1/pretrained/*.yaml) whose paths are relative to ``root``."""
    m = meta()
    params = {
        "encoder_cls": "Dinov2withNorm",
        "encoder_config_path": f"{root}/encoder",
        "encoder_input_size": m["encoder_input_size"],
        "encoder_params": {"dinov2_path": f"{root}/encoder", "normalize": True},
        "decoder_config_path": f"{root}/decoder",
        "decoder_patch_size": m["decoder_patch_size"],
        "pretrained_decoder_path": f"{root}/decoder/model.pt",
        "noise_tau": 0.0,
        "reshape_to_2d": True,
        "normalization_stat_path": f"{root}/stat.pt",
        **overrides,
    }
    cfg = {"stage_1": {"target": "stage1.RAE", "params": params}, "misc": {"latent_size": m["latent_shape"], "num_classes": 10}}
    if stage2:
        cfg["stage_2"] = {"target": "stage2.models.DDT.DiTwDDTHead", "params": m["ditdh_params"], "ckpt": f"{root}/ditdh_ema.pt"}
        cfg["transport"] = {"params": {"path_type": "Linear", "prediction": "velocity", "time_dist_type": "uniform"}}
        cfg["sampler"] = {"mode": "ODE", "params": {"sampling_method": "euler", "num_steps": 12}}
        cfg["guidance"] = {"method": "cfg", "scale": 1.0, "t-min": 0.0, "t-max": 1.0}
        cfg["misc"].update(time_dist_shift_dim=m["time_shift"]["dim"], time_dist_shift_base=m["time_shift"]["base"])
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def check_against_oracle(tok) -> None:
    io = oracle_io()
    with torch.no_grad():
        z = tok.encode(io["image"])
        x = tok.decode(io["latent"])
        x_rt = tok.decode(z)
    assert z.shape == io["latent"].shape
    assert (z - io["latent"]).abs().max() < TOL
    assert (x - io["reconstruction"]).abs().max() < TOL
    assert (x_rt - io["reconstruction"]).abs().max() < 1e-4  # full round trip from pixels
    # batch independence: one image at a time gives the same latents
    with torch.no_grad():
        z1 = torch.cat([tok.encode(io["image"][i : i + 1]) for i in range(io["image"].shape[0])])
    assert (z1 - z).abs().max() < TOL


def oracle_release():
    from raebench.tokenizers.rae import RAERelease

    m = meta()
    c = m["latent_shape"][0]
    return RAERelease(
        "rae-oracle-tiny", "tiny oracle", "facebook/dinov2-with-registers-base", c, m["encoder_patch_size"],
        m["image_size"], "decoders/x/model.pt", "stats/x/stat.pt", decoder_patch=m["decoder_patch_size"],
    )


def test_registry_builder_matches_oracle():
    """The builder used for `rae-dinov2-b` & co, given local encoder/decoder/stats files."""
    from raebench.tokenizers.rae import build_rae

    tok = build_rae(
        oracle_release(), encoder=ORACLE / "encoder", decoder=ORACLE / "decoder", stats=ORACLE / "stat.pt"
    ).eval()
    check_against_oracle(tok)
    assert tok.latent_shape() == tuple(meta()["latent_shape"])
    assert tok.image_size == meta()["image_size"]
    assert tok.weights_id.startswith("local:model.pt@")


def test_weights_folder_layout(tmp_path):
    """--weights DIR laid out like RAE-collections, with the encoder under DIR/<repo id>."""
    from raebench.tokenizers.rae import build_rae

    r = oracle_release()
    (tmp_path / "decoders/x").mkdir(parents=True)
    (tmp_path / "stats/x").mkdir(parents=True)
    (tmp_path / "decoders/x/model.pt").symlink_to(ORACLE / "decoder/model.pt")
    (tmp_path / "stats/x/stat.pt").symlink_to(ORACLE / "stat.pt")
    shutil.copytree(ORACLE / "encoder", tmp_path / r.encoder_repo)
    from dataclasses import replace

    from raebench.rae import decoder as dec

    # the released decoders are ViT-XL; the oracle's is tiny, so point the release at its preset
    cfg = json.loads((ORACLE / "decoder/config.json").read_text())
    tiny = dict(hidden_size=cfg["decoder_hidden_size"], depth=cfg["decoder_num_hidden_layers"],
                num_heads=cfg["decoder_num_attention_heads"], mlp_dim=cfg["decoder_intermediate_size"])
    dec.DECODER_PRESETS["TINY-ORACLE"] = tiny
    try:
        tok = build_rae(replace(r, decoder_preset="TINY-ORACLE"), weights=tmp_path).eval()
    finally:
        del dec.DECODER_PRESETS["TINY-ORACLE"]
    check_against_oracle(tok)


def test_from_official_config_absolute_paths(tmp_path):
    from raebench.official import from_official_config

    official_yaml(tmp_path / "rae.yaml", ORACLE)
    obj = from_official_config(tmp_path / "rae.yaml")
    check_against_oracle(obj.tokenizer)
    assert obj.latent_size == tuple(meta()["latent_shape"])
    assert not obj.tokenizer.training


def test_from_official_config_relative_paths(tmp_path):
    """Paths relative to a folder above the YAML, as in the official repo (configs/stage1/...)."""
    from raebench.official import from_official_config

    repo = tmp_path / "RAE"
    (repo / "configs/stage1/pretrained").mkdir(parents=True)
    (repo / "models").symlink_to(ORACLE)
    official_yaml(repo / "configs/stage1/pretrained/tiny.yaml", "models")
    obj = from_official_config(repo / "configs/stage1/pretrained/tiny.yaml")
    check_against_oracle(obj.tokenizer)


def test_official_config_stage2_hook(tmp_path):
    """`.model` and `.sample` delegate to raebench.stage2.official.build_from_official."""
    pytest.importorskip("raebench.stage2.official")
    from safetensors.torch import load_file

    from raebench.official import from_official_config

    official_yaml(tmp_path / "rae.yaml", ORACLE, stage2=True)
    obj = from_official_config(tmp_path / "rae.yaml")
    io = load_file(str(ORACLE / "ditdh_io.safetensors"))
    with torch.no_grad():
        assert (obj.model(io["dit_x"], io["dit_t"], io["dit_y"]) - io["dit_v"]).abs().max() < 1e-5
        assert (obj.sample(io["sample_noise"], io["dit_y"]) - io["sample_euler_12"]).abs().max() < 1e-4
    assert obj.model is obj.model  # built once


def test_official_config_errors(tmp_path):
    from raebench.errors import RaebenchError
    from raebench.official import from_official_config

    official_yaml(tmp_path / "a.yaml", ORACLE, normalization_stat_path="nowhere/stat.pt")
    with pytest.raises(MissingWeightsError, match="nowhere/stat.pt"):
        from_official_config(tmp_path / "a.yaml")
    official_yaml(tmp_path / "b.yaml", ORACLE, encoder_input_sise=56)
    with pytest.raises(RaebenchError, match="encoder_input_sise"):
        from_official_config(tmp_path / "b.yaml")
    official_yaml(tmp_path / "c.yaml", ORACLE, decoder_patch_size=8)  # 8x8 patches: the checkpoint has 16x16
    with pytest.raises(CheckpointError, match="decoder_pred"):
        from_official_config(tmp_path / "c.yaml")
    official_yaml(tmp_path / "d.yaml", ORACLE)
    obj = from_official_config(tmp_path / "d.yaml")
    with pytest.raises(RaebenchError, match="stage_2"):
        obj.model
    # malformed YAMLs are one sentence naming the file, not an OmegaConf/TypeError traceback
    good = (tmp_path / "d.yaml").read_text()
    for name, text, needle in [
        ("list", "- a\n- b\n", "is a YAML list, not a mapping of blocks"),
        ("interp", good + "extra: ${nowhere.x}\n", "cannot be resolved (InterpolationKeyError"),
        ("scalar", "stage_1: 5\n", "has a stage_1 that is not a block"),
        ("params", "stage_1:\n  target: stage1.RAE\n  params: [1, 2]\n", "has a malformed stage_1 block (TypeError"),
        ("size", good.replace("encoder_input_size: 56", "encoder_input_size: abc"), "malformed stage_1 block (ValueError"),
    ]:
        (tmp_path / f"{name}.yaml").write_text(text)
        with pytest.raises(RaebenchError, match=re.escape(needle)):
            from_official_config(tmp_path / f"{name}.yaml")
    official_yaml(tmp_path / "e.yaml", ORACLE, normalization_stat_path=str(ORACLE))  # a folder for a file
    with pytest.raises(MissingWeightsError, match="is a folder; give the file itself"):
        from_official_config(tmp_path / "e.yaml")


def test_official_config_preset_fallback_and_hub_paths(tmp_path, monkeypatch):
    """`configs/decoder/ViTXL` without the official repo -> the built-in preset; `models/...` -> the Hub."""
    from raebench import official

    seen = []

    def fake_resolve(src, local=None, **kw):
        seen.append(str(src))
        raise MissingWeightsError("not cached")

    monkeypatch.setattr(official, "resolve", fake_resolve)
    with pytest.raises(MissingWeightsError):
        official.resolve_official_path("models/decoders/dinov2/wReg_base/ViTXL_n08/model.pt", tmp_path, what="decoder")
    assert seen[-1] == "hf://nyu-visionx/RAE-collections:decoders/dinov2/wReg_base/ViTXL_n08/model.pt"
    with pytest.raises(MissingWeightsError):
        official.resolve_official_path("facebook/dinov2-with-registers-base", tmp_path, what="encoder", kind="repo")
    assert seen[-1] == "hf://facebook/dinov2-with-registers-base"
    assert official._PRESET_RE.search("configs/decoder/ViTXL").group(1) == "XL"


def test_stats_features_of_an_official_yaml_are_a_module_the_command_moves(tmp_path):
    """`raebench stats --tokenizer-config` got ``tok.encode_features``, a bound method that the command's
    ``fn.to(dev)`` (done for modules only) never moved: on a GPU the CPU encoder met CUDA images."""
    from raebench.cli.rae_cmds import feature_extractor
    from raebench.official import from_official_config

    official_yaml(tmp_path / "rae.yaml", ORACLE)
    fn, label = feature_extractor(tokenizer_config=str(tmp_path / "rae.yaml"))
    assert isinstance(fn, torch.nn.Module) and label == "rae" and not fn.training
    x = oracle_io()["image"]
    with torch.no_grad():
        assert torch.equal(fn(x), from_official_config(tmp_path / "rae.yaml").tokenizer.encode_features(x))
