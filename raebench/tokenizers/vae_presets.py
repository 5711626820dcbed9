"""The VAE presets: metadata only, so registering and listing them (``ls``, the baseline cards, the
leaderboard) imports neither diffusers nor any weights. Each :class:`VAEPreset` names one released VAE:
its Hub files, diffusers class (``kind``), latent channels and downsampling, latent normalisation
(constants, checked in the authors' sources, or where the statistics come from), parameter count and
citation. Loading them is :mod:`raebench.tokenizers.vae`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raebench.errors import CheckpointError
from raebench.weights import WeightsSource

#: only these files of a diffusers VAE folder are fetched and read (never pickled .bin weights)
DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
#: the files of a diffusers folder that make its weights' identity: those it is loaded from, not a README, a
#: .bin or other safetensors beside them (a full download of sdxl-vae also holds its single-file
#: ``sdxl_vae.safetensors``; repos hold fp16 variants), so that it is the Hub cache's copy (``fingerprint_path``'s patterns)
IDENTITY_PATTERNS = DIFFUSERS_FILES


# ---------------------------------------------------------------------------------------------
# Presets: metadata only (registering them loads nothing)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEPreset:
    """One released VAE: where it lives, how to load it and how its latents are normalised.

    ``kind``: ``kl`` (diffusers AutoencoderKL), ``kl-flux2`` (AutoencoderKLFlux2), ``dc``
    (AutoencoderDC) or ``kl-ldm`` (an LDM-format AutoencoderKL checkpoint converted on load).
    ``norm``: ``scale`` (scalar ``shift``/``scale``), ``config-stats`` (``latents_mean``/``latents_std``
    in the model config), ``stats-file`` (a ``latents_stats.pt`` next to the checkpoint) or
    ``batchnorm`` (FLUX.2's BatchNorm running statistics).
    """

    name: str
    kind: str
    weights: tuple[WeightsSource, ...]
    latent_channels: int
    downsample: int  # spatial factor from pixels to the normalised latent grid
    description: str
    norm: str = "scale"
    scale: float = 1.0
    shift: float = 0.0
    params: int | None = None
    citation: str = ""
    aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    #: resolutions the weights were trained at, or that their authors publish numbers or models at (``ls``);
    #: every VAE here is convolutional and encodes any multiple of ``downsample``, others being extrapolation
    resolutions: tuple[int, ...] = (256, 512)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        s = resolution // self.downsample
        return (self.latent_channels, s, s)


def _hub(repo: str, subfolder: str | None = None, gated: bool = False, description: str = "") -> WeightsSource:
    prefix = f"{subfolder}/" if subfolder else ""
    return WeightsSource(
        repo, subfolder=subfolder, allow_patterns=tuple(prefix + f for f in DIFFUSERS_FILES), gated=gated,
        description=description,
    )


_SD_PARAMS = 83_653_863  # AutoencoderKL (128, 256, 512, 512) x2 layers, 4 latent channels, with quant convs
_SD3_PARAMS = 83_819_683  # same blocks, 16 latent channels, no quant convs (SD3.5, FLUX.1)
#: diffusers' AutoencoderKLFlux2 defaults, which FLUX.2-dev's vae/config.json matches as third parties quote it
_FLUX2_PARAMS = 84_046_115
_VAVAE_PARAMS = 69_836_067  # LDM ch=128, ch_mult (1, 1, 2, 2, 4), attention at 16x16, 32 latent channels
#: AutoencoderDC with the dc-ae-f32c32-in-1.0 config of diffusers' scripts/convert_dcae_to_diffusers.py; the same
#: count as efficientvit's own DCAE(dc_ae_f32c32("dc-ae-f32c32-in-1.0")) (widths 128..1024, depths 0,4,8,2,2,2 / 0,5,10,2,2,2)
_DCAE_F32C32_PARAMS = 323_356_460

_LDM_CITATION = "Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022 (arXiv:2112.10752)"

PRESETS: tuple[VAEPreset, ...] = (
    VAEPreset(
        "sd-vae-ft-mse", "kl", (_hub("stabilityai/sd-vae-ft-mse"),), 4, 8,
        "Stable Diffusion kl-f8 VAE, decoder fine-tuned with MSE emphasis (ft-MSE); 4x32x32 at 256 px.",
        scale=0.18215, params=_SD_PARAMS, citation=_LDM_CITATION,
    ),
    VAEPreset(
        "sd-vae-ft-ema", "kl", (_hub("stabilityai/sd-vae-ft-ema"),), 4, 8,
        "Stable Diffusion kl-f8 VAE, decoder fine-tuned, EMA weights (ft-EMA; the VAE of DiT/SiT/REPA).",
        scale=0.18215, params=_SD_PARAMS, citation=_LDM_CITATION,
    ),
    VAEPreset(
        "sdxl-vae", "kl", (_hub("stabilityai/sdxl-vae"),), 4, 8,
        "SDXL VAE (kl-f8, retrained); run it in fp32 or bf16, it overflows in fp16.",
        scale=0.13025, params=_SD_PARAMS,
        citation="Podell et al., SDXL, arXiv:2307.01952",
    ),
    VAEPreset(
        "sdxl-vae-fp16-fix", "kl", (_hub("madebyollin/sdxl-vae-fp16-fix"),), 4, 8,
        "SDXL VAE fine-tuned by madebyollin so that fp16 activations stay finite (same latent space).",
        scale=0.13025, params=_SD_PARAMS,
        citation="Podell et al., SDXL, arXiv:2307.01952; fp16 fix by madebyollin",
    ),
    VAEPreset(
        "sd3.5-vae", "kl", (_hub("stabilityai/stable-diffusion-3.5-large", "vae", gated=True),), 16, 8,
        "Stable Diffusion 3.5 VAE (16 channels, f8); gated repository.",
        scale=1.5305, shift=0.0609, params=_SD3_PARAMS,
        citation="Esser et al., Scaling Rectified Flow Transformers for High-Resolution Image Synthesis, ICML 2024",
    ),
    VAEPreset(
        "flux1-vae", "kl", (_hub("black-forest-labs/FLUX.1-schnell", "vae", gated=True),), 16, 8,
        "FLUX.1 VAE (16 channels, f8), from FLUX.1-schnell (Apache-2.0; the repository is gated since 2025).",
        scale=0.3611, shift=0.1159, params=_SD3_PARAMS,
        citation="Black Forest Labs, FLUX.1 (2024)",
    ),
    VAEPreset(
        "flux2-vae", "kl-flux2", (_hub("black-forest-labs/FLUX.2-dev", "vae", gated=True),), 128, 16,
        "FLUX.2 VAE: 32x32x32 at 256 px, 2x2-patchified to 128x16x16 and normalised by its BatchNorm "
        "running statistics; gated repository.",
        norm="batchnorm", params=_FLUX2_PARAMS,
        citation="Black Forest Labs, FLUX.2 (2025)",
    ),
    VAEPreset(
        "dc-ae-f32c32", "dc", (_hub("mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"),), 32, 32,
        "Deep Compression Autoencoder f32c32 trained on ImageNet (in-1.0); 32x8x8 at 256 px.",
        scale=0.3189, params=_DCAE_F32C32_PARAMS,
        citation="Chen et al., Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models, ICLR 2025 (arXiv:2410.10733)",
    ),
    VAEPreset(
        "va-vae-f16d32", "kl-ldm",
        (
            WeightsSource("hustvl/vavae-imagenet256-f16d32-dinov2", filename="vavae-imagenet256-f16d32-dinov2.pt",
                          description="LDM-format checkpoint"),
            WeightsSource("hustvl/vavae-imagenet256-f16d32-dinov2", filename="latents_stats.pt",
                          description="per-channel latent mean/std"),
        ),
        32, 16,
        "VA-VAE f16d32 (LDM KL autoencoder aligned to DINOv2, LightningDiT); converted from the LDM "
        "checkpoint on load; per-channel statistics from latents_stats.pt.",
        norm="stats-file", params=_VAVAE_PARAMS, resolutions=(256,),  # LightningDiT vavae/configs: resolution 256, ImageNet
        citation="Yao et al., Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models, CVPR 2025 (arXiv:2501.01423)",
    ),
    VAEPreset(
        "e2e-vavae", "kl", (_hub("REPA-E/e2e-vavae-hf"),), 32, 16,
        "VA-VAE after end-to-end REPA-E tuning, diffusers format; per-channel latents_mean/std from its config.",
        norm="config-stats", params=_VAVAE_PARAMS,  # tuned on ImageNet 256; REPA-E's T2I work also runs E2E-VAEs at 512
        citation="Leng et al., REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers, ICCV 2025 (arXiv:2504.10483)",
    ),
)


def diffusers_has(module: str) -> bool:
    """Whether the installed diffusers ships ``models/autoencoders/<module>.py`` (imports nothing)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "models" / "autoencoders" / f"{module}.py").exists() for p in spec.submodule_search_locations)


def get_preset(name: str) -> VAEPreset:
    for p in PRESETS:
        if p.name == name:
            return p
    raise KeyError(name)


def _diffusers_class(kind: str):
    import diffusers  # noqa: PLC0415 (heavy; only when a VAE is built)

    name = {"kl": "AutoencoderKL", "kl-ldm": "AutoencoderKL", "kl-flux2": "AutoencoderKLFlux2", "dc": "AutoencoderDC"}[kind]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"The installed diffusers {diffusers.__version__} has no {name}; upgrade diffusers.")
    return cls


__all__ = ["DIFFUSERS_FILES", "PRESETS", "VAEPreset", "diffusers_has", "get_preset"]
