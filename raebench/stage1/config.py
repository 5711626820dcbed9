"""Stage-1 run configuration: one frozen dataclass, presets by name, overrides by ``key=value``.

The recipe is the official RAE one (``configs/stage1/training/DINOv2-B_decXL.yaml``, arXiv:2510.11690):
frozen DINOv2-B with registers at 224 px, ViT-XL decoder (every parameter trained, its sin-cos positions
included, as ``train_stage1.py``'s ``decoder.requires_grad_(True)`` does), noise tau 0.8, L1 + LPIPS(VGG) + adaptive
GAN with a frozen DINO ViT-S/8 discriminator, AdamW 2e-4 (betas 0.9/0.95, no weight decay) with a
one-epoch warmup from zero and cosine decay to 2e-5, EMA 0.9978, 16 epochs, global batch 512.
Every constant of a run lives in its preset; the schedule is given in epochs and converted to
optimizer steps once the data size is known (``steps_per_epoch = n_images // global_batch``).

Field names follow the stage-2 trainer (``global_batch``, ``grad_accum``, ``clip_grad``,
``ckpt_every``, ``max_steps``) so the same option is spelled the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from typing import Any

from raebench.errors import RaebenchError, check_rates


@dataclass(frozen=True)
class Stage1Config:
    """Everything that defines a stage-1 run (written to ``<run>/config.json``)."""

    # -- data --------------------------------------------------------------------------------
    data: str | None = None  # training image folder (recursive)
    val_data: str | None = None  # images for sample grids and online PSNR/SSIM (default: the training folder)
    resolution: int = 256
    crop_scale: float = 1.5  # train crop: resize the short side to crop_scale * resolution, random crop

    # -- encoder (frozen) and decoder (trained) --------------------------------------------------
    encoder: str | None = "facebook/dinov2-with-registers-base"  # Hub repo, short name or local folder
    encoder_input_size: int = 224
    decoder_hidden: int = 1152  # ViT-XL decoder (configs/decoder/ViTXL)
    decoder_depth: int = 28
    decoder_heads: int = 16
    decoder_mlp: int = 4096
    decoder_patch: int = 16
    decoder_layer_norm_eps: float = 1e-12
    init_decoder: str | None = None  # start from these decoder weights (fine-tuning) instead of scratch
    # the decoder's sin-cos positions start fixed, but the official trainer's decoder.requires_grad_(True)
    # makes them trainable (and its optimizer and EMA take them); false keeps them at their sin-cos values
    train_pos_embed: bool = True
    noise_tau: float = 0.8  # training noise on the encoder features: sigma ~ tau * U[0, 1) per sample
    noise_rule: str = "uniform"  # or "half-normal" (the paper's rule)

    # -- optimisation (schedule in epochs) -------------------------------------------------------
    epochs: int = 16
    global_batch: int = 512
    # micro-batch = global_batch / (world_size * grad_accum). 1 as the official trainer, which has no
    # accumulation: the adaptive GAN weight is a ratio of gradient norms of one micro-batch, so more
    # micro-batches (for memory) change it slightly
    grad_accum: int = 1
    lr: float = 2e-4
    final_lr: float = 2e-5
    warmup_epochs: float = 1.0  # linear warmup from zero, then cosine to final_lr at `epochs`
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip_grad: float = 0.0  # 0: off (the official recipe)
    ema_decay: float = 0.9978

    # -- losses ------------------------------------------------------------------------------
    lpips_weight: float = 1.0
    lpips_start_epoch: float = 0
    lpips_weights: str | None = None  # VGG16 backbone file; None: resolved (torch hub cache, then HF); "random": tests
    gan_weight: float = 0.75  # times the adaptive weight ||grad L_rec|| / (||grad L_gan|| + 1e-6)
    gan_start_epoch: float = 8  # the GAN term enters the decoder loss here ...
    disc_start_epoch: float = 6  # ... the discriminator starts learning here
    max_adaptive_weight: float = 1e4

    # -- discriminator: frozen DINO ViT + trainable heads ---------------------------------------
    disc_backbone: str = "vit_small_patch8_224.dino"  # timm name; its Hub repo supplies the weights
    disc_weights: str | None = None  # local file; None: resolved from the Hub; "random": tests
    disc_input_size: int = 224
    disc_patch: int = 8
    disc_width: int = 384
    disc_depth: int = 12
    disc_heads: int = 6
    disc_key_blocks: tuple[int, ...] = (2, 5, 8, 11)
    disc_kernel_size: int = 9
    disc_norm_eps: float = 1e-6
    disc_lr: float = 2e-4
    disc_final_lr: float = 2e-5
    disc_warmup_epochs: float = 1.0  # counted in discriminator updates, as in the official trainer
    disc_betas: tuple[float, float] = (0.9, 0.95)
    disc_weight_decay: float = 0.0
    diffaug_translation: float = 0.125  # shift by up to this fraction of the side, zero fill
    diffaug_color: bool = True  # brightness, saturation, contrast
    diffaug_cutout: float = 0.0  # off in the recipe

    # -- run ---------------------------------------------------------------------------------
    precision: str = "fp32"  # or "bf16" (autocast); the official train_stage1.py's default
    seed: int = 0
    num_workers: int = 8
    log_every: int = 100  # optimizer steps
    sample_every: int = 2500
    val_every: int = 0  # 0: no online PSNR/SSIM
    val_n: int = 500
    ckpt_every: int = 1000
    max_steps: int | None = None  # stop early (and checkpoint); the schedule still follows `epochs`
    wandb: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise RaebenchError(f"precision must be fp32 or bf16, got {self.precision!r}.")
        if self.noise_rule not in ("uniform", "half-normal"):
            raise RaebenchError(f"noise_rule must be uniform or half-normal, got {self.noise_rule!r}.")
        if self.global_batch < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise RaebenchError("global_batch, grad_accum and epochs must be positive.")
        for name in ("log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise RaebenchError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("sample_every", "val_every"):
            if getattr(self, name) < 0:
                raise RaebenchError(f"{name} must be at least 0 (0: off), got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise RaebenchError(f"max_steps must be at least 1 (or unset), got {self.max_steps}.")
        if self.resolution % self.decoder_patch:
            raise RaebenchError(
                f"The resolution {self.resolution} is not a multiple of the decoder patch size {self.decoder_patch}."
            )
        check_rates(self, ("lr", "disc_lr"), ("final_lr", "disc_final_lr"))
        if any(not 0 <= b < self.disc_depth for b in self.disc_key_blocks):
            raise RaebenchError(f"disc_key_blocks {self.disc_key_blocks} must lie in [0, {self.disc_depth}).")

    @property
    def grid(self) -> int:
        """Latent tokens per side (= decoded image side / decoder patch)."""
        return self.resolution // self.decoder_patch

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


#: Settings that may change between a run and its resumption (they do not change the trajectory).
RUN_ONLY_FIELDS = frozenset(
    {"num_workers", "log_every", "sample_every", "val_every", "val_n", "ckpt_every", "max_steps", "wandb"}
)

#: The value a setting had in runs written before the setting was recorded in their config.json
#: (runs before ``train_pos_embed`` kept the decoder's positions fixed).
LEGACY_VALUES: dict[str, Any] = {"train_pos_embed": False}

_RECIPE = Stage1Config()

#: name -> config. ``dinov2-b-decxl`` is the official recipe; the others change the encoder or the
#: decoder size the way the official configs do; ``tiny`` is for tests and smoke runs on a CPU.
PRESETS: dict[str, Stage1Config] = {
    "dinov2-b-decxl": _RECIPE,
    "dinov2-b-decl": dataclasses.replace(_RECIPE, decoder_hidden=1024, decoder_depth=24, decoder_heads=16, decoder_mlp=4096),
    "dinov2-b-decb": dataclasses.replace(_RECIPE, decoder_hidden=768, decoder_depth=12, decoder_heads=12, decoder_mlp=3072),
    "dinov2-b-decxl-512": dataclasses.replace(_RECIPE, resolution=512, encoder_input_size=448),
    "siglip2-b-decxl": dataclasses.replace(_RECIPE, encoder="google/siglip2-base-patch16-256", encoder_input_size=256),
    "mae-b-decxl": dataclasses.replace(_RECIPE, encoder="facebook/vit-mae-base", encoder_input_size=256),
    # a few 32 px images: 4x4 latent tokens (encoder patch 8 at 32 px), decoder patch 8; the
    # encoder is a local folder (tests save a random-weight one); random LPIPS/DINO backbones.
    "tiny": dataclasses.replace(
        _RECIPE,
        resolution=32, encoder=None, encoder_input_size=32,
        decoder_hidden=64, decoder_depth=2, decoder_heads=4, decoder_mlp=128, decoder_patch=8,
        epochs=8, global_batch=4, grad_accum=2, lr=2e-3, final_lr=2e-4, warmup_epochs=1.0, ema_decay=0.9,
        gan_start_epoch=4, disc_start_epoch=3, lpips_weights="random",
        disc_weights="random", disc_input_size=32, disc_patch=8, disc_width=32, disc_depth=3, disc_heads=2,
        disc_key_blocks=(0, 1, 2), disc_kernel_size=3, disc_lr=2e-3, disc_final_lr=2e-4,
        num_workers=0, log_every=1, sample_every=8, val_n=4, ckpt_every=4,
    ),
}


def _coerce(name: str, text: str) -> Any:
    """Parse ``text`` as the type of field ``name`` (ints, floats, bools, tuples, optional strings)."""
    tp = typing.get_type_hints(Stage1Config)[name]
    args = typing.get_args(tp)
    if type(None) in args and text.strip().lower() in ("none", "null", ""):
        return None
    base = next((a for a in args if a is not type(None)), tp) if args and typing.get_origin(tp) is not tuple else tp
    try:
        if typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            return tuple(item(p.strip()) for p in parts)
        if base is bool:
            v = text.strip().lower()
            if v not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return v in ("1", "true", "yes", "on")
        if base is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        return base(text)
    except ValueError:
        raise RaebenchError(f"Cannot read {text!r} as {getattr(base, '__name__', base)} for {name}.") from None


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=1e-4", "disc_key_blocks=2,5,8,11"]`` -> typed overrides; unknown keys get suggestions."""
    fields = {f.name: f for f in dataclasses.fields(Stage1Config)}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RaebenchError(f"Override {item!r} is not key=value (e.g. --set lr=1e-4).")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise RaebenchError(f"Unknown stage-1 setting {key!r}.{hint} See `raebench train stage1 --dry-run`.")
        out[key] = _coerce(key, text)
    return out


def preset(name: str, **overrides: Any) -> Stage1Config:
    """The preset ``name`` with ``overrides`` applied (validated by the dataclass)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RaebenchError(f"Unknown stage-1 preset {name!r}.{hint} Presets: {', '.join(PRESETS)}.")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Stage1Config)}
    if unknown:
        raise RaebenchError(f"Unknown stage-1 setting(s): {', '.join(sorted(unknown))}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def from_dict(d: dict[str, Any]) -> Stage1Config:
    """Inverse of :meth:`Stage1Config.to_dict` (tuples come back from JSON lists)."""
    names = {f.name for f in dataclasses.fields(Stage1Config)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**LEGACY_VALUES, **d}.items() if k in names}
    return Stage1Config(**kw)
