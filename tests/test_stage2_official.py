"""Official RAE YAML -> (model, sampler), checked against the official samples."""

import json

import pytest
import torch
import yaml

from raebench.errors import CheckpointError, RaebenchError
from raebench.stage2.official import build_from_official

from conftest import ORACLE
from test_stage2_models import needs_oracle, oracle_io


pytestmark = [needs_oracle, pytest.mark.usefixtures("one_thread")]


def official_yaml(tmp_path, **guidance) -> dict:
    """An official-format config (as in configs/stage2/sampling/...) for the tiny oracle model."""
    meta = json.loads((ORACLE / "meta.json").read_text())
    (tmp_path / "models").mkdir(exist_ok=True)
    link = tmp_path / "models" / "stage2_model.pt"
    if not link.exists():
        link.symlink_to(ORACLE / "ditdh_ema.pt")
    cfg = {
        "stage_1": {"target": "stage1.RAE", "params": {
            "encoder_cls": "Dinov2withNorm", "encoder_config_path": f"{ORACLE}/encoder",
            "encoder_input_size": meta["encoder_input_size"],
            "encoder_params": {"dinov2_path": f"{ORACLE}/encoder", "normalize": True},
            "decoder_config_path": f"{ORACLE}/decoder", "decoder_patch_size": meta["decoder_patch_size"],
            "pretrained_decoder_path": f"{ORACLE}/decoder/model.pt", "noise_tau": 0.0, "reshape_to_2d": True,
            "normalization_stat_path": f"{ORACLE}/stat.pt"}},
        "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": meta["ditdh_params"],
                    "ckpt": "models/stage2_model.pt"},
        "transport": {"params": {"path_type": "Linear", "prediction": "velocity", "time_dist_type": "uniform"}},
        "sampler": {"mode": "ODE", "params": {"sampling_method": "euler", "num_steps": 12, "atol": 1e-6,
                                               "rtol": 1e-3, "reverse": False}},
        "guidance": {"method": "cfg", "scale": 1.0, "t-min": 0.0, "t-max": 1.0, **guidance},
        "misc": {"latent_size": meta["latent_shape"], "num_classes": 10,
                 "time_dist_shift_dim": meta["time_shift"]["dim"], "time_dist_shift_base": meta["time_shift"]["base"]},
    }
    (tmp_path / "official.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def test_yaml_defaults_and_overrides(tmp_path):
    cfg = official_yaml(tmp_path)
    io = oracle_io()
    model, sample_fn = build_from_official(cfg, base_dir=tmp_path)
    with torch.no_grad():
        assert (model(io["dit_x"], io["dit_t"], io["dit_y"]) - io["dit_v"]).abs().max() < 1e-5
    z, y = io["sample_noise"], io["dit_y"]
    assert (sample_fn(z, y) - io["sample_euler_12"]).abs().max() < 1e-4  # all from the YAML
    out = sample_fn(z, y, num_steps=6, method="heun", cfg_scale=3.0, cfg_interval=(0.1, 0.8))
    assert (out - io["sample_heun2_6_cfg3_interval_0.1_0.8"]).abs().max() < 1e-4


def test_yaml_guidance_block_dashed_keys(tmp_path):
    """The official sampling configs spell the interval t-min/t-max; the guidance comes from the YAML."""
    from omegaconf import OmegaConf

    official_yaml(tmp_path, scale=3.0, **{"t-min": 0.1, "t-max": 0.8})
    cfg = OmegaConf.load(tmp_path / "official.yaml")
    _, sample_fn = build_from_official(cfg, base_dir=tmp_path)
    io = oracle_io()
    assert sample_fn.cfg_interval == (0.1, 0.8) and sample_fn.cfg_scale == 3.0
    assert (sample_fn(io["sample_noise"], io["dit_y"]) - io["sample_euler_12_cfg3_interval_0.1_0.8"]).abs().max() < 1e-4


def test_yaml_errors(tmp_path):
    cfg = official_yaml(tmp_path)
    cfg["stage_2"]["params"] = {**cfg["stage_2"]["params"], "hidden_size": [64, 128]}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_from_official(cfg, base_dir=tmp_path)
    cfg = official_yaml(tmp_path)
    cfg["stage_2"]["params"] = {**cfg["stage_2"]["params"], "hiden_size": 3}
    with pytest.raises(RaebenchError, match="hiden_size"):
        build_from_official(cfg, base_dir=tmp_path)
    cfg = official_yaml(tmp_path)
    cfg["stage_2"]["ckpt"] = "models/nope.pt"
    with pytest.raises(CheckpointError, match="not found"):
        build_from_official(cfg, base_dir=tmp_path)


def test_autoguidance_from_yaml(tmp_path):
    """A guide identical to the main model leaves the velocity unguided: v_g + s (v - v_g) = v."""
    cfg = official_yaml(tmp_path)
    cfg["guidance"] = {"method": "autoguidance", "scale": 1.5, "t_min": 0.0, "t_max": 1.0,
                       "guidance_model": dict(cfg["stage_2"])}
    _, sample_fn = build_from_official(cfg, base_dir=tmp_path)
    assert sample_fn.guide is not None
    io = oracle_io()
    assert (sample_fn(io["sample_noise"], io["dit_y"]) - io["sample_euler_12"]).abs().max() < 1e-4


def test_through_from_official_config(tmp_path):
    """The public entry point raebench.from_official_config(path).model / .sample, end to end."""
    try:
        from raebench.official import from_official_config
    except ImportError:
        pytest.skip("raebench.official not available yet")
    official_yaml(tmp_path, scale=3.0, t_min=0.1, t_max=0.8)
    obj = from_official_config(tmp_path / "official.yaml")
    io = oracle_io()
    z, y = io["sample_noise"], io["dit_y"]
    with torch.no_grad():
        assert (obj.model(io["dit_x"], io["dit_t"], y) - io["dit_v"]).abs().max() < 1e-5
    assert (obj.sample(z, y) - io["sample_euler_12_cfg3_interval_0.1_0.8"]).abs().max() < 1e-4
    plain = obj.sample(z, y, num_steps=12, method="euler", cfg_scale=1.0)
    assert (plain - io["sample_euler_12"]).abs().max() < 1e-4
    assert (obj.sample(z, y, num_steps=6, method="heun", cfg_scale=1.0) - io["sample_heun2_6"]).abs().max() < 1e-4
    with torch.no_grad():
        img = obj.tokenizer.decode(plain)
    assert (img - io["sample_euler_12_decoded"]).abs().max() < 1e-3


def test_yaml_sde_options(tmp_path):
    """mode SDE: the Euler-Maruyama options come from the YAML; SBDM (NaN officially) is refused;
    sampling_method heun is the official stochastic Heun."""
    cfg = official_yaml(tmp_path)
    cfg["sampler"] = {"mode": "SDE", "params": {"sampling_method": "euler", "num_steps": 6, "diffusion_norm": 0.5,
                                                "diffusion_form": "linear", "last_step": "Tweedie",
                                                "last_step_size": 0.05}}
    _, sample_fn = build_from_official(cfg, base_dir=tmp_path)
    assert (sample_fn.method, sample_fn.diffusion_form, sample_fn.last_step, sample_fn.last_step_size,
            sample_fn.diffusion_norm) == ("euler-maruyama", "linear", "Tweedie", 0.05, 0.5)
    io = oracle_io()
    a = sample_fn(io["sample_noise"], io["dit_y"], generator=torch.Generator().manual_seed(0))
    b = sample_fn(io["sample_noise"], io["dit_y"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    cfg["sampler"]["params"] = {"num_steps": 6}
    assert build_from_official(cfg, base_dir=tmp_path)[1].diffusion_form == "sigma"  # not the official SBDM
    cfg["sampler"]["params"] = {"num_steps": 6, "sampling_method": "heun"}
    assert build_from_official(cfg, base_dir=tmp_path)[1].method == "sde-heun"
    for bad in ({"diffusion_form": "SBDM"}, {"last_step": "Heun"}, {"sampling_method": "midpoint"}):
        cfg["sampler"]["params"] = {"num_steps": 6, **bad}
        with pytest.raises(RaebenchError):
            build_from_official(cfg, base_dir=tmp_path)


def test_yaml_sampler_defaults_and_unknown_keys(tmp_path):
    """num_steps defaults as the official sample_ode (50) and sample_sde (250); keys the official
    samplers do not take fail there (TypeError), so they are refused here rather than ignored."""
    cfg = official_yaml(tmp_path)
    cfg["sampler"] = {"mode": "SDE", "params": {"sampling_method": "euler"}}
    assert build_from_official(cfg, base_dir=tmp_path)[1].num_steps == 250
    cfg["sampler"] = {"mode": "ODE", "params": {"sampling_method": "euler"}}
    assert build_from_official(cfg, base_dir=tmp_path)[1].num_steps == 50
    bad = [({"mode": "ODE", "params": {"sampling_method": "euler", "steps": 12}}, "'steps'"),
           ({"mode": "SDE", "params": {"atol": 1e-6}}, "'atol'"),
           ({"mode": "ODE", "params": {"sampling_method": "euler", "reverse": True}}, "reverse"),
           ({"mode": "ODE", "params": {"sampling_method": "rk4"}}, "rk4"),
           ({"mode": "ODE", "params": {"sampling_method": "euler-maruyama"}}, "SDE"),
           ({"mode": "PF", "params": {}}, "mode")]
    for sampler, match in bad:
        cfg["sampler"] = sampler
        with pytest.raises(RaebenchError, match=match):
            build_from_official(cfg, base_dir=tmp_path)


def test_autoguidance_yaml_with_scale_one_guides_when_asked(tmp_path):
    """An AutoGuidance YAML at scale 1 samples unguided without loading its guide; a cfg_scale > 1
    asked later guides with that guide (AutoGuidance, not classifier-free guidance)."""
    from raebench.errors import CheckpointError
    from raebench.stage2.official import build_official_model
    from raebench.stage2.samplers import sample

    cfg = official_yaml(tmp_path)
    model, cfg_sampler = build_from_official(cfg, base_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    guide_sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}
    torch.save({"ema": guide_sd}, tmp_path / "models" / "guide.pt")
    section = {**cfg["stage_2"], "ckpt": "models/guide.pt"}
    cfg["guidance"] = {"method": "autoguidance", "scale": 1.0, "guidance_model": section}
    _, ag_sampler = build_from_official(cfg, base_dir=tmp_path)
    io = oracle_io()
    z, y = io["sample_noise"], io["dit_y"]
    assert (ag_sampler(z, y) - io["sample_euler_12"]).abs().max() < 1e-4  # the YAML's scale: unguided
    guide = build_official_model(section, tmp_path)
    want = sample(model, z, y, num_steps=12, method="euler", shift=ag_sampler.shift, cfg_scale=1.5, guide=guide)
    got = ag_sampler(z, y, cfg_scale=1.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - cfg_sampler(z, y, cfg_scale=1.5)).abs().max() > 1e-3  # not classifier-free guidance
    # the guide is loaded only when guidance is asked for
    (tmp_path / "models" / "guide.pt").unlink()
    _, lazy = build_from_official(cfg, base_dir=tmp_path)
    assert (lazy(z, y) - io["sample_euler_12"]).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match="not found"):
        lazy(z, y, cfg_scale=1.5)


def test_malformed_yaml_values_are_named_before_any_sampling(tmp_path):
    """Each malformed value is one RaebenchError naming it at build time, not a raw traceback (or a
    silent misreading) once sampling starts; misc must agree with the model it describes."""
    import copy

    base = official_yaml(tmp_path)

    def edited(path, value):
        cfg = copy.deepcopy(base)
        *head, last = path
        d = cfg
        for k in head:
            d = d[k]
        d[last] = value
        return cfg

    bad = [
        (("guidance", "method"), "AutoGuidance", "guidance.method 'AutoGuidance' is not cfg or autoguidance"),
        (("guidance", "method"), "cfgg", "not cfg or autoguidance"),
        (("guidance", "scale"), "abc", r"`guidance.scale` must be a number, got 'abc'"),
        (("sampler", "params", "num_steps"), "fifty", "`sampler.params.num_steps` must be an integer"),
        (("sampler", "params", "num_steps"), 1, "num_steps must be at least 2"),
        (("sampler", "params", "num_steps"), 2.5, "must be an integer"),
        (("stage_2",), [1, 2], "`stage_2` in the YAML must be a block"),
        (("sampler",), ["ODE"], "`sampler` in the YAML must be a block"),
        (("guidance",), [1], "`guidance` in the YAML must be a block"),
        (("transport", "params"), [1], "`transport.params` in the YAML must be a block"),
        (("misc",), [1], "`misc` in the YAML must be a block"),
        (("guidance", "t-max"), -0.5, "t_min < t_max, got 0.0 and -0.5"),  # refused at scale 1 too
        (("misc", "latent_size"), [16, 4, 4], r"misc.latent_size \[16, 4, 4\] is not the stage-2 model's latent shape"),
        (("misc", "num_classes"), 11, "misc.num_classes 11 is not between 1 and the 10 classes .*label 10 is its null"),
        (("misc", "num_classes"), 0, "not between 1 and"),
        (("misc", "time_dist_shift_base"), 0, "must be positive"),
        (("sampler", "params", "atol"), "tight", "`sampler.params.atol` must be a number"),
    ]
    for path, value, match in bad:
        with pytest.raises(RaebenchError, match=match):
            build_from_official(edited(path, value), base_dir=tmp_path)
    # the values the official configs use still load: misc.num_classes at most the model's, ints as floats
    assert build_from_official(edited(("misc", "num_classes"), 10), base_dir=tmp_path)[1].num_steps == 12
    assert build_from_official(edited(("sampler", "params", "num_steps"), 12.0), base_dir=tmp_path)[1].num_steps == 12


def test_a_missing_yaml_path_says_where_it_looked_not_a_flag_it_lacks(tmp_path, monkeypatch):
    """A path of an official YAML that is found nowhere told users to "pass a local copy with --weights",
    a flag `sample --config` does not have; it now says the YAML path supplies it and where it looked."""
    from raebench.errors import MissingWeightsError
    from raebench.official import resolve_official_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for value, kind in (("models/decoders/dinov2/x/model.pt", "file"), ("facebook/no-such-encoder", "repo")):
        with pytest.raises(MissingWeightsError) as e:
            resolve_official_path(value, tmp_path, what="thing", kind=kind)
        msg = str(e.value)
        assert "--weights" not in msg and "its path in the YAML" in msg and str(tmp_path) in msg, msg
