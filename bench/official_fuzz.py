"""What ``check_official_configs.py`` runs on: the official RAE ``src/`` tree imported from a temporary
copy (:func:`load_official`, :func:`cwd` for its repository-relative paths), random tiny configurations
(:func:`random_config`, with :func:`tags` and :func:`describe` for the report) and the official-format
files each is written as (:func:`write_repo`: encoder and decoder folders, ``stat.pt``, stage-1 and
stage-2 checkpoints, the sampling YAML). Nothing here compares anything.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml


# ---------------------------------------------------------------------------------------------
# The official code
# ---------------------------------------------------------------------------------------------


def load_official(src: str) -> types.SimpleNamespace:
    """The official ``src/`` tree copied into a temporary folder and imported from there."""
    root = Path(src)
    if not root.exists():
        sys.exit(f"official RAE sources not found at {src}; clone the official RAE repository there "
                 "or pass --official-src / set RAE_OFFICIAL_SRC")
    tmp = Path(tempfile.mkdtemp(prefix="rae_official_"))
    atexit.register(shutil.rmtree, tmp, True)
    if (root / "src" / "stage1").is_dir():
        shutil.copytree(root / "src", tmp / "src")
    else:  # a bare git mirror
        tar = subprocess.run(["git", "--git-dir", str(root), "archive", "HEAD", "src"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    sys.path.insert(0, str(tmp / "src"))
    from stage1 import RAE  # noqa: F401  (official modules)
    from stage2.transport import Sampler, create_transport
    from utils.model_utils import instantiate_from_config
    from utils.train_utils import parse_configs

    return types.SimpleNamespace(instantiate=instantiate_from_config, create_transport=create_transport,
                                 Sampler=Sampler, parse_configs=parse_configs)


@contextlib.contextmanager
def cwd(path: Path):
    """Run the official code in the repository root, where its ``models/...`` paths resolve.

    The official decoder ``config.json`` holds ``"patch_size": "SHOULD BE RELOADED"``, which
    transformers >= 5 refuses when ``AutoConfig`` validates it; while the official code reads the file
    an int stands in (the official RAE overwrites it with ``decoder_patch_size`` anyway).
    """
    old = os.getcwd()
    dec = path / "models" / "decoder" / "config.json"
    text = dec.read_text() if dec.is_file() else None
    if text is not None:
        dec.write_text(json.dumps({**json.loads(text), "patch_size": 16}))
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
        if text is not None:
            dec.write_text(text)


# ---------------------------------------------------------------------------------------------
# Random configurations
# ---------------------------------------------------------------------------------------------


def _heads(rng: random.Random, head_dims=(8, 12, 16)) -> tuple[int, int]:
    heads, hd = rng.choice([1, 2, 4]), rng.choice(head_dims)
    return heads * hd, heads


def random_config(rng: random.Random) -> dict:
    c: dict = {}
    patch = rng.choice([14, 16])
    hidden, heads = _heads(rng, (8, 12))
    grid = rng.choice([2, 2, 3, 3, 4, 4, 6, 8])
    c["enc"] = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=rng.choice([1, 2]),
                    patch_size=patch, image_size=patch * rng.choice([2, 3, 5, 8]) + rng.choice([0, 0, 5]),
                    mlp_ratio=rng.choice([1, 2, 4]),
                    layer_norm_eps=rng.choice([1e-6, 1e-5, 1e-12]), use_swiglu_ffn=rng.random() < 0.25,
                    layerscale_value=rng.choice([1.0, 0.5]), num_register_tokens=4 if rng.random() < 0.97 else 0)
    c["input_size"] = patch * grid
    side = rng.randrange(20, 90)
    c["image"] = rng.choice([(c["input_size"],) * 2, (side, side), (side, rng.randrange(20, 90))])  # (H, W)
    c["batch"] = rng.randint(1, 4)
    c["normalize"] = rng.random() < 0.75
    # now and then the official MAE or SigLIP2 encoder class (HF ViTMAEForPreTraining / SiglipModel folders)
    c["encoder_cls"] = rng.choice(["Dinov2withNorm"] * 8 + ["MAEwNorm", "SigLIP2wNorm"])
    c["mean_std"] = rng.choice(["imagenet", "clip", "random"])
    c["noise_tau"] = rng.choice([0.0, 0.8])
    c["stats"] = rng.choice(["both"] * 12 + ["none"] * 3 + ["var"] * 4 + ["mean"])
    c["eps"] = rng.choice([None, 1e-6, 1e-3])
    dh, dheads = _heads(rng, (8, 16))
    c["dec"] = dict(decoder_hidden_size=dh, decoder_num_attention_heads=dheads,
                    decoder_num_hidden_layers=rng.choice([1, 2]), decoder_intermediate_size=dh * rng.choice([1, 2, 4]),
                    layer_norm_eps=rng.choice([1e-12, 1e-6]),
                    hidden_act=rng.choice(["gelu", "gelu", "gelu", "gelu_new", "relu", "silu"]),
                    qkv_bias=rng.random() < 0.8)
    for key in ("layer_norm_eps", "hidden_act", "qkv_bias"):  # left out: the ViTMAEConfig defaults
        if rng.random() < 0.1:
            del c["dec"][key]
    c["stage1_ckpt"] = rng.random() < 0.2  # stage_1.ckpt: an official stage-1 training checkpoint (EMA RAE)
    c["absolute_paths"] = rng.random() < 0.15  # the YAML names every file by its absolute path
    c["decoder_config_file"] = rng.random() < 0.15  # decoder_config_path names config.json itself
    c["separate_config"] = rng.random() < 0.2  # encoder_config_path a folder other than dinov2_path
    c["dec_patch"] = rng.choice([2, 4, 8, 16])
    ncls = rng.randint(1, 12)
    lightning = rng.random() < 0.12
    if lightning:
        use_rope = rng.random() < 0.8
        h, nh = _heads(rng, (8, 12, 16) if use_rope else (6, 8, 10))  # RoPE needs head_dim % 4 == 0
        while h % 4:  # the sin-cos table needs width % 4 == 0
            h, nh = _heads(rng, (6, 8, 10))
        p = 2 if grid % 2 == 0 and rng.random() < 0.3 else 1
        c["dit_target"] = "stage2.models.lightningDiT.LightningDiT"
        c["dit"] = dict(input_size=grid, patch_size=p, in_channels=hidden, hidden_size=h, depth=rng.choice([1, 2]),
                        num_heads=nh, mlp_ratio=rng.choice([2.0, 4.0, 2.5, 1.3]), class_dropout_prob=0.1, num_classes=ncls,
                        learn_sigma=rng.random() < 0.2, use_qknorm=rng.random() < 0.3, use_swiglu=rng.random() < 0.7,
                        use_rope=use_rope, use_rmsnorm=rng.random() < 0.7, wo_shift=rng.random() < 0.03)
    else:
        (h0, n0), (h1, n1) = _heads(rng), _heads(rng)
        patch_size = rng.choice([1] * 12 + [[1, 1]] * 3 + ([2] if grid % 2 == 0 else []))
        c["dit_target"] = "stage2.models.DDT.DiTwDDTHead"
        c["dit"] = dict(input_size=grid, patch_size=patch_size, in_channels=hidden, hidden_size=[h0, h1],
                        depth=[rng.choice([1, 2]), rng.choice([1, 2])], num_heads=[n0, n1],
                        mlp_ratio=rng.choice([2.0, 3.0, 4.0, 2.5, 1.7, 3.3]),
                        class_dropout_prob=0.0 if rng.random() < 0.1 else 0.1,
                        num_classes=ncls, use_qknorm=rng.random() < 0.3, use_swiglu=rng.random() < 0.7,
                        use_rope=rng.random() < 0.97, use_rmsnorm=rng.random() < 0.7, wo_shift=rng.random() < 0.03,
                        use_pos_embed=rng.random() < 0.8)
    if not lightning and n0 == n1 and rng.random() < 0.5:
        c["dit"]["num_heads"] = n0  # an int: the same heads in both parts
    c["ckpt_format"] = rng.choice(["ema", "ema", "training", "bare"])
    guided = not lightning and rng.random() < 0.3
    if guided:  # the official scripts run AutoGuidance on [x, x] with labels [y, null]: a null row is needed
        c["dit"]["class_dropout_prob"] = 0.1
        (g0, m0), (g1, m1) = _heads(rng, (8,)), _heads(rng, (8,))
        c["guide"] = {**c["dit"], "hidden_size": [g0, g1], "num_heads": [m0, m1], "depth": [1, 1]}
    c["guidance_method"] = "autoguidance" if guided else "cfg"
    has_null = not lightning and c["dit"]["class_dropout_prob"] > 0
    c["scale"] = rng.choice([1.0, 1.0, 0.8] + ([1.5, 3.0, 4.0] if (has_null or guided) else []))
    c["interval"] = rng.choice([None, (0.0, 1.0), (0.1, 0.8), (0.3, 0.95), (0.0, 0.5), (None, 0.6), (0.4, None)])
    c["dash"] = rng.random() < 0.6  # t-min / t-max as in the official sampling configs
    c["mode"] = "SDE" if rng.random() < 0.15 else "ODE"
    if c["mode"] == "SDE":
        c["method"] = rng.choice(["euler", "heun"])
        c["sde"] = dict(diffusion_form=rng.choice(["sigma", "linear", "decreasing"]), diffusion_norm=rng.choice([1.0, 0.5]),
                        last_step=rng.choice(["Mean", "Tweedie", "Euler"]), last_step_size=rng.choice([0.04, 0.1]))
    else:  # None: left out of the YAML (the official default, dopri5)
        c["method"] = rng.choice(["euler", "euler", "heun2", "heun2", "dopri5", None])
    c["num_steps"] = None if rng.random() < 0.05 else rng.randint(2, 12)  # None: left out (default 50, or 250 for SDE)
    c["null_label"] = rng.random() < 0.15  # misc.null_label written out (= num_classes)
    c["no_guidance_block"] = not guided and rng.random() < 0.1
    c["omit_solver_keys"] = rng.random() < 0.3
    dim = hidden * grid * grid
    c["shift_dim"] = None if rng.random() < 0.3 else rng.choice([dim, dim * 4, 512])
    c["shift_base"] = rng.choice([b for b in (1, 8, 16, 64, 256) if b <= (c["shift_dim"] or dim)])
    if c["shift_dim"] is None and dim >= 4096 and rng.random() < 0.5:
        c["shift_base"] = None  # both left out: sqrt(C*H*W / 4096) >= 1, which the official code requires
    return c


def tags(c: dict) -> list[str]:
    """What a configuration exercises, for the coverage line of the summary."""
    d = c["dit"]
    out = [f"encoder patch {c['enc']['patch_size']}", f"stats {c['stats']}",
           f"latent grid {c['input_size'] // c['enc']['patch_size']}",
           "DiT-DH" if "DDT" in c["dit_target"] else "LightningDiT", f"ckpt {c['ckpt_format']}",
           f"{c['mode']} {c['method'] or 'default'}", f"guidance {c['guidance_method']}"]
    out += [k for k in ("use_qknorm", "use_swiglu", "use_rmsnorm", "use_pos_embed") if d.get(k)]
    out += [k for k in ("separate_config", "stage1_ckpt", "absolute_paths", "decoder_config_file", "null_label") if c[k]]
    out += ["image != encoder input"] if c["image"] != (c["input_size"],) * 2 else []
    out += ["YAML guided (scale > 1)"] if c["scale"] > 1 else []
    out += ["normalize false"] if not c["normalize"] and c["encoder_cls"] == "Dinov2withNorm" else []
    out += [c["encoder_cls"]]
    return out


def describe(c: dict) -> str:
    e, d = c["enc"], c["dit"]
    dit = (f"DDT h{d['hidden_size']} d{d['depth']} nh{d['num_heads']} p{d['patch_size']}" if "DDT" in c["dit_target"]
           else f"Lightning h{d['hidden_size']} d{d['depth']} nh{d['num_heads']} p{d['patch_size']}")
    flags = "".join(k[0] if d.get(k) else "-" for k in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift"))
    flags += ("P" if d.get("use_pos_embed") else "-") if "DDT" in c["dit_target"] else ""
    return (f"{c['encoder_cls'][:6]} h{e['hidden_size']} L{e['num_hidden_layers']} nh{e['num_attention_heads']} p{e['patch_size']} "
            f"reg{e['num_register_tokens']} in{c['input_size']} img{c['image']} norm{int(c['normalize'])} "
            f"stats:{c['stats']} | dec h{c['dec']['decoder_hidden_size']} L{c['dec']['decoder_num_hidden_layers']} "
            f"p{c['dec_patch']} {c['dec'].get('hidden_act', '(gelu)')} | {dit} mlp{d['mlp_ratio']} {flags} "
            f"cls{d['num_classes']} {c['ckpt_format']} | {c['mode']} {c['method']} {c['num_steps']} "
            f"{c['guidance_method']} {c['scale']} {c['interval']}")


# ---------------------------------------------------------------------------------------------
# Official-format files
# ---------------------------------------------------------------------------------------------

MEAN_STD = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])}


def _randomise(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Fill zero-initialised layers (adaLN, outputs, CLS) so every output depends on every part."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("pos_embed"):
                p.add_(torch.randn_like(p) * scale)
    return model


def write_repo(root: Path, c: dict, off, seed: int) -> Path:
    """models/{encoder,decoder,stat.pt,DiTs/...} + configs/stage2/sampling/fuzz.yaml under ``root``."""
    import transformers

    models = root / "models"
    torch.manual_seed(seed)
    e = c["enc"]
    if c["encoder_cls"] == "MAEwNorm":
        enc = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
            hidden_size=e["hidden_size"], num_hidden_layers=e["num_hidden_layers"], patch_size=e["patch_size"],
            num_attention_heads=e["num_attention_heads"], intermediate_size=e["hidden_size"] * e["mlp_ratio"],
            image_size=e["patch_size"] * (e["image_size"] // e["patch_size"]), layer_norm_eps=e["layer_norm_eps"],
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32))
    elif c["encoder_cls"] == "SigLIP2wNorm":
        vision = dict(hidden_size=e["hidden_size"], num_hidden_layers=e["num_hidden_layers"],
                      num_attention_heads=e["num_attention_heads"], intermediate_size=e["hidden_size"] * e["mlp_ratio"],
                      patch_size=e["patch_size"], image_size=e["patch_size"] * (e["image_size"] // e["patch_size"]),
                      layer_norm_eps=e["layer_norm_eps"])
        text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=8)
        enc = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    else:
        enc = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**e))
    _randomise(enc, 0.02)
    enc.save_pretrained(models / "encoder")
    mean, std = MEAN_STD.get(c["mean_std"]) or ([round(random.Random(seed).uniform(0.3, 0.6), 4) for _ in range(3)],
                                                [round(random.Random(seed + 1).uniform(0.15, 0.35), 4) for _ in range(3)])
    (models / "encoder" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "image_mean": mean, "image_std": std, "do_normalize": True,
         "do_resize": True, "resample": 3, "size": {"shortest_edge": c["input_size"]},
         "crop_size": {"height": c["input_size"], "width": c["input_size"]}, "do_center_crop": True}))
    (models / "decoder").mkdir(parents=True)
    (models / "decoder" / "config.json").write_text(json.dumps({
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "hidden_size": 768, "image_size": 224,
        "patch_size": "SHOULD BE RELOADED", "num_channels": 3, "qkv_bias": True, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "mask_ratio": 0.75, "norm_pix_loss": False,
        "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072, **c["dec"]}))
    if c["separate_config"]:  # config.json + preprocessor_config.json alone, as a Hub id would give
        (models / "encoder_config").mkdir()
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(models / "encoder" / f, models / "encoder_config" / f)
        (models / "encoder" / "preprocessor_config.json").write_text(json.dumps(  # a decoy: not the one to read
            {"image_processor_type": "BitImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    stage1 = {"encoder_cls": c["encoder_cls"],
              "encoder_config_path": "models/encoder_config" if c["separate_config"] else "models/encoder",
              "encoder_input_size": c["input_size"],
              "encoder_params": ({"dinov2_path": "models/encoder", "normalize": c["normalize"]}
                                 if c["encoder_cls"] == "Dinov2withNorm" else {"model_name": "models/encoder"}),
              "decoder_config_path": "models/decoder", "decoder_patch_size": c["dec_patch"],
              "noise_tau": c["noise_tau"], "reshape_to_2d": True}
    with cwd(root):  # the decoder weights: the official RAE's own decoder, randomised
        rae = off.instantiate({"target": "stage1.RAE", "params": dict(stage1)})
    torch.save(_randomise(rae.decoder, 0.02).state_dict(), models / "decoder" / "model.pt")
    stage1["pretrained_decoder_path"] = "models/decoder/model.pt"
    grid = c["input_size"] // c["enc"]["patch_size"]
    C = c["enc"]["hidden_size"]
    if c["stats"] != "none":
        stats = {"mean": torch.randn(C, grid, grid) * 0.5, "var": torch.rand(C, grid, grid) * 2 + 0.1}
        if c["stats"] in ("mean", "var"):
            stats = {c["stats"]: stats[c["stats"]]}
        torch.save(stats, models / "stat.pt")
        stage1["normalization_stat_path"] = "models/stat.pt"
    if c["eps"] is not None:
        stage1["eps"] = c["eps"]
    s1 = {"target": "stage1.RAE", "params": stage1}
    if c["stage1_ckpt"]:  # src/train_stage1.py's checkpoint: whole-RAE state dicts; its EMA decoder is used
        with cwd(root):
            rae = off.instantiate({"target": "stage1.RAE", "params": dict(stage1)})
        _randomise(rae.decoder, 0.02)  # the encoder is frozen in training: its weights are those of the folder
        ema = rae.state_dict()
        torch.save({"model": {k: v + 0.1 for k, v in ema.items()}, "ema": ema, "optimizer": {}, "scheduler": None,
                    "disc": {}, "epoch": 1, "step": 10}, models / "stage1.pt")
        s1["ckpt"] = "models/stage1.pt"

    (models / "DiTs").mkdir()
    with cwd(root):
        dit = _randomise(off.instantiate({"target": c["dit_target"], "params": c["dit"]}))
    sd = dit.state_dict()
    if c["ckpt_format"] == "ema":
        torch.save({"ema": sd}, models / "DiTs" / "stage2_model.pt")
    elif c["ckpt_format"] == "training":
        raw = {k: v + 0.01 for k, v in sd.items()}
        torch.save({"model": raw, "ema": sd, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
                    "step": 10, "epoch": 1}, models / "DiTs" / "stage2_model.pt")
    else:
        torch.save(sd, models / "DiTs" / "stage2_model.pt")
    cfg = {"stage_1": s1,
           "stage_2": {"target": c["dit_target"], "params": c["dit"], "ckpt": "models/DiTs/stage2_model.pt"},
           "transport": {"params": {"path_type": "Linear", "prediction": "velocity", "time_dist_type": "uniform"}},
           "sampler": {"mode": c["mode"], "params": {}}}
    sp = cfg["sampler"]["params"]
    if c["method"] is not None:
        sp["sampling_method"] = c["method"]
    if c["num_steps"] is not None:
        sp["num_steps"] = c["num_steps"]
    if c["mode"] == "SDE":
        sp.update(c["sde"])
    elif not c["omit_solver_keys"]:
        sp.update(atol=1e-6, rtol=1e-3, reverse=False)
    guidance: dict = {"method": c["guidance_method"], "scale": c["scale"]}
    if c["interval"] is not None:
        for key, value in zip(("t-min", "t-max") if c["dash"] else ("t_min", "t_max"), c["interval"]):
            if value is not None:
                guidance[key] = value
    if "guide" in c:
        with cwd(root):
            guide = _randomise(off.instantiate({"target": c["dit_target"], "params": c["guide"]}))
        torch.save({"ema": guide.state_dict()}, models / "DiTs" / "guide.pt")
        guidance["guidance_model"] = {"target": c["dit_target"], "params": c["guide"], "ckpt": "models/DiTs/guide.pt"}
    if not c["no_guidance_block"]:
        cfg["guidance"] = guidance
    misc = {"latent_size": [C, grid, grid], "num_classes": c["dit"]["num_classes"]}
    if c["null_label"]:
        misc["null_label"] = c["dit"]["num_classes"]
    if c["shift_dim"] is not None:
        misc["time_dist_shift_dim"] = c["shift_dim"]
    if c["shift_base"] is not None:
        misc["time_dist_shift_base"] = c["shift_base"]
    cfg["misc"] = misc
    if c["decoder_config_file"]:
        stage1["decoder_config_path"] = "models/decoder/config.json"
    if c["absolute_paths"]:
        cfg = json.loads(json.dumps(cfg).replace('"models/', f'"{root}/models/'))
    path = root / "configs" / "stage2" / "sampling" / "fuzz.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
