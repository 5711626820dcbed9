"""VAE baselines through diffusers: SD-VAE, SDXL, SD3.5, FLUX.1/.2, DC-AE, VA-VAE, E2E-VA-VAE.

Each preset owns its latent normalisation (stated once, here, with where it was checked; the baseline
cards in ``raebench.baselines`` repeat the sources):

    normalised = (raw - shift) * scale          raw = posterior mode (deterministic encode)

with ``shift``/``scale`` scalars (SD, SDXL, SD3.5, FLUX.1, DC-AE) or per-channel tensors built from
statistics (VA-VAE's ``latents_stats.pt``, E2E-VA-VAE's ``latents_mean``/``latents_std`` config
entries: shift = mean, scale = 1/std; FLUX.2's BatchNorm running statistics applied to the 2x2
patchified latent, as diffusers' Flux2Pipeline does). Images enter diffusers in [-1, 1] and leave
it in [-1, 1]; :meth:`DiffusersVAE.decode` maps back to [0, 1] without clamping (the tokenizer
contract in ``base.py``); their sides must be multiples of the loaded config's downsampling factor
(:meth:`DiffusersVAE._check_input`). A ``--weights`` folder whose config.json states another ``scaling_factor`` or
``shift_factor`` than a scalar preset's holds another VAE of the same class and width and is refused;
``latents_mean``/``latents_std`` must give one finite value per channel, std > 0.

Weights: ``--weights DIR`` (a diffusers folder holding ``config.json``; for VA-VAE a folder with the
LDM checkpoint and ``latents_stats.pt``) > the Hugging Face cache > a download, all through
:func:`raebench.weights.resolve`. Only safetensors are read for diffusers folders, the LDM checkpoint
is read with ``torch.load(weights_only=True)``, and no remote code is ever executed. Registering and
listing the presets imports neither diffusers nor any weights.

The presets (metadata) are in :mod:`raebench.tokenizers.vae_presets`, the conversion of LDM-format
checkpoints in :mod:`raebench.tokenizers.ldm_vae`; this module loads and wraps them, and registers them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raebench.checkpoint import read_json_object, strict_from_pretrained
from raebench.errors import CheckpointError, DataError, MissingWeightsError
from raebench.tokenizers.base import Tokenizer, TokenizerSpec, register_tokenizer
from raebench.tokenizers.ldm_vae import _load_stats, load_ldm_vae
from raebench.tokenizers.vae_presets import (DIFFUSERS_FILES, IDENTITY_PATTERNS, PRESETS, VAEPreset, _diffusers_class,
                                             diffusers_has)
from raebench.weights import hf_cache_dir, hf_cache_move_hint, hf_offline, local_copy_hint, resolve

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class DiffusersVAE(Tokenizer):
    """A diffusers KL autoencoder behind the raebench contract.

    ``shift``/``scale`` are buffers of shape (1, C, 1, 1) or (1, 1, 1, 1):
    normalised = (mode - shift) * scale; decode inverts it exactly.
    """

    def __init__(self, vae: nn.Module, shift: torch.Tensor, scale: torch.Tensor, weights_id: str) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("shift", _as_channels(shift))
        self.register_buffer("scale", _as_channels(scale))
        self.weights_id = weights_id
        #: pixels per side of one normalised latent cell, from the loaded config (not the preset)
        self.downsample = self._factor(vae)

    @staticmethod
    def _factor(vae: nn.Module) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)  # the last encoder block does not downsample

    def _check_input(self, x: torch.Tensor) -> None:
        """(N, 3, H, W) with H and W multiples of the downsampling factor. Other sides are not refused by
        the convolutions: they drop the last rows/columns' share (34 px at f8 encodes as 32 px and
        decodes to 32 px), so latents would silently stand for an image that was not given."""
        f = self.downsample
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"{self.name} encodes (N, 3, H, W) RGB images in [0, 1], not a tensor of shape "
                            f"{tuple(x.shape)} (convert grayscale or RGBA images to RGB first).")
        h, w = x.shape[-2:]
        if h % f or w % f:
            lo, hi = (max(f, min(h, w) // f * f), -(-max(h, w) // f) * f)
            raise DataError(f"{self.name} encodes images whose sides are multiples of {f} (its downsampling "
                            f"factor), not {h}x{w}: crop or resize them to a multiple of {f} "
                            f"(for square crops: --resolution {lo} or {hi}).")

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode()  # deterministic: the posterior mean

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        raw = self._encode_raw(x * 2.0 - 1.0)  # (N, C, H/f, W/f)
        return (raw - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raw = z / self.scale + self.shift
        return (self._decode_raw(raw) + 1.0) / 2.0  # [-1, 1] -> [0, 1], unclamped


class DCAEVAE(DiffusersVAE):
    """AutoencoderDC: deterministic encoder (no posterior), ``.latent`` is the code."""

    @staticmethod
    def _factor(vae: nn.Module) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)  # diffusers' spatial_compression_ratio

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent


class Flux2VAE(DiffusersVAE):
    """AutoencoderKLFlux2: the posterior mode is patchified 2x2 before its BatchNorm statistics apply,
    as in diffusers' Flux2Pipeline (``_patchify_latents`` then ``(z - bn_mean) / sqrt(bn_var + eps)``)."""

    @staticmethod
    def _factor(vae: nn.Module) -> int:
        return 2 ** len(vae.config.block_out_channels)  # the VAE's 2**(levels - 1), times the 2x2 patches

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x).latent_dist.mode()  # (N, C, h, w)
        n, c, h, w = z.shape
        z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(n, c * 4, h // 2, w // 2)  # (N, 4C, h/2, w/2)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        n, c4, h, w = z.shape
        z = z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, h * 2, w * 2)
        return self.vae.decode(z).sample


def _as_channels(v: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    return t.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _diffusers_dir(preset: VAEPreset, weights: str | None) -> Path:
    """A folder with config.json + safetensors: ``weights`` (or its ``subfolder``), else the hub copy."""
    src = preset.weights[0]
    path = resolve(src, weights, what=f"{preset.name} weights", flag="--weights")
    if path.is_file():
        raise MissingWeightsError(
            f"{preset.name}: --weights must be a diffusers folder holding config.json and "
            f"diffusion_pytorch_model.safetensors, not the file {str(path)!r}."
        )
    for cand in (path, path / (src.subfolder or "")):
        if (cand / "config.json").is_file():
            return cand
    if (path / "vae" / "config.json").is_file():  # a pipeline folder (model_index.json, vae/, unet/, ...)
        raise MissingWeightsError(
            f"{preset.name}: {str(path)!r} is no VAE folder (it has no config.json) but holds one in "
            f"{str(path / 'vae')!r}; pass that folder with --weights."
        )
    raise MissingWeightsError(
        f"{preset.name}: no config.json in {str(path)!r}; give --weights a diffusers folder "
        f"(a download of {src.repo_id!r}{'/' + src.subfolder if src.subfolder else ''})."
    )


def load_diffusers_vae(kind: str, folder: str | Path, latent_channels: int | None = None) -> nn.Module:
    """``from_pretrained`` on a local folder: safetensors only, strict, no network, no remote code.

    The config must name the preset's class (``_class_name``) and, when given, its latent channels;
    every weight must load (:func:`raebench.checkpoint.strict_from_pretrained`).
    """
    cls = _diffusers_class(kind)
    folder = Path(folder)
    if not (folder / DIFFUSERS_FILES[1]).is_file():
        raise MissingWeightsError(f"{str(folder)!r} has config.json but no {DIFFUSERS_FILES[1]} (only safetensors are read).")
    config = read_json_object(folder / DIFFUSERS_FILES[0])
    named = config.get("_class_name", cls.__name__)
    if named != cls.__name__:
        raise CheckpointError(f"{str(folder)!r} holds {named} weights, not the {cls.__name__} this tokenizer needs.")
    if latent_channels is not None and config.get("latent_channels", latent_channels) != latent_channels:
        raise CheckpointError(f"{str(folder)!r} is a VAE with {config['latent_channels']} latent channels; "
                              f"this tokenizer has {latent_channels}.")
    return strict_from_pretrained(cls, folder, what=f"a diffusers {cls.__name__}", use_safetensors=True,
                                  torch_dtype=torch.float32)


def _hub_snapshot(path: Path) -> tuple[str, str] | None:
    """``(repo_id, revision)`` of the Hugging Face cache snapshot ``path`` lies in
    (``.../models--owner--name/snapshots/<rev>/...``), else None. A file's own symlink into ``blobs/``
    is not followed (only its folder is resolved), and a folder that merely happens to be called
    ``snapshots`` is no snapshot."""
    path = path.parent.resolve() / path.name if path.is_file() else path.resolve()
    parts = path.parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and parts[i - 1].count("--") == 2:
            return parts[i - 1][len("models--"):].replace("--", "/"), parts[i + 1]
    return None


def _weights_id(preset: VAEPreset, folder: Path, file: Path | None = None) -> str:
    """``<repo>@<snapshot hash>[:<file>]@<fingerprint>`` for a copy in the Hub cache of the preset's own
    repository. Any other folder (``--weights``, a cached snapshot of another repository included) gets
    ``local:<name>@<fingerprint>``. The label says where the weights came from: the name (the other
    repository's id, else the file or folder name) keeps leaderboard labels readable, and only the preset's
    repository gets a ``repo@`` label: it means the released weights, beside which ``compare`` shows the
    card's reported numbers. The fingerprint of their content (``file``, or the folder's
    :data:`IDENTITY_PATTERNS` files, not its path) says what they are: the same files through the Hub cache
    or a copy are the same weights (:func:`raebench.weights.weights_key`), other files in the same place
    are not."""
    from raebench.metrics.extractors import fingerprint_path

    src = preset.weights[0]
    fp = fingerprint_path(file) if file is not None else fingerprint_path(folder, IDENTITY_PATTERNS)
    snap = _hub_snapshot(folder)
    if snap is not None and snap[0] == src.repo_id:
        return f"{src.repo_id}@{snap[1][:12]}" + (f":{file.name}" if file is not None else "") + f"@{fp}"
    target = file if file is not None else folder
    name = snap[0] if snap is not None else target.resolve().name
    return f"local:{name}@{fp}"


def _check_config_normalisation(preset: VAEPreset, folder: Path, refuse: bool = True) -> None:
    """A folder whose config.json *states* another ``scaling_factor``/``shift_factor`` holds another
    VAE of the same class and width (SD3.5's for ``flux1-vae``, SDXL's for ``sd-vae-ft-*``): strict
    loading cannot tell them apart, and the preset's constants would normalise its latents wrongly
    under the preset's name. A config without the keys (older diffusers exports) is accepted."""
    config = read_json_object(folder / DIFFUSERS_FILES[0])
    stated = {k: config[k] for k in ("scaling_factor", "shift_factor") if k in config}
    want = {"scaling_factor": preset.scale, "shift_factor": preset.shift}
    bad = {k: v for k, v in stated.items() if not _same_constant(v, want[k])}
    if not bad:
        return
    got = {**want, **{k: (0.0 if v is None else v) for k, v in stated.items()}}
    twins = [p.name for p in PRESETS if p.norm == "scale" and p.kind == preset.kind and p.name != preset.name
             and _same_constant(got["scaling_factor"], p.scale) and _same_constant(got["shift_factor"], p.shift)]
    found = ", ".join(f"{k} {v!r}" for k, v in bad.items())
    hint = f"it looks like {' or '.join(twins)} (pass that --tokenizer)" if twins else \
        f"if these really are {preset.name}'s weights, set scaling_factor {preset.scale} and shift_factor {preset.shift} there"
    msg = (f"{str(folder)!r} is another VAE than {preset.name}: its config.json gives {found}, where {preset.name}'s "
           f"latents use scaling_factor {preset.scale} and shift_factor {preset.shift}")
    if not refuse:  # the Hub's own snapshot: its authors' published constants are the preset's
        log.warning("%s; the preset's constants are used.", msg.replace("is another VAE than", "states other constants than"))
        return
    raise CheckpointError(f"{msg}; {hint}.")


def _same_constant(value: Any, expected: float) -> bool:
    if value is None:  # diffusers writes shift_factor: null for "no shift"
        value = 0.0
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(float(value) - expected) <= 1e-6


def _config_stats(preset: VAEPreset, folder: Path, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents_mean``/``latents_std`` of the config: one finite number per latent channel, std > 0
    (a wrong-length list used to fail at the first encode with a broadcasting error; a zero std gave
    infinite latents)."""
    where = f"{str(folder)!r}/config.json"
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        raise CheckpointError(f"{preset.name}: {where} lacks latents_mean/latents_std.")
    c = config.latent_channels
    try:
        mean, std = torch.tensor(mean, dtype=torch.float64).flatten(), torch.tensor(std, dtype=torch.float64).flatten()
    except (TypeError, ValueError):
        raise CheckpointError(f"{preset.name}: latents_mean/latents_std in {where} must be lists of numbers.") from None
    if mean.numel() != c or std.numel() != c:
        raise CheckpointError(f"{preset.name}: {where} has {mean.numel()} latents_mean and {std.numel()} latents_std "
                              f"entries for a VAE with {c} latent channels.")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError(f"{preset.name}: {where} has a non-finite latents_mean or a latents_std that is not "
                              "positive and finite; latents divided by it would be meaningless.")
    return mean.float(), std.float()


def build_vae(preset: VAEPreset, weights: str | None = None, stats: str | None = None) -> DiffusersVAE:
    """Load ``preset``'s weights (``weights``: a local folder or file) and wrap them."""
    if preset.kind == "kl-ldm":
        return _build_ldm(preset, weights, stats)
    if stats is not None:
        raise MissingWeightsError(f"{preset.name} takes its latent statistics from its weights; --stats is not used.")
    folder = _diffusers_dir(preset, weights)
    # FLUX.2 normalises 2x2 patches of its 32-channel latents: 128 channels at 1/16
    vae = load_diffusers_vae(preset.kind, folder, preset.latent_channels // (4 if preset.kind == "kl-flux2" else 1))
    wid = _weights_id(preset, folder)
    if preset.norm == "scale":
        # after the class and width checks, whose messages say more; a user's folder of another VAE is refused,
        # the released snapshot only warned about (the preset's constants are checked in the authors' sources)
        _check_config_normalisation(preset, folder, refuse=weights is not None)
        shift, scale = torch.tensor(preset.shift), torch.tensor(preset.scale)
    elif preset.norm == "config-stats":
        mean, std = _config_stats(preset, folder, vae.config)
        shift, scale = mean, 1.0 / std
    elif preset.norm == "batchnorm":
        bn = vae.bn
        shift = bn.running_mean.detach().clone()
        scale = 1.0 / torch.sqrt(bn.running_var.detach() + vae.config.batch_norm_eps)
    else:
        raise ValueError(f"unknown normalisation {preset.norm!r}")
    cls = {"kl": DiffusersVAE, "kl-flux2": Flux2VAE, "dc": DCAEVAE}[preset.kind]
    return cls(vae, shift, scale, wid)


def _resolve_hub_files(preset: VAEPreset) -> tuple[Path, Path]:
    """With no local path given: ``preset``'s LDM checkpoint and its statistics from the Hub cache (or
    a download). Every missing one is named in one sentence: one at a time, a user who fetched the
    checkpoint the first message named was then told about the statistics."""
    found, missing = [], []
    for src, what, flag in zip(preset.weights, ("checkpoint", "latent statistics"), ("--weights", "--stats")):
        try:
            found.append(resolve(src, None, what=f"{preset.name} {what}", flag=flag))
        except MissingWeightsError as e:
            missing.append((src, e))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        repos = {s.repo_id for s, _ in missing}
        fetch = (f"`hf download {missing[0][0].repo_id} {' '.join(s.path_in_repo for s, _ in missing)}`"
                 if len(repos) == 1 else " and ".join(f"`{s.download_hint()}`" for s, _ in missing))
        raise MissingWeightsError(
            f"{preset.name} needs {len(missing)} files that are not available "
            f"{'offline (HF_HUB_OFFLINE=1)' if hf_offline() else 'locally or by download'}: "
            f"{', '.join(str(s) for s, _ in missing)}; fetch them into the cache at {hf_cache_dir()} ({fetch}; "
            f"{hf_cache_move_hint()}){local_copy_hint('--weights DIR holding them')}."
        )
    return found[0], found[1]


def _build_ldm(preset: VAEPreset, weights: str | None, stats: str | None) -> DiffusersVAE:
    ckpt_src, stats_src = preset.weights
    hub = _resolve_hub_files(preset) if weights is None and stats is None else None
    ckpt = hub[0] if hub else resolve(ckpt_src, weights, what=f"{preset.name} checkpoint", flag="--weights")
    if ckpt.is_dir():
        pts = sorted(p for p in ckpt.glob("*.pt") if p.name != stats_src.filename)
        if len(pts) != 1:
            raise MissingWeightsError(
                f"{preset.name}: expected {ckpt_src.filename!r} in {str(ckpt)!r}; pass the checkpoint file with --weights."
            )
        ckpt = pts[0]
    if stats is None and weights is not None:  # a local checkpoint: its statistics sit beside it
        stats = str(Path(weights) if Path(weights).is_dir() else Path(weights).parent)
    stats_path = hub[1] if hub else resolve(stats_src, stats, what=f"{preset.name} latent statistics", flag="--stats")
    if stats_path.is_dir():
        folder, stats_path = stats_path, stats_path / stats_src.filename
        if not stats_path.is_file():
            raise MissingWeightsError(
                f"{preset.name}: no {stats_src.filename!r} in {str(folder)!r}; put it there "
                f"(`{stats_src.download_hint()} --local-dir {folder}`) or pass it with --stats FILE."
            )
    vae = load_ldm_vae(ckpt)
    c, f = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    if (c, f) != (preset.latent_channels, preset.downsample):  # another autoencoder (SD's kl-f8: 4 channels, f8)
        raise CheckpointError(
            f"{str(ckpt)!r} is an autoencoder with {c} latent channels at 1/{f} resolution; {preset.name} has "
            f"{preset.latent_channels} at 1/{preset.downsample} (expected {ckpt_src.filename!r} from {ckpt_src.repo_id!r})."
        )
    mean, std = _load_stats(stats_path)
    if mean.numel() != vae.config.latent_channels or std.numel() != vae.config.latent_channels:
        raise CheckpointError(
            f"{str(stats_path)!r} has {mean.numel()} channels, the checkpoint {vae.config.latent_channels}."
        )
    # the statistics are always named by content: they may come from elsewhere than the checkpoint (--stats).
    # (The test was "no 'snapshots' in the resolved path", which a Hub file, a symlink into blobs/, always
    # passed and a user's file under any folder called 'snapshots' never did.)
    from raebench.metrics.extractors import fingerprint_path

    wid = f"{_weights_id(preset, ckpt.parent, ckpt)}+stats:{fingerprint_path(stats_path)}"
    return DiffusersVAE(vae, mean, 1.0 / std, wid)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _register(preset: VAEPreset) -> None:
    if preset.kind == "kl-ldm":
        def builder(weights: str | None = None, stats: str | None = None, _p: VAEPreset = preset) -> Tokenizer:
            return build_vae(_p, weights, stats)
    else:
        def builder(weights: str | None = None, _p: VAEPreset = preset) -> Tokenizer:  # type: ignore[misc]
            return build_vae(_p, weights)
    register_tokenizer(
        TokenizerSpec(
            name=preset.name,
            family="vae",
            description=preset.description,
            latent_shape_fn=preset.latent_shape,
            builder=builder,
            native_resolutions=preset.resolutions,
            params=preset.params,
            weights=preset.weights,
            aliases=preset.aliases,
            citation=preset.citation,
            extra={"preset": preset},
        )
    )


for _preset in PRESETS:
    if _preset.kind == "kl-flux2" and not diffusers_has("autoencoder_kl_flux2"):
        log.debug("diffusers without AutoencoderKLFlux2: %s not registered", _preset.name)
        continue
    _register(_preset)


__all__ = ["DiffusersVAE", "DCAEVAE", "Flux2VAE", "build_vae", "load_diffusers_vae"]
