"""LDM-format AutoencoderKL checkpoints (VA-VAE) as diffusers models: :func:`ldm_vae_config` infers the
diffusers config from the tensor shapes, :func:`convert_ldm_vae_state_dict` renames the keys (attention
1x1 convolutions become linear weights), :func:`load_ldm_vae` loads a checkpoint strictly (same keys,
same shapes) with ``torch.load(weights_only=True)``; ``_load_stats`` reads LightningDiT's
``latents_stats.pt``. The VA-VAE tokenizer built from them is in :mod:`raebench.tokenizers.vae`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raebench.errors import CheckpointError
from raebench.tokenizers.vae_presets import _diffusers_class

_LDM_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_ATTN_RENAMES = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))


def ldm_vae_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the diffusers AutoencoderKL config of an LDM KL checkpoint from its tensor shapes.

    Levels with ``down.{i}.attn`` / ``up.{i}.attn`` weights become Attn*Block2D (LDM's
    ``attn_resolutions``); GroupNorm uses 32 groups as in LDM's ``Normalize``.
    """
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError("not an LDM AutoencoderKL state dict: no encoder.down.* weights")
    block_out = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    attn_down = [any(k.startswith(f"encoder.down.{i}.attn.") for k in sd) for i in levels]
    attn_up = [any(k.startswith(f"decoder.up.{i}.attn.") for k in sd) for i in levels]
    latent = sd["quant_conv.weight"].shape[0] // 2 if "quant_conv.weight" in sd else sd["decoder.conv_in.weight"].shape[1]
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": latent,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn_down],
        # diffusers lists decoder blocks from the lowest resolution up; LDM indexes them from the top
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn_up)],
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "norm_num_groups": 32,
    }


def _ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    k = key
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    up = lambda m, what: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.{what}"  # noqa: E731
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: up(m, "resnets."), k)
    k = re.sub(r"^decoder\.up\.(\d+)\.attn\.", lambda m: up(m, "attentions."), k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: up(m, "upsamplers.0."), k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", k)
    k = k.replace(".norm_out.", ".conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.")
    if ".attentions." in k:
        head, leaf = k.rsplit(".attentions.", 1)
        idx, rest = leaf.split(".", 1)
        for old, new in _ATTN_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        k = f"{head}.attentions.{idx}.{rest}"
    return k


def convert_ldm_vae_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """LDM AutoencoderKL weights -> (diffusers config, diffusers state dict).

    Keys outside the autoencoder (``loss.*``, VA-VAE's foundation-model alignment heads) are dropped;
    attention 1x1 convolutions become linear weights.
    """
    sd = {k: v for k, v in sd.items() if k.startswith(_LDM_PREFIXES)}
    config = ldm_vae_config(sd)
    n = len(config["block_out_channels"])
    out = {}
    for k, v in sd.items():
        nk = _ldm_key_to_diffusers(k, n)
        if ".attentions." in nk and nk.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
        out[nk] = v
    return config, out


def _load_tensor_file(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with arbitrary objects: refuse rather than execute it
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read safely with torch.load(weights_only=True) "
            f"({type(e).__name__}); re-save its tensors (state_dict) with torch.save or safetensors."
        ) from None


def load_ldm_vae(ckpt: str | Path) -> nn.Module:
    """An LDM-format KL checkpoint (``{"state_dict": ...}`` or a bare state dict) as a diffusers AutoencoderKL.

    The converted tensors must match the model exactly (same key set, same shapes), as in nanoGPT's
    checkpoint import, so a wrong layout fails loudly instead of loading half a model.
    """
    obj = _load_tensor_file(Path(ckpt), "checkpoint")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{str(ckpt)!r} holds no state dict.")
    config, converted = convert_ldm_vae_state_dict(sd)
    cls = _diffusers_class("kl-ldm")
    vae = cls(**config)
    expected = vae.state_dict()
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(ckpt)!r} does not convert to a diffusers AutoencoderKL: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}) keys."
        )
    bad = [k for k in expected if expected[k].shape != converted[k].shape]
    if bad:
        raise CheckpointError(f"{str(ckpt)!r}: shape mismatch for {bad[:3]} after conversion.")
    vae.load_state_dict(converted, strict=True)
    return vae.float().eval()


def _load_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    obj = _load_tensor_file(path, "latent statistics")
    if not (isinstance(obj, dict) and "mean" in obj and "std" in obj):
        raise CheckpointError(f"{str(path)!r} should hold a dict with 'mean' and 'std' tensors (LightningDiT's latents_stats.pt).")
    mean, std = torch.as_tensor(obj["mean"]).float().flatten(), torch.as_tensor(obj["std"]).float().flatten()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError(f"{str(path)!r} has a non-finite mean or a std that is not positive and finite; "
                              "latents divided by it would be meaningless.")
    return mean, std


__all__ = ["convert_ldm_vae_state_dict", "ldm_vae_config", "load_ldm_vae"]
