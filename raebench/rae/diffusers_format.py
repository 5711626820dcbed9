"""RAEs saved in diffusers' format (``diffusers.AutoencoderRAE``) as raebench tokenizers.

The RAE authors also publish their releases converted to diffusers (``nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08``
and siblings: one folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` holding encoder, decoder
and latent statistics). This module reads such a folder into the same :class:`RAETokenizer` the official files
give, so both formats run through one implementation:

* the encoder is diffusers' own transformers model, wrapped like any RAE encoder (plain final LayerNorm, prefix
  tokens dropped);
* the decoder weights map one to one onto the official ViT-MAE decoder keys, except the attention projections,
  which diffusers names ``to_q``/``to_k``/``to_v``/``to_out.0``. The fixed sin-cos positions are not stored;
  raebench computes the official (MAE) ones. diffusers' own ``RAEDecoder`` builds them with
  ``get_2d_sincos_pos_embed(..., base_size=16)``, which scales positions by 16 / grid: equal to the official
  positions for a 16 x 16 token grid (the 256 px releases) and different for any other grid (the 512 px
  release's 32 x 32), so there diffusers' own decode and the official one disagree and raebench follows the
  official one;
* diffusers normalises latents as ``(z - mean) / (std + 1e-5) * scaling_factor`` where the official code uses
  ``(z - mean) / sqrt(var + 1e-5)``: the statistics are converted so that both give the same latents.

Weights are read with safetensors only (``use_safetensors=True``): a pickled ``.bin`` folder is refused.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch

from raebench.checkpoint import strict_from_pretrained
from raebench.errors import CheckpointError, MissingWeightsError

#: diffusers' decoder attention names -> the official (ViT-MAE) ones
ATTENTION_KEYS = {
    "attention.to_q.": "attention.attention.query.",
    "attention.to_k.": "attention.attention.key.",
    "attention.to_v.": "attention.attention.value.",
    "attention.to_out.0.": "attention.output.dense.",
}
#: diffusers' encoder_type -> the transformers model_type it builds
ENCODER_TYPES = {"dinov2": "dinov2_with_registers", "siglip2": "siglip_vision_model", "mae": "vit_mae"}
DIFFUSERS_STD_EPS = 1e-5  # AutoencoderRAE._normalize_latents divides by (std + 1e-5)


def is_diffusers_rae(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a diffusers ``AutoencoderRAE`` (its ``config.json`` says so)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "AutoencoderRAE"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


#: what a diffusers AutoencoderRAE repo needs (no pickled .bin)
DIFFUSERS_FILES = ("config.json", "*.safetensors")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def diffusers_rae_folder(weights: str | os.PathLike, *, what: str = "AutoencoderRAE") -> Path | None:
    """``--weights`` as a folder: a local path as given, or a Hub repo id (``owner/name``, not a local
    path) resolved through the cache or a download of its config and safetensors only."""
    from raebench.weights import WeightsSource, resolve

    path = Path(weights).expanduser()
    if path.exists() or not _REPO_ID.match(str(weights)):
        return path if path.is_dir() else None
    try:
        return resolve(WeightsSource(str(weights), allow_patterns=DIFFUSERS_FILES, description=what), what=what)
    except MissingWeightsError as e:
        raise MissingWeightsError(f"--weights {str(weights)!r} is no local folder; as a Hugging Face repo: {e}") from None


def official_decoder_state(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``AutoencoderRAE.decoder`` state dict -> the official decoder's keys (positions are recomputed)."""
    out = {}
    for k, v in diffusers_state.items():
        for new, old in ATTENTION_KEYS.items():
            k = k.replace(new, old)
        out[k] = v
    return out


def tokenizer_from_autoencoder_rae(model, *, weights_id: str = "diffusers"):
    """An instantiated ``diffusers.AutoencoderRAE`` -> :class:`RAETokenizer` computing the same encode/decode."""
    from raebench.rae.decoder import DecoderConfig, build_decoder
    from raebench.rae.encoders import wrap_hf_model
    from raebench.rae.stats import LatentStats
    from raebench.rae.tokenizer import RAETokenizer

    cfg = model.config
    if not cfg.reshape_to_2d:
        raise CheckpointError("This AutoencoderRAE keeps token sequences (reshape_to_2d=False); raebench needs (C, h, w) latents.")
    model_type = model.encoder.config.model_type
    if model_type not in ENCODER_TYPES.values():
        raise CheckpointError(f"AutoencoderRAE with a {model_type!r} encoder is not supported.")
    grid = cfg.encoder_input_size // cfg.encoder_patch_size
    enc = wrap_hf_model(  # on a copy: wrapping swaps the final norm for Identity in place
        copy.deepcopy(model.encoder).float(), model_type, input_size=cfg.encoder_input_size,
        mean=tuple(model.encoder_mean.flatten().tolist()), std=tuple(model.encoder_std.flatten().tolist()),
        source=weights_id,
    )
    dec_cfg = DecoderConfig(
        latent_dim=cfg.encoder_hidden_size, hidden_size=cfg.decoder_hidden_size, depth=cfg.decoder_num_hidden_layers,
        num_heads=cfg.decoder_num_attention_heads, mlp_dim=cfg.decoder_intermediate_size, patch_size=cfg.patch_size,
        grid_size=grid, num_channels=cfg.num_channels,
    )
    dec = build_decoder(dec_cfg)
    state = official_decoder_state(model.decoder.state_dict())
    state["decoder_pos_embed"] = dec.state_dict()["decoder_pos_embed"]  # fixed sin-cos: not stored by diffusers
    missing, unexpected = dec.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"The AutoencoderRAE decoder does not map onto the official decoder: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    # (z - mean) / (std + 1e-5) * s  ==  (z - mean) / sqrt(var + eps)  with  var = ((std + 1e-5) / s)^2, eps = 0
    mean = model._latents_mean.float()
    scale = (model._latents_std.float() + DIFFUSERS_STD_EPS) / float(cfg.scaling_factor)
    shape = (cfg.encoder_hidden_size, grid, grid)
    stats = LatentStats(torch.broadcast_to(mean, shape).clone(), torch.broadcast_to(scale.square(), shape).clone(), eps=0.0)
    return RAETokenizer(enc, dec, stats, weights_id=weights_id)


def load_diffusers_rae(folder: str | os.PathLike, *, weights_id: str | None = None):
    """A diffusers ``AutoencoderRAE`` folder -> :class:`RAETokenizer` (float32, eval mode)."""
    try:
        from diffusers import AutoencoderRAE
    except ImportError:  # older diffusers (raebench needs >= 0.31 for the VAEs; AutoencoderRAE came later)
        import diffusers

        raise CheckpointError(f"diffusers {diffusers.__version__} has no AutoencoderRAE; upgrade diffusers "
                              "(pip install -U diffusers) to read diffusers-format RAE folders.") from None

    from raebench.metrics.extractors import fingerprint_path

    folder = Path(folder).expanduser()
    if not is_diffusers_rae(folder):
        raise MissingWeightsError(f"{str(folder)!r} holds no diffusers AutoencoderRAE (config.json with that _class_name).")
    try:
        model = strict_from_pretrained(AutoencoderRAE, folder, what="a diffusers AutoencoderRAE (safetensors only)",
                                       torch_dtype=torch.float32, use_safetensors=True)
    except CheckpointError as e:
        if not isinstance(e.__cause__, AttributeError):
            raise
        import diffusers  # diffusers 0.42 builds SigLIP2 through an attribute transformers 5 removed
        import transformers

        raise CheckpointError(
            f"diffusers {diffusers.__version__} cannot build the AutoencoderRAE in {str(folder)!r} with transformers "
            f"{transformers.__version__} ({e.__cause__}); use the official release files instead (the rae-* tokenizer "
            "without --weights)."
        ) from None
    weights = next(folder.glob("*.safetensors"), folder / "config.json")
    return tokenizer_from_autoencoder_rae(model.eval(), weights_id=weights_id or f"diffusers:{folder.name}@{fingerprint_path(weights)}")
