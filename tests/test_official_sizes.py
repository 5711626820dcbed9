"""from_official_config on official-format files of other sizes, written with raebench's own code.

The oracle (../shared/oracle) covers one tiny configuration. Here a second one, with other sizes
everywhere (patch-16 encoder whose position table is interpolated, 24-channel 2x2 latents, decoder
patch 8, a qk-norm DiT-DH with 7 classes and mlp_ratio 2, a smaller AutoGuidance guide), is saved
in the official formats and laid out like the official repository: the YAML in
configs/stage2/sampling/ names every file as models/... relative to the repository root; the
stage-2 weights are the official training checkpoint (step, epoch, model, ema, optimizer,
scheduler). The checks are the YAML plumbing, strict loading, shapes and the sampler options of
the official scripts; reference values come from raebench's modules called directly, so the
official code is not needed.
"""

import json

import pytest
import torch
import yaml

from raebench.errors import RaebenchError
from raebench.stage2.models import DiTDH
from raebench.stage2.samplers import euler_maruyama, sample, sde_time_grid, stochastic_heun, velocity_fn

from test_stage2_samplers import Affine

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=16, image_size=224,
           num_register_tokens=4, mlp_ratio=2)  # 14x14 position table, used at 2x2: interpolated
INPUT = 32  # encoder input size: 2x2 tokens
DIT = dict(input_size=2, patch_size=1, in_channels=24, hidden_size=[48, 64], depth=[1, 1], num_heads=[2, 4],
           mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=7, use_qknorm=True, use_swiglu=True, use_rope=True,
           use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
GUIDE = {**DIT, "hidden_size": [32, 32], "num_heads": [2, 2]}


def _randomised(params: dict, seed: int) -> DiTDH:
    """A DiT-DH whose zero-initialised adaLN / output layers are filled, so the velocity is not 0."""
    torch.manual_seed(seed)
    model = DiTDH(**params).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _official_decoder_config(**sizes) -> dict:
    """configs/decoder/ViTB/config.json with other decoder sizes; hidden/patch/image are placeholders."""
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "hidden_size": 768,
            "image_size": 384, "patch_size": "SHOULD BE RELOADED", "num_channels": 3, "qkv_bias": True,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, **sizes}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """An official-layout folder: configs/stage2/sampling/tiny.yaml + models/{encoder,decoder,...}."""
    import transformers

    from raebench.rae.decoder import DecoderConfig, RAEDecoder
    from raebench.rae.stats import LatentStats

    root = tmp_path_factory.mktemp("RAE")
    models = root / "models"
    torch.manual_seed(0)
    enc = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**ENC))
    enc.save_pretrained(models / "encoder")
    (models / "encoder" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    (models / "decoder").mkdir()
    sizes = dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                 decoder_intermediate_size=64)
    (models / "decoder" / "config.json").write_text(json.dumps(_official_decoder_config(**sizes)))
    dec = RAEDecoder(DecoderConfig(latent_dim=24, hidden_size=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
                                   grid_size=2))
    torch.save(dec.state_dict(), models / "decoder" / "model.pt")
    LatentStats(torch.randn(24, 2, 2), torch.rand(24, 2, 2) + 0.5).save(models / "stat.pt")

    (models / "DiTs").mkdir()
    ema, raw = _randomised(DIT, 1), _randomised(DIT, 2)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    raw(torch.randn(2, 24, 2, 2), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    torch.save({"step": 1, "epoch": 0, "model": raw.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, models / "DiTs" / "stage2_model.pt")
    guide = _randomised(GUIDE, 3)
    torch.save({"ema": guide.state_dict()}, models / "DiTs" / "guide.pt")

    cfg = {
        "stage_1": {"target": "stage1.RAE", "params": {
            "encoder_cls": "Dinov2withNorm", "encoder_config_path": "models/encoder", "encoder_input_size": INPUT,
            "encoder_params": {"dinov2_path": "models/encoder", "normalize": True},
            "decoder_config_path": "models/decoder", "decoder_patch_size": 8,
            "pretrained_decoder_path": "models/decoder/model.pt", "noise_tau": 0.8, "reshape_to_2d": True,
            "normalization_stat_path": "models/stat.pt"}},
        "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": DIT, "ckpt": "models/DiTs/stage2_model.pt"},
        "transport": {"params": {"path_type": "Linear", "prediction": "velocity", "time_dist_type": "uniform"}},
        "sampler": {"mode": "ODE", "params": {"sampling_method": "heun2", "num_steps": 4, "atol": 1e-6,
                                              "rtol": 1e-3, "reverse": False}},
        "guidance": {"method": "autoguidance", "scale": 1.5, "t-min": 0.1, "t-max": 0.9,
                     "guidance_model": {"target": "stage2.models.DDT.DiTwDDTHead", "params": GUIDE,
                                        "ckpt": "models/DiTs/guide.pt"}},
        "misc": {"latent_size": [24, 2, 2], "num_classes": 7, "time_dist_shift_dim": 96, "time_dist_shift_base": 24},
    }
    write_yaml(root, cfg)
    return root, cfg, ema, raw, guide


def write_yaml(root, cfg: dict, name: str = "tiny"):
    path = root / "configs" / "stage2" / "sampling" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 24, 2, 2, generator=g), torch.tensor([0, 3, 6][:n])


def test_repo_layout_other_sizes(repo):
    """Every file found through models/... from three folders below, the EMA weights of the training
    checkpoint, the guide, and the YAML's sampler (heun2, 4 steps, AutoGuidance 1.5 in [0.1, 0.9])."""
    from raebench.official import from_official_config

    root, _, ema, raw, guide = repo
    obj = from_official_config(root / "configs" / "stage2" / "sampling" / "tiny.yaml")
    tok = obj.tokenizer
    assert tok.latent_shape() == (24, 2, 2) == obj.latent_size and tok.image_size == 16
    with torch.no_grad():
        z = tok.encode(torch.rand(2, 3, 40, 40))  # resized to the encoder's 32 px
        assert z.shape == (2, 24, 2, 2) and tok.decode(z).shape == (2, 3, 16, 16)
    for k, v in obj.model.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k  # 'ema', not the raw 'model' of the checkpoint
    assert not torch.equal(obj.model.state_dict()["x_embedder.proj.weight"], raw.state_dict()["x_embedder.proj.weight"])
    _, sampler = obj.stage2
    assert (sampler.method, sampler.num_steps, sampler.cfg_scale, sampler.cfg_interval) == ("heun", 4, 1.5, (0.1, 0.9))
    assert sampler.shift == 2.0 and sampler.null_class == 7
    for k, v in sampler.guide.state_dict().items():
        assert torch.equal(v, guide.state_dict()[k]), k
    x, y = inputs()
    ref = sample(ema, x, y, num_steps=4, method="heun", shift=2.0, cfg_scale=1.5, cfg_interval=(0.1, 0.9), guide=guide)
    assert (obj.sample(x, y) - ref).abs().max() < 1e-6
    assert (obj.sample(x, y) - sample(ema, x, y, num_steps=4, method="heun", shift=2.0)).abs().max() > 1e-3


def test_guidance_as_the_official_scripts(repo):
    """scale <= 1 does not guide (the official `if scale > 1`); misc.null_label is the CFG null class;
    a model without a null row cannot be guided."""
    from raebench.stage2.official import build_from_official

    root, cfg, ema, _, _ = repo
    x, y = inputs()
    low = {**cfg, "guidance": {**cfg["guidance"], "method": "cfg", "scale": 0.5}}
    _, s = build_from_official(low, base_dir=root)
    assert s.cfg_scale == 1.0 and s.guide is None
    assert (s(x, y) - sample(ema, x, y, num_steps=4, method="heun", shift=2.0)).abs().max() < 1e-6
    nl = {**cfg, "guidance": {"method": "cfg", "scale": 3.0}, "misc": {**cfg["misc"], "null_label": 2}}
    _, s = build_from_official(nl, base_dir=root)
    ref = sample(ema, x, y, num_steps=4, method="heun", shift=2.0, cfg_scale=3.0, null_class=2)
    assert s.null_class == 2 and (s(x, y) - ref).abs().max() < 1e-6
    assert (ref - sample(ema, x, y, num_steps=4, method="heun", shift=2.0, cfg_scale=3.0)).abs().max() > 1e-3
    bad = {**nl, "misc": {**cfg["misc"], "null_label": 8}}  # the table has rows 0..7
    with pytest.raises(RaebenchError, match="null class 8"):
        build_from_official(bad, base_dir=root)


def test_encoder_config_path_hub_id(repo, monkeypatch):
    """As in the released YAMLs, encoder_config_path a Hub id next to local weights: only its
    preprocessor_config.json (the input mean/std) is fetched; offline, the weights folder's is used."""
    from raebench import official
    from raebench.errors import MissingWeightsError

    root, cfg, *_ = repo
    hub = {**cfg, "stage_1": {**cfg["stage_1"], "params": {
        **cfg["stage_1"]["params"], "encoder_config_path": "facebook/dinov2-with-registers-base"}}}
    path = write_yaml(root, hub, "hub")
    proc = root / "hub_snapshot" / "preprocessor_config.json"
    proc.parent.mkdir(exist_ok=True)
    proc.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    asked = []

    def cached(src, local=None, **kw):
        asked.append(src.path_in_repo)
        return proc

    monkeypatch.setattr(official, "resolve", cached)
    enc = official.from_official_config(path).tokenizer.encoder
    assert asked == ["preprocessor_config.json"] and enc.std.flatten().tolist() == [0.25] * 3

    def offline(src, local=None, **kw):
        raise MissingWeightsError("not cached")

    monkeypatch.setattr(official, "resolve", offline)
    enc = official.from_official_config(path).tokenizer.encoder
    assert enc.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # models/encoder's own file


def test_cli_sample_with_repo_layout_yaml(repo, tmp_path, capsys):
    """`raebench sample --config configs/stage2/sampling/tiny.yaml` (relative models/... paths)."""
    import numpy as np

    from _cli import run

    root = repo[0]
    code, _, err = run(["sample", "--config", str(root / "configs/stage2/sampling/tiny.yaml"), "-n", "4", "-b", "2",
                        "--steps", "2", "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (4, 16, 16, 3) and arr["arr_0"].dtype == np.uint8 and set(arr["arr_1"]) <= set(range(7))


@pytest.mark.parametrize("solver", [euler_maruyama, stochastic_heun])
@pytest.mark.parametrize("guided", ["cfg", "autoguidance"])
def test_guided_sde_noise_is_the_official_doubled_batch(solver, guided):
    """The official scripts sample guided on [x, x] with labels [y, null] and keep the first half;
    forward_with_cfg/autoguidance give both halves the guided velocity of the first. So the first
    half of that doubled run, with its (2N, ...) noise draws, is what sample() returns for N."""
    m, n = Affine(), 3
    x = torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    guide = (lambda x, t, y: 0.5 * x) if guided == "autoguidance" else None
    vg = velocity_fn(m, y, 2.0, (0.2, 0.9), guide)

    def v_doubled(x2, t2):  # the official guided forward on the doubled batch
        return torch.cat([vg(x2[:n], t2[:n])] * 2)

    grid = sde_time_grid(6, 1.5, 0.04)
    ref = solver(v_doubled, torch.cat([x, x]), grid, 0.8, torch.Generator().manual_seed(3))[:n]
    method = "euler-maruyama" if solver is euler_maruyama else "sde-heun"
    out = sample(m, x, y, method=method, num_steps=6, shift=1.5, cfg_scale=2.0, cfg_interval=(0.2, 0.9),
                 guide=guide, diffusion_norm=0.8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.manual_seed(3)  # the global RNG (what the official code draws from) gives the same
    torch.testing.assert_close(sample(m, x, y, method=method, num_steps=6, shift=1.5, cfg_scale=2.0,
                                      cfg_interval=(0.2, 0.9), guide=guide, diffusion_norm=0.8), ref, rtol=0, atol=1e-6)
