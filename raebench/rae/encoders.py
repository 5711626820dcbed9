"""Frozen representation encoders: the "E" of a Representation Autoencoder.

RAE (Zheng, Ma, Tong, Xie 2025, "Diffusion Transformers with Representation Autoencoders",
arXiv:2510.11690) keeps a pretrained ViT frozen and uses its patch tokens as the latent. The recipe,
stated once and implemented by :meth:`RepresentationEncoder.forward`:

1. resize the [0, 1] image bicubically (``align_corners=False``) to the encoder's input size;
2. normalise with the mean/std that ship with the weights (``preprocessor_config.json``);
3. run the ViT;
4. apply its final LayerNorm *without* the affine weight and bias (same eps);
5. drop the CLS and register tokens and reshape the patch tokens to (C, H/p, W/p).

Families: DINOv2 with registers (S/B/L/G, the RAE default), SigLIP2 (fixed-resolution checkpoints,
vision tower), MAE (no masking, patch order kept), and any Hugging Face ViT of a known
``model_type`` (DINOv3, plain DINOv2, ViT, CLIP, I-JEPA) or timm ViT (``timm:<name>``). Weights come
from a local directory or a Hub snapshot through :func:`raebench.weights.resolve`; remote code is
never trusted. Encoders are feature extractors only: eval mode, no gradients, even inside a model
that is put in training mode.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raebench.checkpoint import read_json_object, strict_from_pretrained
from raebench.errors import CheckpointError, RaebenchError
from raebench.weights import WeightsSource, resolve

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Hub files an encoder snapshot needs (configs and safetensors; MAE's repo also ships a .bin,
#: which transformers reads with weights_only=True).
HF_ENCODER_PATTERNS = ("*.json", "*.safetensors")
#: the files of an encoder folder that make its identity: every file transformers may load (configs,
#: safetensors, a pytorch_model.bin), not a README or other frameworks' weights (``fingerprint_path``)
ENCODER_IDENTITY_PATTERNS = ("*.json", "*.safetensors", "*.bin")


# ---------------------------------------------------------------------------------------------
# The encoder module
# ---------------------------------------------------------------------------------------------


class RepresentationEncoder(nn.Module):
    """A frozen ViT as an RAE encoder: (N, 3, H, W) in [0, 1] -> (N, C, h, w) patch features.

    Subclasses implement :meth:`tokens`, the backbone's last hidden state *before* its final norm,
    including prefix (CLS/register) tokens. Everything else (resize, normalise, plain LayerNorm,
    dropping prefixes, reshaping) lives here once.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        family: str,
        hidden_size: int,
        patch_size: int,
        num_prefix_tokens: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        layer_norm_eps: float,
        final_norm_affine: nn.LayerNorm | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise RaebenchError(
                f"The encoder input size {input_size} is not a multiple of the encoder patch size {patch_size}; "
                f"choose an input size such as {input_size // patch_size * patch_size}."
            )
        self.backbone = backbone.eval().requires_grad_(False)
        self.family = family
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.input_size = input_size
        self.layer_norm_eps = layer_norm_eps
        self.source = source
        # normalize=False in the official config keeps the LayerNorm's affine weight and bias
        self.final_norm_affine = final_norm_affine
        if final_norm_affine is not None:
            final_norm_affine.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def grid_size(self) -> int:
        """Latent tokens per side."""
        return self.input_size // self.patch_size

    def train(self, mode: bool = True) -> "RepresentationEncoder":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout and friends stay off even while a decoder trains
        return self

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, T, C) last hidden state before the final norm."""
        raise NotImplementedError

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the backbone's normalised input at ``input_size``."""
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(self.preprocess(x))  # (N, T, C)
        if self.final_norm_affine is not None:
            t = self.final_norm_affine(t)
        else:
            t = F.layer_norm(t, (t.shape[-1],), eps=self.layer_norm_eps)
        t = t[:, self.num_prefix_tokens :]  # (N, h*w, C)
        n, l, c = t.shape
        g = math.isqrt(l)
        if g * g != l or g != self.grid_size:
            raise CheckpointError(
                f"The {self.family} encoder returned {l} patch tokens after dropping {self.num_prefix_tokens} prefix "
                f"tokens, not {self.grid_size}x{self.grid_size}; its CLS/register count or patch size is not what "
                "its config says."
            )
        return t.transpose(1, 2).reshape(n, c, g, g)  # (N, C, h, w), token i -> (i // w, i % w)

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, hidden={self.hidden_size}, patch={self.patch_size}, input={self.input_size}, "
            f"prefix_tokens={self.num_prefix_tokens}, source={self.source!r}"
        )


class HFEncoder(RepresentationEncoder):
    """A transformers ViT whose final norm was replaced by Identity (applied plainly by the base)."""

    def __init__(self, backbone: nn.Module, *, call_kwargs: dict, mae_noise: bool = False, **kw) -> None:
        super().__init__(backbone, **kw)
        self.call_kwargs = dict(call_kwargs)
        self.mae_noise = mae_noise

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self.call_kwargs)
        if self.mae_noise:
            # ViTMAE shuffles patches by argsort(noise) and keeps the first (1 - mask_ratio) of them:
            # an increasing noise with mask_ratio 0 keeps every patch in raster order.
            n_patch = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
            kwargs["noise"] = torch.arange(n_patch, device=x.device, dtype=x.dtype).expand(x.shape[0], n_patch)
        return self.backbone(pixel_values=x, **kwargs).last_hidden_state


class TimmEncoder(RepresentationEncoder):
    """A timm ViT (``dynamic_img_size=True``) whose ``norm`` was replaced by Identity."""

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


# ---------------------------------------------------------------------------------------------
# Hugging Face families
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFFamily:
    """How to run one transformers ``model_type`` as an RAE encoder."""

    model_class: str  # transformers class holding the vision tower
    final_norm: str | None  # attribute of the norm applied to last_hidden_state; None: not applied
    norm_for_eps: str  # attribute whose eps the plain LayerNorm uses
    cls_token: bool = True
    registers: bool = False  # config.num_register_tokens more prefix tokens
    interpolate: bool = False  # pass interpolate_pos_encoding=True
    mae: bool = False  # ViTMAE: mask_ratio 0 and increasing noise


HF_FAMILIES: dict[str, HFFamily] = {
    "dinov2_with_registers": HFFamily("Dinov2WithRegistersModel", "layernorm", "layernorm", registers=True),
    "dinov2": HFFamily("Dinov2Model", "layernorm", "layernorm"),
    "dinov3_vit": HFFamily("DINOv3ViTModel", "norm", "norm", registers=True),
    "vit_mae": HFFamily("ViTMAEModel", "layernorm", "layernorm", interpolate=True, mae=True),
    "siglip": HFFamily("SiglipVisionModel", "post_layernorm", "post_layernorm", cls_token=False, interpolate=True),
    "siglip_vision_model": HFFamily(
        "SiglipVisionModel", "post_layernorm", "post_layernorm", cls_token=False, interpolate=True
    ),
    "vit": HFFamily("ViTModel", "layernorm", "layernorm", interpolate=True),
    "ijepa": HFFamily("IJepaModel", "layernorm", "layernorm", cls_token=False, interpolate=True),
    # CLIP applies post_layernorm to the pooled CLS only: last_hidden_state is already pre-norm
    "clip": HFFamily("CLIPVisionModel", None, "post_layernorm", interpolate=True),
    "clip_vision_model": HFFamily("CLIPVisionModel", None, "post_layernorm", interpolate=True),
}

#: the RAE paper's encoders: short name -> Hub repo
KNOWN_ENCODERS: dict[str, str] = {
    "dinov2-s": "facebook/dinov2-with-registers-small",
    "dinov2-b": "facebook/dinov2-with-registers-base",
    "dinov2-l": "facebook/dinov2-with-registers-large",
    "dinov2-g": "facebook/dinov2-with-registers-giant",
    "siglip2-b": "google/siglip2-base-patch16-256",
    "mae-b": "facebook/vit-mae-base",
}


def encoder_source(repo_id: str) -> WeightsSource:
    """The Hub snapshot (configs + safetensors) of an encoder repository."""
    patterns = HF_ENCODER_PATTERNS + (("pytorch_model.bin",) if "vit-mae" in repo_id else ())
    return WeightsSource(repo_id, allow_patterns=patterns, description="frozen encoder")


def read_preprocessor_stats(directory: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` from a model folder's ``preprocessor_config.json``."""
    p = Path(directory) / "preprocessor_config.json"
    if not p.is_file():
        raise CheckpointError(
            f"The encoder folder {str(directory)!r} has no preprocessor_config.json, so its input mean/std are "
            "unknown; copy that file from the encoder's Hub repository into the folder."
        )
    cfg = read_json_object(p)
    try:
        mean, std = tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{str(p)!r} lacks numeric image_mean/image_std lists.") from None
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{str(p)!r} must give 3 image_mean and 3 image_std values.")
    return mean, std


def _read_model_type(directory: Path) -> str:
    p = directory / "config.json"
    if not p.is_file():
        raise CheckpointError(f"The encoder folder {str(directory)!r} has no config.json; it is not a transformers model folder.")
    mt = read_json_object(p).get("model_type", "")
    if mt == "siglip2":
        raise RaebenchError(
            f"{str(directory)!r} is a NaFlex SigLIP2 checkpoint (model_type siglip2); RAE uses the fixed-resolution "
            "SigLIP2 checkpoints such as google/siglip2-base-patch16-256."
        )
    if mt not in HF_FAMILIES:
        raise RaebenchError(
            f"Encoder model_type {mt!r} in {str(directory)!r} is not supported; supported types are "
            f"{', '.join(sorted(HF_FAMILIES))}, or use a timm ViT as 'timm:<name>'."
        )
    return mt


def wrap_hf_model(
    model: nn.Module,
    model_type: str,
    *,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    affine_final_norm: bool = False,
    source: str = "",
) -> HFEncoder:
    """Turn an instantiated transformers vision model into an :class:`HFEncoder` (in place)."""
    fam = HF_FAMILIES[model_type]
    cfg = model.config
    eps_norm = getattr(model, fam.norm_for_eps)
    affine = None
    if fam.final_norm is not None:
        if affine_final_norm:
            affine = getattr(model, fam.final_norm)
        setattr(model, fam.final_norm, nn.Identity())
    elif affine_final_norm:
        affine = eps_norm
    if fam.mae:
        cfg.mask_ratio = 0.0
        model.embeddings.config.mask_ratio = 0.0
    if model_type in ("siglip", "siglip_vision_model") and getattr(model, "use_head", False):
        model.use_head = False  # the pooling head would run on un-normalised tokens and is unused
        del model.head
    prefix = int(fam.cls_token) + (int(getattr(cfg, "num_register_tokens", 0)) if fam.registers else 0)
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else int(cfg.patch_size[0])
    return HFEncoder(
        model,
        call_kwargs={"interpolate_pos_encoding": True} if fam.interpolate else {},
        mae_noise=fam.mae,
        family=model_type,
        hidden_size=int(cfg.hidden_size),
        patch_size=int(patch),
        num_prefix_tokens=prefix,
        input_size=input_size,
        mean=mean,
        std=std,
        layer_norm_eps=float(eps_norm.eps),
        final_norm_affine=affine,
        source=source,
    )


def load_hf_encoder(
    directory: str | os.PathLike,
    *,
    input_size: int,
    config_dir: str | os.PathLike | None = None,
    affine_final_norm: bool = False,
    source: str = "",
) -> HFEncoder:
    """Load a transformers ViT from a local model folder as a frozen RAE encoder.

    ``config_dir`` (default: ``directory``) supplies ``preprocessor_config.json`` — the official
    configs name it separately (``encoder_config_path``). Missing or mis-shaped backbone weights are
    a :class:`CheckpointError`; unused ones (a text tower, an MAE decoder) are fine.
    """
    import transformers

    directory = Path(directory)
    model_type = _read_model_type(directory)
    fam = HF_FAMILIES[model_type]
    cls = getattr(transformers, fam.model_class)
    mean, std = read_preprocessor_stats(config_dir or directory)
    model = strict_from_pretrained(  # unused weights (a text tower, an MAE decoder) are expected
        cls, directory, what=f"the encoder ({fam.model_class})", unexpected_ok=lambda key: True,
        dtype=torch.float32, trust_remote_code=False,
    )
    return wrap_hf_model(
        model.float(), model_type, input_size=input_size, mean=mean, std=std,
        affine_final_norm=affine_final_norm, source=source or str(directory),
    )


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def timm_source(name: str) -> WeightsSource | None:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown tag
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return None
    return WeightsSource(hub.split("@")[0], filename="model.safetensors", description="timm encoder")


def load_timm_encoder(
    name: str,
    *,
    input_size: int,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    affine_final_norm: bool = False,
) -> TimmEncoder:
    """A timm ViT by name (``vit_base_patch14_reg4_dinov2.lvd142m``); weights via the Hub cache or a file."""
    import timm

    try:
        kwargs = dict(pretrained=False, num_classes=0, dynamic_img_size=True, img_size=input_size)
        if pretrained:
            path = resolve(timm_source(name), weights, what=f"timm encoder {name!r}", flag="--encoder")
            if path.is_dir():
                path = path / "model.safetensors"
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        model = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise RaebenchError(f"timm has no model {name!r}; list them with timm.list_models('*vit*').") from None
        raise
    norm = model.norm
    eps = float(getattr(norm, "eps", 1e-6))
    affine = norm if (affine_final_norm and isinstance(norm, nn.LayerNorm)) else None
    model.norm = nn.Identity()
    pcfg = model.pretrained_cfg
    patch = model.patch_embed.patch_size
    return TimmEncoder(
        model.float(),
        family="timm",
        hidden_size=int(model.embed_dim),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        num_prefix_tokens=int(model.num_prefix_tokens),
        input_size=input_size,
        mean=tuple(pcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pcfg.get("std", IMAGENET_STD)),
        layer_norm_eps=eps,
        final_norm_affine=affine,
        source=f"timm:{name}",
    )


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------


def build_encoder(
    name: str,
    *,
    input_size: int,
    local: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    affine_final_norm: bool = False,
) -> RepresentationEncoder:
    """Build a frozen encoder from a short name, a Hub repo id, a local folder or ``timm:<name>``.

    ``local`` (a folder) replaces the Hub download for Hub names. Offline with nothing cached, the
    error is one sentence naming the repository.
    """
    if name.startswith("timm:"):
        return load_timm_encoder(name[5:], input_size=input_size, weights=local, affine_final_norm=affine_final_norm)
    repo = KNOWN_ENCODERS.get(name.lower(), name)
    if local is None and Path(repo).expanduser().is_dir():
        local = repo
    is_repo = _looks_like_repo(repo)
    path = resolve(encoder_source(repo) if is_repo else None, local, what=f"encoder {repo!r}", flag="--encoder")
    return load_hf_encoder(
        path, input_size=input_size, config_dir=config_dir, affine_final_norm=affine_final_norm,
        source=repo if is_repo else str(path),
    )


def _looks_like_repo(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not Path(s).expanduser().exists()
