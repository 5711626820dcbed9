"""Registered RAE tokenizers: the encoders, decoders and statistics the RAE authors released.

Decoders (ViT-XL, trained with noise tau = 0.8) and statistics come from the Hugging Face repo
``nyu-visionx/RAE-collections`` at the paths its README and configs use; encoders from their own
repos. Registration is metadata only; :func:`build_rae` resolves and loads the files.

Builder options (all optional): ``weights`` a local folder laid out like RAE-collections
(``decoders/...``, ``stats/...``, e.g. from ``hf download nyu-visionx/RAE-collections --local-dir DIR``),
which may also hold the encoder as ``DIR/<encoder repo id>/``; ``decoder`` a decoder ``model.pt`` or
``.safetensors`` (a ``config.json`` beside it, or a folder with both, sets its architecture);
``stats`` a ``stat.pt``; ``encoder`` an encoder folder; ``resolution``; ``device``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from raebench.errors import MissingWeightsError, RaebenchError
from raebench.tokenizers.base import TokenizerSpec, register_tokenizer
from raebench.weights import WeightsSource, hf_cache_dir, hf_offline, local_copy_hint, resolve

RAE_REPO = "nyu-visionx/RAE-collections"
RAE_CITATION = (
    "Zheng, Ma, Tong, Xie. Diffusion Transformers with Representation Autoencoders. arXiv:2510.11690, 2025."
)

#: closed-form decoder parameter counts need only the widths; these are the encoders' (final norm
#: affine excluded, SigLIP's unused pooling head excluded)
ENCODER_PARAMS = {
    "facebook/dinov2-with-registers-small": 22_057_344,
    "facebook/dinov2-with-registers-base": 86_582_016,
    "facebook/dinov2-with-registers-large": 304_370_688,
    "google/siglip2-base-patch16-256": 85_841_664,
    "facebook/vit-mae-base": 85_797_120,
}


@dataclass(frozen=True)
class RAERelease:
    """One released RAE: which encoder, which decoder and statistics files, at which resolution."""

    name: str
    description: str
    encoder_repo: str
    hidden_size: int
    encoder_patch: int
    resolution: int
    decoder_file: str
    stats_file: str
    decoder_preset: str = "XL"
    #: the same release converted to diffusers' AutoencoderRAE (per diffusers' AutoencoderRAE docs)
    diffusers_repo: str | None = None
    decoder_patch: int = 16
    aliases: tuple[str, ...] = ()

    @property
    def grid(self) -> int:
        return self.resolution // self.decoder_patch

    @property
    def input_size(self) -> int:
        """Encoder input side: one encoder patch per decoder patch (224 for DINOv2 at 256 px)."""
        return self.grid * self.encoder_patch

    def sources(self) -> tuple[WeightsSource, WeightsSource, WeightsSource]:
        from raebench.rae.encoders import encoder_source

        return (
            encoder_source(self.encoder_repo),
            WeightsSource(RAE_REPO, filename=self.decoder_file, description="RAE decoder"),
            WeightsSource(RAE_REPO, filename=self.stats_file, description="RAE latent statistics"),
        )


RELEASES: dict[str, RAERelease] = {
    r.name: r
    for r in (
        RAERelease(
            "rae-dinov2-b", "RAE: DINOv2-B with registers (frozen) + ViT-XL decoder, ImageNet 256 px; the paper's default.",
            "facebook/dinov2-with-registers-base", 768, 14, 256,
            "decoders/dinov2/wReg_base/ViTXL_n08/model.pt", "stats/dinov2/wReg_base/imagenet1k/stat.pt",
            aliases=("rae-dinov2",), diffusers_repo="nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08",
        ),
        RAERelease(
            "rae-dinov2-b-512", "RAE: DINOv2-B with registers (448 px input) + ViT-XL decoder, ImageNet 512 px.",
            "facebook/dinov2-with-registers-base", 768, 14, 512,
            "decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt", "stats/dinov2/wReg_base/imagenet1k_512/stat.pt",
            diffusers_repo="nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08-i512",
        ),
        RAERelease(
            "rae-dinov2-s", "RAE: DINOv2-S with registers (frozen) + ViT-XL decoder, ImageNet 256 px.",
            "facebook/dinov2-with-registers-small", 384, 14, 256,
            "decoders/dinov2/wReg_small/ViTXL_n08/model.pt", "stats/dinov2/wReg_small/imagenet1k/stat.pt",
            diffusers_repo="nyu-visionx/RAE-dinov2-wReg-small-ViTXL-n08",
        ),
        RAERelease(
            "rae-dinov2-l", "RAE: DINOv2-L with registers (frozen) + ViT-XL decoder, ImageNet 256 px.",
            "facebook/dinov2-with-registers-large", 1024, 14, 256,
            "decoders/dinov2/wReg_large/ViTXL_n08/model.pt", "stats/dinov2/wReg_large/imagenet1k/stat.pt",
            diffusers_repo="nyu-visionx/RAE-dinov2-wReg-large-ViTXL-n08",
        ),
        RAERelease(
            "rae-siglip2-b", "RAE: SigLIP2-B/16 vision tower (frozen) + ViT-XL decoder, ImageNet 256 px.",
            "google/siglip2-base-patch16-256", 768, 16, 256,
            "decoders/siglip2/base_p16_i256/ViTXL_n08/model.pt", "stats/siglip2/base_p16_i256/ImageNet1k/stat.pt",
            diffusers_repo="nyu-visionx/RAE-siglip2-base-p16-i256-ViTXL-n08",
        ),
        RAERelease(
            "rae-mae-b", "RAE: MAE-B/16 encoder (frozen, no masking) + ViT-XL decoder, ImageNet 256 px.",
            "facebook/vit-mae-base", 768, 16, 256,
            "decoders/mae/base_p16/ViTXL_n08/model.pt", "stats/mae/base_p16/ImageNet1k/stat.pt",
            diffusers_repo="nyu-visionx/RAE-mae-base-p16-ViTXL-n08",
        ),
    )
}


def decoder_param_count(latent_dim: int, hidden: int, depth: int, mlp: int, patch: int = 16, grid: int = 16) -> int:
    """Closed form of :func:`raebench.rae.decoder.count_parameters` (no module is built)."""
    block = 4 * (hidden * hidden + hidden) + (hidden * mlp + mlp) + (mlp * hidden + hidden) + 4 * hidden
    out = patch * patch * 3
    return (
        depth * block
        + (latent_dim * hidden + hidden)  # decoder_embed
        + (grid * grid + 1) * hidden  # fixed positions
        + hidden  # CLS
        + 2 * hidden  # final norm
        + (hidden * out + out)  # decoder_pred
    )


def _release_params(r: RAERelease) -> int:
    from raebench.rae.decoder import DECODER_PRESETS

    p = DECODER_PRESETS[r.decoder_preset]
    return ENCODER_PARAMS[r.encoder_repo] + decoder_param_count(
        r.hidden_size, p["hidden_size"], p["depth"], p["mlp_dim"], r.decoder_patch, r.grid
    )


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_rae(
    release: RAERelease,
    *,
    weights: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    resolution: int | None = None,
    device: str | torch.device | None = None,
):
    """Resolve every file of ``release`` (local options first, then the Hub cache) and load it."""
    from raebench.rae.decoder import build_decoder, decoder_file, official_config, preset_config
    from raebench.rae.encoders import ENCODER_IDENTITY_PATTERNS, load_hf_encoder
    from raebench.rae.stats import LatentStats
    from raebench.rae.tokenizer import RAETokenizer

    if weights is not None and decoder is None and stats is None and encoder is None:
        from raebench.rae.diffusers_format import diffusers_rae_folder, is_diffusers_rae

        folder = diffusers_rae_folder(weights, what=f"{release.name} (diffusers format)")
        if folder is not None and is_diffusers_rae(folder):
            return _from_diffusers_folder(release, folder, resolution, device)
    res = release.resolution if resolution is None else int(resolution)
    if res != release.resolution and decoder is None:
        others = [r.name for r in RELEASES.values() if r.encoder_repo == release.encoder_repo and r.resolution == res]
        hint = f"use {others[0]!r}" if others else "train a decoder for it and pass --decoder"
        raise RaebenchError(
            f"{release.name!r} was released for {release.resolution} px, not {res} px; "
            f"pass --resolution {release.resolution} or {hint}."
        )
    if res % release.decoder_patch:
        raise RaebenchError(f"The resolution {res} is not a multiple of the decoder patch size {release.decoder_patch}.")
    grid = res // release.decoder_patch
    enc_src, dec_src, stat_src = release.sources()
    wdir = Path(weights).expanduser() if weights is not None else None
    layout = (f"{release.encoder_repo}/ (the encoder's Hub files), {dec_src.path_in_repo} and {stat_src.path_in_repo} "
              f"(as in {RAE_REPO})")
    if wdir is not None and not wdir.is_dir():
        kind = "is a file" if wdir.exists() else "does not exist"
        alone = decoder is None and stats is None and encoder is None and release.diffusers_repo
        other = (f", or the release in diffusers' format (a download of {release.diffusers_repo}: config.json and "
                 "safetensors)") if alone else ""
        raise MissingWeightsError(f"The --weights folder {str(wdir)!r} {kind}; it should be a folder holding {layout}{other}.")
    if encoder is None and wdir is not None and (wdir / release.encoder_repo).is_dir():
        encoder = wdir / release.encoder_repo

    # resolve everything first, so a missing set of files is reported in one sentence
    found: dict[str, Path] = {}
    missing: list[tuple[WeightsSource, MissingWeightsError]] = []

    def in_weights_dir(src: WeightsSource) -> Path | None:
        cand = wdir / src.path_in_repo if wdir is not None else None
        return cand if cand is not None and cand.is_file() else None

    for key, src, local, flag in (
        # a command-line encoder copy goes in --weights DIR (only `raebench stats` has --encoder)
        ("encoder", enc_src, encoder, "--encoder" if encoder is not None else f"--weights DIR (as DIR/{release.encoder_repo}/)"),
        ("decoder", dec_src, decoder if decoder is not None else in_weights_dir(dec_src), "--decoder"),
        ("stats", stat_src, stats if stats is not None else in_weights_dir(stat_src), "--stats"),
    ):
        try:
            found[key] = resolve(src, local, what=f"{release.name} {key}", flag=flag)
        except MissingWeightsError as e:
            if local is not None:  # the user's own path is wrong: say that first, whatever else is missing
                raise
            missing.append((src, e))
    if len(missing) == 1 and wdir is None:
        raise missing[0][1]
    if missing:
        files = "; ".join(f"{s} (`{s.download_hint()}`)" for s, _ in missing)
        where = (f"--weights {str(wdir)!r} lacks them (it should hold {layout}) and they are not in the cache at "
                 f"{hf_cache_dir()}" if wdir is not None else
                 f"put them in the cache at {hf_cache_dir()}{local_copy_hint(f'--weights DIR holding {layout}')}")
        raise MissingWeightsError(
            f"{release.name} needs {len(missing)} file(s) that are not available "
            f"{'offline (HF_HUB_OFFLINE=1)' if hf_offline() else 'locally or by download'}: {files}; {where}."
        )

    enc = load_hf_encoder(found["encoder"], input_size=grid * release.encoder_patch, source=release.encoder_repo)
    dec_path = decoder_file(found["decoder"])
    cfg_json = dec_path.parent / "config.json"
    if decoder is not None and cfg_json.is_file():  # a user's decoder with its own architecture
        dcfg = official_config(cfg_json, latent_dim=enc.hidden_size, patch_size=release.decoder_patch, grid_size=grid)
    else:
        dcfg = preset_config(
            release.decoder_preset, latent_dim=enc.hidden_size, patch_size=release.decoder_patch, grid_size=grid
        )
    dec = build_decoder(dcfg, dec_path)
    st = LatentStats.load(found["stats"])
    from raebench.metrics.extractors import fingerprint_path

    # a label (the released files by the decoder's repo path; with any part given locally, the decoder's file
    # name), then the content of every part, wherever it came from (the Hub cache or a copy: the same files are
    # the same weights; other weights copied to the same place are other weights); the encoder by the files
    # that are loaded. The repo label is the released tokenizer's: rows recorded before identities carried
    # content name it alone (raebench.weights.recorded_before), meaning its encoder and statistics too
    released = decoder is None and weights is None and encoder is None and stats is None
    label = f"{RAE_REPO}:{release.decoder_file}" if released else f"local:{dec_path.name}"
    weights_id = (f"{label}@{fingerprint_path(dec_path)}+enc:{fingerprint_path(found['encoder'], ENCODER_IDENTITY_PATTERNS)}"
                  f"+stats:{fingerprint_path(found['stats'])}")
    tok = RAETokenizer(enc, dec, st, weights_id=weights_id)
    if device is not None:
        tok = tok.to(device)
    return tok


def _from_diffusers_folder(release: RAERelease, folder: Path, resolution: int | None, device):
    """``release`` from a diffusers ``AutoencoderRAE`` folder (e.g. ``nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08``),
    after checking that the folder holds that release's encoder at its resolution."""
    from raebench.errors import CheckpointError
    from raebench.rae.diffusers_format import ENCODER_TYPES, load_diffusers_rae

    tok = load_diffusers_rae(folder)
    enc, dec = tok.encoder, tok.decoder
    out = dec.config.grid_size * dec.config.patch_size
    family = next((f for key, f in ENCODER_TYPES.items() if key in release.encoder_repo), None)
    want = (family, release.hidden_size, release.grid, release.resolution)
    got = (enc.family, enc.hidden_size, enc.grid_size, out)
    if got != want:
        raise CheckpointError(
            f"The AutoencoderRAE in {str(folder)!r} has a {got[0]} encoder of width {got[1]} on a {got[2]}x{got[2]} grid "
            f"decoding {got[3]} px, but {release.name!r} is {want[0]}, width {want[1]}, {want[2]}x{want[2]}, {want[3]} px; "
            f"pass it to the matching rae-* tokenizer."
        )
    if resolution is not None and int(resolution) != out:
        raise RaebenchError(f"{release.name!r} from {str(folder)!r} decodes {out} px, not {resolution} px; pass --resolution {out}.")
    return tok if device is None else tok.to(device)


def _register(r: RAERelease) -> None:
    def builder(
        weights: str | None = None,
        decoder: str | None = None,
        stats: str | None = None,
        encoder: str | None = None,
        resolution: int | None = None,
        device: str | None = None,
    ):
        return build_rae(
            RELEASES[r.name], weights=weights, decoder=decoder, stats=stats, encoder=encoder,
            resolution=resolution, device=device,
        )

    register_tokenizer(
        TokenizerSpec(
            name=r.name,
            family="rae",
            description=r.description,
            latent_shape_fn=lambda res, r=r: (r.hidden_size, res // r.decoder_patch, res // r.decoder_patch),
            builder=builder,
            native_resolutions=(r.resolution,),
            params=_release_params(r),
            weights=r.sources(),
            aliases=r.aliases,
            citation=RAE_CITATION,
            extra={"encoder": r.encoder_repo, "decoder_preset": r.decoder_preset, "noise_tau_train": 0.8,
                   "diffusers_repo": r.diffusers_repo},
        )
    )


for _r in RELEASES.values():
    _register(_r)


def build_release_encoder(
    release: RAERelease,
    *,
    encoder: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    resolution: int | None = None,
):
    """Only the frozen encoder of ``release`` (what latent statistics need), at ``resolution``."""
    from raebench.rae.encoders import load_hf_encoder

    res = release.resolution if resolution is None else int(resolution)
    if res % release.decoder_patch:
        raise RaebenchError(f"The resolution {res} is not a multiple of the decoder patch size {release.decoder_patch}.")
    if encoder is None and weights is not None and (Path(weights) / release.encoder_repo).is_dir():
        encoder = Path(weights) / release.encoder_repo
    path = resolve(release.sources()[0], encoder, what=f"{release.name} encoder", flag="--encoder")
    return load_hf_encoder(
        path, input_size=res // release.decoder_patch * release.encoder_patch, source=release.encoder_repo
    )
