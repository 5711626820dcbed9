"""The stage-1 discriminator: a frozen DINO ViT with trainable per-layer heads, and its input pipeline.

Design (the official RAE stage-1 discriminator, after StyleGAN-T's projected discriminator): images
in [-1, 1] are resized bilinearly to the backbone's input size (224), normalised with the ImageNet
mean/std and run through a frozen DINO ViT-S/8. The patch tokens (CLS dropped) of a few blocks
(2, 5, 8, 11), plus those of the final block, each feed one trainable head:

    SN-Conv1d(k=1) -> TokenNorm -> LeakyReLU(0.2)
    -> residual [SN-Conv1d(k=9, circular) -> TokenNorm -> LeakyReLU(0.2)], scaled by 1/sqrt(2)
    -> SN-Conv1d(C -> 1, k=1)

over the token axis (SN: spectral norm, one power iteration). The per-token logits of all heads are
concatenated: (N, heads * tokens). In ViT-S/8 the final block is block 11, so two heads see the same
features, exactly as in the official code. ``TokenNorm`` is the official ``BatchNormLocal`` with
virtual batch size 1: per-sample, per-channel statistics over tokens, so a sample's logits never
depend on the rest of its batch. Differences from the official module: timm's exact-GELU blocks
(the original DINO's; the official one builds them with tanh-approximated GELU, a difference of
about 1e-3 in an activation), the key bias of qkv left as loaded (it cancels in softmax), and the
spectral norms' first estimate (torch's parametrization runs 15 power iterations when it is built;
the official module starts from random vectors). The trainer scores fakes and reals in two forwards,
as the official module does, because each train-mode forward is one power iteration.

Inputs: the discriminator update sees clamped, 8-bit-quantised reconstructions
(:func:`quantize_8bit`), the generator's GAN term the raw ones (both as the official trainer); both
are augmented with DiffAugment (:func:`diff_augment`: translation by up to 1/8 of the side with
zero fill, and brightness/saturation/contrast; cutout off). Every random draw
comes from a per-sample generator, so the augmentation of a sample does not depend on how the
batch is split across processes or micro-batches.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from raebench import distributed
from raebench.errors import CheckpointError, RaebenchError
from raebench.weights import WeightsSource, resolve

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


class TokenNorm(nn.Module):
    """Per-sample, per-channel normalisation over tokens, with affine: (N, C, L) -> (N, C, L), float32."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean = x.mean(dim=2, keepdim=True)
        var = x.var(dim=2, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


def _sn_conv(c_in: int, c_out: int, kernel_size: int) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


class _ConvBlock(nn.Sequential):
    def __init__(self, channels: int, kernel_size: int, eps: float) -> None:
        super().__init__(_sn_conv(channels, channels, kernel_size), TokenNorm(channels, eps), nn.LeakyReLU(0.2))


class DiscHead(nn.Module):
    """(N, C, L) tokens -> (N, L) logits."""

    def __init__(self, channels: int, kernel_size: int, eps: float) -> None:
        super().__init__()
        self.inp = _ConvBlock(channels, 1, eps)
        self.res = _ConvBlock(channels, kernel_size, eps)
        self.out = _sn_conv(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = (self.res(h) + h) / math.sqrt(2.0)
        return self.out(h).flatten(1)  # (N, L)


# ---------------------------------------------------------------------------------------------
# The discriminator
# ---------------------------------------------------------------------------------------------


class DinoDiscriminator(nn.Module):
    """(N, 3, H, W) images in [-1, 1] -> (N, heads * tokens) logits. Only ``heads`` are trainable."""

    def __init__(self, backbone: nn.Module, key_blocks: Sequence[int], kernel_size: int = 9, norm_eps: float = 1e-6,
                 input_size: int = 224) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        self.backbone = backbone.eval().requires_grad_(False)
        self.input_size = input_size
        self.head_blocks = (depth - 1, *key_blocks)  # the final block first, as the official module
        self.run_blocks = sorted(set(self.head_blocks))
        width = int(backbone.embed_dim)
        self.heads = nn.ModuleList(DiscHead(width, kernel_size, norm_eps) for _ in self.head_blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        """Train mode only means: spectral norms run their power iteration. The backbone stays frozen."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = ((x + 1.0) / 2.0 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.backbone.forward_intermediates(
            x, indices=self.run_blocks, norm=False, output_fmt="NLC", intermediates_only=True, stop_early=True
        )  # list of (N, L, C), prefix tokens dropped
        by_block = dict(zip(self.run_blocks, feats))
        return torch.cat([head(by_block[b].transpose(1, 2)) for head, b in zip(self.heads, self.head_blocks)], dim=1)


def dino_source(name: str) -> WeightsSource | None:
    """The Hub file of a timm model's pretrained tag (``vit_small_patch8_224.dino`` -> timm/...)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return None
    return WeightsSource(hub.split("@")[0], filename="model.safetensors", description="discriminator backbone")


def load_backbone_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ViT state dict from a timm ``.safetensors`` or an original DINO ``.pth`` (same key names)."""
    from raebench.checkpoint import load_state

    sd = load_state(path)
    if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("model", "state_dict", "teacher", "student"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone.", "dino."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head"):  # DINO's projection head / a classifier are not used
            out[k] = v
    return out


def build_discriminator(cfg) -> DinoDiscriminator:
    """The discriminator of a :class:`~raebench.stage1.config.Stage1Config` (backbone weights resolved).

    ``cfg.disc_weights``: a local file, ``None`` (the Hub file of ``cfg.disc_backbone``: cache, then
    download; offline with nothing cached, one sentence naming it), or ``"random"`` (tests only).
    """
    import timm

    arch = cfg.disc_backbone.split(".")[0]
    try:
        with torch.random.fork_rng(devices=[]):  # a "random" backbone is the same in every process and run
            torch.manual_seed(0)
            backbone = timm.create_model(
                arch, pretrained=False, num_classes=0, img_size=cfg.disc_input_size, patch_size=cfg.disc_patch,
                embed_dim=cfg.disc_width, depth=cfg.disc_depth, num_heads=cfg.disc_heads,
            )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise RaebenchError(f"timm has no model {arch!r} for the discriminator backbone.") from None
        raise
    if cfg.disc_weights != "random":
        path = resolve(
            None if cfg.disc_weights else dino_source(cfg.disc_backbone), cfg.disc_weights,
            what=f"discriminator backbone {cfg.disc_backbone!r}", flag="--set disc_weights=FILE",
        )
        if path.is_dir():
            path = path / "model.safetensors"
        sd = load_backbone_state(path)
        own = backbone.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        bad = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"The discriminator weights {str(path)!r} do not fit {arch} (width {cfg.disc_width}, depth "
                f"{cfg.disc_depth}, patch {cfg.disc_patch}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape mismatches {sorted(bad)[:3]}."
            )
        backbone.load_state_dict(sd)
    elif distributed.is_main():  # every rank builds it alike: said once under torchrun
        log.warning("discriminator backbone has random weights (disc_weights=random): for tests only")
    return DinoDiscriminator(backbone, cfg.disc_key_blocks, cfg.disc_kernel_size, cfg.disc_norm_eps, cfg.disc_input_size)


def save_backbone(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a timm ViT's state dict as safetensors (tests make random-weight backbones with it)."""
    from raebench.checkpoint import save_atomic

    return save_atomic({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


# ---------------------------------------------------------------------------------------------
# Inputs: 8-bit quantisation and DiffAugment
# ---------------------------------------------------------------------------------------------


def quantize_8bit(x: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """[-1, 1] images -> the nearest of the 256 levels an 8-bit PNG can hold (clamped).

    ``straight_through``: the forward value is quantised, the gradient passes as if it were not.
    """
    q = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    return x + (q - x).detach() if straight_through else q.detach()


def diff_augment(x: torch.Tensor, generators: Sequence[torch.Generator], translation: float = 0.125,
                 color: bool = True, cutout: float = 0.0) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020, as in StyleGAN-T/RAE) of (N, C, H, W) images, differentiable.

    Per sample i, seven uniforms from ``generators[i]``: an integer shift in [-d, d] per axis
    (d = round(translation * side), zero fill), brightness + (u - 0.5), saturation * 2u, contrast *
    (u + 0.5), and a cutout square of ``cutout * side`` (skipped when 0).
    """
    n, c, h, w = x.shape
    if len(generators) != n:
        raise ValueError(f"diff_augment needs one generator per sample ({n}), got {len(generators)}")
    u = torch.stack([torch.rand(7, generator=g, device=g.device) for g in generators]).to(x.device, torch.float32)  # (N, 7)
    x = x.float()
    if translation > 0:
        dh, dw = round(h * translation), round(w * translation)
        th = (u[:, 0] * (2 * dh + 1)).floor().long() - dh  # (N,)
        tw = (u[:, 1] * (2 * dw + 1)).floor().long() - dw
        pad = F.pad(x, [dw, dw, dh, dh])  # zero fill
        rows = (torch.arange(h, device=x.device)[None] + th[:, None] + dh)  # (N, H) source rows in `pad`
        cols = (torch.arange(w, device=x.device)[None] + tw[:, None] + dw)  # (N, W)
        b = torch.arange(n, device=x.device)[:, None, None]
        x = pad.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)
    if color:
        x = x + (u[:, 2] - 0.5).view(n, 1, 1, 1)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (u[:, 3] * 2).view(n, 1, 1, 1) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (u[:, 4] + 0.5).view(n, 1, 1, 1) + m
    if cutout > 0:
        ch, cw = round(h * cutout), round(w * cutout)
        y0 = ((u[:, 5] * (h + (1 - ch % 2))).floor().long() - ch // 2).view(n, 1, 1)  # top-left corner
        x0 = ((u[:, 6] * (w + (1 - cw % 2))).floor().long() - cw // 2).view(n, 1, 1)
        yy = torch.arange(h, device=x.device).view(1, h, 1)
        xx = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (yy >= y0) & (yy < y0 + ch) & (xx >= x0) & (xx < x0 + cw)  # (N, H, W)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x
