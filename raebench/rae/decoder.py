"""The RAE pixel decoder: an MAE-style ViT from encoder patch tokens to image patches.

Architecture (He et al. 2022, MAE decoder, as used by RAE, arXiv:2510.11690): a linear embedding of
the latent tokens, a trainable CLS token, fixed 2-D sin-cos positions, pre-LN transformer blocks
(LayerNorm eps 1e-12, GELU MLP), a final LayerNorm and a linear head to p*p*3 values per token,
then unpatchify. The output lives in the *encoder's* normalised pixel space; the tokenizer
un-normalises it. Nothing is clamped.

Parameter names follow the official state dict (``decoder_embed``, ``decoder_pos_embed``,
``trainable_cls_token``, ``decoder_layers.{i}.attention.attention.query`` ...), so the released
``model.pt`` files load with :func:`load_decoder_weights`, which is strict: a missing key, an
unexpected key or a shape mismatch is a :class:`CheckpointError` naming them (the official loader
uses ``strict=False``: it prints missing keys and drops unexpected ones, so a mismatched checkpoint
can run with random layers). Checkpoints are read with
safetensors or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from raebench.checkpoint import load_state, read_json_object, save_atomic
from raebench.errors import CheckpointError, MissingWeightsError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes a decoder. ``latent_dim`` is the encoder width (the official config's
    ``hidden_size``, which RAE overwrites with the encoder's)."""

    latent_dim: int
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 16
    grid_size: int = 16  # latent tokens per side; the output is grid_size * patch_size pixels
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def image_size(self) -> int:
        return self.grid_size * self.patch_size

    def to_official(self) -> dict[str, Any]:
        """The official ViTMAE-style decoder ``config.json`` for this decoder."""
        return {
            "architectures": ["ViTMAEForPreTraining"],
            "model_type": "vit_mae",
            "hidden_size": self.latent_dim,
            "decoder_hidden_size": self.hidden_size,
            "decoder_num_hidden_layers": self.depth,
            "decoder_num_attention_heads": self.num_heads,
            "decoder_intermediate_size": self.mlp_dim,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "qkv_bias": self.qkv_bias,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }


#: The official decoder configs (configs/decoder/ViT{B,L,XL}/config.json), widths independent of the
#: encoder. Parameter counts at a 768-wide encoder, 16x16 tokens, patch 16: 86.4M / 304.2M / 415.4M.
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "B": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
}


def preset_config(preset: str, *, latent_dim: int, patch_size: int = 16, grid_size: int = 16) -> DecoderConfig:
    key = preset.upper().removeprefix("VIT")
    if key not in DECODER_PRESETS:
        raise CheckpointError(f"Unknown decoder preset {preset!r}; use one of {', '.join(DECODER_PRESETS)}.")
    return DecoderConfig(latent_dim=latent_dim, patch_size=patch_size, grid_size=grid_size, **DECODER_PRESETS[key])


def official_config(
    source: str | os.PathLike | Mapping[str, Any], *, latent_dim: int, patch_size: int, grid_size: int
) -> DecoderConfig:
    """A :class:`DecoderConfig` from the official decoder ``config.json`` (a file, its folder or a dict).

    As in the official RAE, ``hidden_size``, ``patch_size`` and ``image_size`` in the file are
    placeholders overwritten by the encoder width, the YAML's decoder patch size and the token grid.
    """
    if isinstance(source, Mapping):
        cfg = dict(source)
        where = "decoder config"
    else:
        p = Path(source)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise MissingWeightsError(f"The decoder config {str(p)!r} does not exist; give the folder holding config.json.")
        cfg = read_json_object(p)
        where = str(p)
    try:
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if float(cfg.get(k, 0.0) or 0.0) != 0.0:
                raise CheckpointError(f"{where} sets {k}={cfg[k]}; raebench's decoder has no dropout (every RAE config uses 0).")
        return DecoderConfig(
            latent_dim=int(latent_dim),
            hidden_size=int(cfg["decoder_hidden_size"]),
            depth=int(cfg["decoder_num_hidden_layers"]),
            num_heads=int(cfg["decoder_num_attention_heads"]),
            mlp_dim=int(cfg["decoder_intermediate_size"]),
            patch_size=int(patch_size),
            grid_size=int(grid_size),
            num_channels=int(cfg.get("num_channels", 3)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            hidden_act=str(cfg.get("hidden_act", "gelu")),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
        )
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{where} is not an RAE decoder config: it lacks {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has a value of the wrong type ({e}).") from None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid², dim) fixed 2-D sin-cos positions in the MAE layout, computed in float64.

    The first half of the channels encodes the column, the second half the row (MAE's meshgrid
    order); each half is [sin(pos * w), cos(pos * w)] with w = 10000^(-k / (dim / 4)).
    A zero row is prepended for the CLS token.
    """
    if dim % 4:
        raise CheckpointError(f"The decoder width {dim} must be a multiple of 4 for 2-D sin-cos positions.")
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
        out = pos.reshape(-1, 1) * omega  # (grid², D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (grid², D/2)

    emb = torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # (grid², D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# ---------------------------------------------------------------------------------------------
# Blocks (module names mirror the official state dict)
# ---------------------------------------------------------------------------------------------


class _QKV(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise CheckpointError(f"The decoder width {dim} is not divisible by its {num_heads} heads.")
        self.num_heads = num_heads
        self.attention = _QKV(dim, qkv_bias)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q, k, v = (
            lin(x).view(n, t, h, d // h).transpose(1, 2)  # (N, heads, T, d_head)
            for lin in (self.attention.query, self.attention.key, self.attention.value)
        )
        o = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d_head)
        return self.output.dense(o.transpose(1, 2).reshape(n, t, d))


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        if cfg.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"Unsupported decoder activation {cfg.hidden_act!r}; use one of {', '.join(_ACTIVATIONS)}.")
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.attention = _Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.intermediate = _Dense(d, cfg.mlp_dim)
        self.output = _Dense(cfg.mlp_dim, d)
        self.layernorm_before = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class RAEDecoder(nn.Module):
    """(N, C, h, w) encoder features -> (N, 3, h*p, w*p) pixels in the encoder's normalised space."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.decoder_embed = nn.Linear(cfg.latent_dim, d)
        # fixed, but a (non-trainable) parameter as in the official state dict and parameter counts
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d), requires_grad=False)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.depth))
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(d, cfg.patch_size**2 * cfg.num_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: sin-cos positions, zero CLS, PyTorch defaults elsewhere."""
        if self.decoder_pos_embed.device.type == "meta":
            return
        with torch.no_grad():
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.config.hidden_size, self.config.grid_size)[None])
            self.trainable_cls_token.zero_()

    def forward_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(N, L, C) latent tokens -> (N, grid², p*p*3) patch predictions."""
        x = self.decoder_embed(z)  # (N, L, D)
        n, l, d = x.shape
        if l != self.config.num_patches:  # another resolution: resample the token grid (official rule)
            g = math.isqrt(l)
            x = x.transpose(1, 2).reshape(n, d, g, g)
            x = F.interpolate(x, size=(self.config.grid_size,) * 2, mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)  # (N, grid², D)
        x = torch.cat([self.trainable_cls_token.expand(n, -1, -1), x], dim=1) + self.decoder_pos_embed
        for block in self.decoder_layers:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS: (N, grid², p*p*3)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, g*g, p*p*c) -> (N, c, g*p, g*p); each token's values are ordered (row, col, channel)."""
        n, l, _ = patches.shape
        g, p, c = math.isqrt(l), self.config.patch_size, self.config.num_channels
        x = patches.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, c, h, w = z.shape
        tokens = z.reshape(n, c, h * w).transpose(1, 2)  # (N, h*w, C), raster order
        return self.unpatchify(self.forward_tokens(tokens))


def count_parameters(cfg: DecoderConfig) -> int:
    """Parameters of a decoder (fixed positions included, as in the official counts), on meta."""
    with torch.device("meta"):
        m = RAEDecoder(cfg)
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Safe, strict checkpoint loading
# ---------------------------------------------------------------------------------------------


def decoder_file(path: str | os.PathLike) -> Path:
    """A decoder weights file, or a folder holding one (``raebench export-decoder``'s ``model.pt`` /
    ``model.safetensors``, or a diffusers-style ``decoder.safetensors``) -> the file."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", "model.safetensors", "decoder.safetensors"):
            if (p / name).is_file():
                return p / name
        raise MissingWeightsError(f"The decoder folder {str(p)!r} holds no model.safetensors or model.pt; give the "
                                  "weights file or a folder written by `raebench export-decoder`.")
    return p


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Read a ``.safetensors`` file, or a ``torch.save`` file with ``weights_only=True``, onto the CPU."""
    if Path(path).is_dir():
        raise MissingWeightsError(f"The {what} {str(path)!r} is a folder; give the file itself.")
    if not Path(path).is_file():
        raise MissingWeightsError(f"The {what} file {str(path)!r} does not exist.")
    return load_state(path)


def extract_decoder_state(obj: Any) -> dict[str, torch.Tensor]:
    """The decoder's state dict out of what a file held.

    Accepts a plain decoder state dict (the released ``model.pt``), a training checkpoint with an
    ``ema`` (preferred) or ``model`` entry, and full RAE state dicts whose decoder keys start with
    ``decoder.`` (encoder keys are then ignored: the encoder is frozen and loaded from its own repo).
    ``module.`` and ``_orig_mod.`` prefixes (DDP, torch.compile) are removed.
    """
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                if len([k for k in ("ema", "model") if isinstance(obj.get(k), Mapping)]) > 1:  # say which one
                    log.info("decoder checkpoint: using its %r entry (the official extract_decoder.py takes 'model' "
                             "unless --use-ema)", key)
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("The decoder checkpoint holds no state dict.")
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        sd[k] = v
    if any(k.startswith("decoder.") for k in sd):
        sd = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    return sd


def load_decoder_weights(decoder: RAEDecoder, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Copy a checkpoint into ``decoder``; any key or shape difference is a :class:`CheckpointError`."""
    where = "the given state dict" if isinstance(source, Mapping) else repr(str(source))
    sd = extract_decoder_state(source if isinstance(source, Mapping) else load_checkpoint(source, "decoder checkpoint"))
    own = decoder.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(sd) if sd[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        problems = (
            ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (checkpoint vs model)", mismatched)
        )
        for label, items in problems:
            if items:
                more = f" and {len(items) - 4} more" if len(items) > 4 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{more}")
        c = decoder.config
        raise CheckpointError(
            f"The decoder checkpoint {where} does not fit a decoder of width {c.hidden_size}, depth {c.depth}, "
            f"latent {c.latent_dim}, patch {c.patch_size}, {c.grid_size}x{c.grid_size} tokens ({'; '.join(parts)}); "
            "check the decoder config/preset and the encoder it was trained with."
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


def build_decoder(cfg: DecoderConfig, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None) -> RAEDecoder:
    """A decoder from its config, optionally with strictly loaded weights."""
    dec = RAEDecoder(cfg)
    if weights is not None:
        load_decoder_weights(dec, weights)
    return dec


def save_official(decoder: RAEDecoder, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.pt`` (plain state dict) in the official layout; returns the folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    from raebench.results import atomic_write_bytes  # both files atomic: a kill never leaves half of either

    atomic_write_bytes(d / "config.json", json.dumps(decoder.config.to_official(), indent=2).encode())
    save_atomic({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, d / "model.pt")
    return d


__all__ = [
    "DECODER_PRESETS",
    "DecoderConfig",
    "RAEDecoder",
    "build_decoder",
    "decoder_file",
    "count_parameters",
    "extract_decoder_state",
    "load_checkpoint",
    "load_decoder_weights",
    "official_config",
    "preset_config",
    "save_official",
]
