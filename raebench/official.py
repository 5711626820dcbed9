"""Official RAE YAML configs -> raebench objects.

The RAE repository (github.com/bytetriper/RAE) drives everything from one OmegaConf YAML with the
blocks ``stage_1`` (the autoencoder: ``target: stage1.RAE`` and ``params``), ``stage_2`` (the
diffusion transformer), ``transport``, ``sampler``, ``guidance`` and ``misc``.
:func:`from_official_config` reads such a file and returns an :class:`OfficialRAE` whose
``.tokenizer`` is an :class:`raebench.rae.RAETokenizer` built through the same loaders as the
registered tokenizers (strict decoder loading, safe checkpoint reading). Stage 2 is delegated to
``raebench.stage2.official.build_from_official(cfg, base_dir, device)`` when that module exists.

Paths in the YAML may be absolute, relative to the YAML's folder or any folder above it (the
official files use paths relative to the repository root), relative to the working directory, Hub
repo ids (``facebook/dinov2-with-registers-base``), ``hf://owner/repo[/path/in/repo]``, or the
official ``models/...`` paths, which name files of ``nyu-visionx/RAE-collections`` (the README
downloads that repo into ``models/``). ``configs/decoder/ViT{B,L,XL}`` fall back to the built-in
presets when the official repository is not around.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from raebench.errors import MissingWeightsError, RaebenchError
from raebench.weights import WeightsSource, resolve

log = logging.getLogger(__name__)

RAE_REPO = "nyu-visionx/RAE-collections"

#: stage_1.params of the official ``stage1.RAE`` with their defaults (src/stage1/rae.py)
STAGE1_DEFAULTS: dict[str, Any] = {
    "encoder_cls": "Dinov2withNorm",
    "encoder_config_path": "facebook/dinov2-base",
    "encoder_input_size": 224,
    "encoder_params": {},
    "decoder_config_path": "vit_mae-base",
    "decoder_patch_size": 16,
    "pretrained_decoder_path": None,
    "noise_tau": 0.8,
    "reshape_to_2d": True,
    "normalization_stat_path": None,
    "eps": 1e-5,
}

#: official encoder classes -> (parameter naming the weights, allowed encoder_params)
ENCODER_CLASSES: dict[str, tuple[str, frozenset[str]]] = {
    "Dinov2withNorm": ("dinov2_path", frozenset({"dinov2_path", "normalize"})),
    "SigLIP2wNorm": ("model_name", frozenset({"model_name", "num_tokens"})),
    "MAEwNorm": ("model_name", frozenset({"model_name"})),
}

_PRESET_RE = re.compile(r"(?:^|/)configs/decoder/ViT(B|L|XL)/?(?:config\.json)?$")


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _is_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)


def _local_candidates(value: str, base_dir: Path | None) -> list[Path]:
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    out = []
    if base_dir is not None:
        out += [d / p for d in (base_dir, *base_dir.parents)]
    out.append(Path.cwd() / p)
    return out


def resolve_official_path(value: str, base_dir: str | os.PathLike | None, *, what: str, kind: str = "file") -> Path:
    """A local path for a path-like value of an official YAML (see the module docstring).

    ``kind`` is ``"file"``, ``"repo"`` (a model folder: local, or a Hub snapshot), ``"config"`` (a
    folder or a Hub repo's ``config.json``) or ``"preprocessor"`` (a folder or a Hub repo's
    ``preprocessor_config.json``). Raises :class:`MissingWeightsError` with one sentence naming what
    was looked for.
    """
    value = str(value).strip()
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else None
    looked = f"next to {str(base)!r} and its parent folders, " if base is not None else ""
    # what supplies a local copy here: the YAML's own path (no --weights flag applies to a YAML)
    rae_files = value.replace("\\", "/").lstrip("./").startswith("models/")
    flag = (f"its path in the YAML (absolute, or relative to the YAML: looked {looked}and in {os.getcwd()!r}"
            + (f"; `hf download {RAE_REPO} --local-dir models` next to the YAML, or a parent folder, gives its "
               "models/... paths)" if rae_files else ")"))
    if value.startswith("hf://"):
        parts = value[5:].strip("/").split("/")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        if sub:
            return resolve(WeightsSource(repo, filename=sub), what=what, flag=flag)
        return resolve(_repo_source(repo, kind), what=what, flag=flag)
    for cand in _local_candidates(value, base):
        if cand.exists():
            return cand
    norm = value.replace("\\", "/")
    norm = norm[2:] if norm.startswith("./") else norm
    if norm.startswith("models/") and kind == "file":  # `hf download nyu-visionx/RAE-collections --local-dir models`
        return resolve(WeightsSource(RAE_REPO, filename=norm[len("models/") :]), what=what, flag=flag)
    if kind in ("repo", "config", "preprocessor") and _is_repo_id(value):
        return resolve(_repo_source(value, kind), what=what, flag=flag)
    raise MissingWeightsError(
        f"The {what} {value!r} was not found ({looked}in {os.getcwd()!r}, and it is not a Hub path); "
        "give an absolute path or one relative to the YAML file."
    )


def _repo_source(repo: str, kind: str) -> WeightsSource:
    """A model folder (configs + safetensors), or one json file of the repo for ``config``/``preprocessor``."""
    from raebench.rae.encoders import encoder_source

    if kind == "repo":
        return encoder_source(repo)
    return WeightsSource(repo, filename="preprocessor_config.json" if kind == "preprocessor" else "config.json")


def _preprocessor_dir(config_path: str, base_dir: str | os.PathLike | None, enc_dir: Path) -> Path:
    """The folder whose ``preprocessor_config.json`` gives the encoder's input mean/std.

    The official RAE reads only ``image_mean``/``image_std`` from ``encoder_config_path`` (through
    ``AutoImageProcessor``), so only that file is fetched for a Hub id. When it cannot be had (offline,
    not cached) and the weights folder carries its own ``preprocessor_config.json``, that one is used.
    """
    try:
        p = resolve_official_path(config_path, base_dir, what="encoder config (encoder_config_path)", kind="preprocessor")
    except MissingWeightsError:
        if not (enc_dir / "preprocessor_config.json").is_file():
            raise
        log.warning("encoder_config_path %r is not available; using the preprocessor_config.json of %s",
                    config_path, enc_dir)
        return enc_dir
    return p if p.is_dir() else p.parent


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


def plain_config(x: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolved); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def build_stage1(
    stage1: Mapping[str, Any],
    base_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    name: str = "rae-official",
):
    """An :class:`RAETokenizer` (named ``name`` in results) from the ``stage_1`` block of an official config."""
    from raebench.rae.decoder import build_decoder, load_decoder_weights, official_config, preset_config
    from raebench.rae.encoders import load_hf_encoder
    from raebench.rae.stats import LatentStats
    from raebench.rae.tokenizer import RAETokenizer

    stage1 = plain_config(stage1) or {}
    target = str(stage1.get("target", "stage1.RAE"))
    if target.rsplit(".", 1)[-1] != "RAE":
        raise RaebenchError(f"stage_1.target is {target!r}; raebench reads the official stage1.RAE autoencoder only.")
    params = dict(stage1.get("params") or {})
    unknown = sorted(set(params) - set(STAGE1_DEFAULTS))
    if unknown:
        raise RaebenchError(
            f"stage_1.params has unknown key(s) {', '.join(unknown)}; the official RAE takes {', '.join(STAGE1_DEFAULTS)}."
        )
    p = {**STAGE1_DEFAULTS, **params}
    if not p["reshape_to_2d"]:
        raise RaebenchError("stage_1.params.reshape_to_2d is false; raebench's RAE latents are always (C, H, W).")

    # encoder
    cls = str(p["encoder_cls"])
    if cls not in ENCODER_CLASSES:
        raise RaebenchError(
            f"stage_1.params.encoder_cls {cls!r} is unknown; the official classes are {', '.join(ENCODER_CLASSES)}."
        )
    weight_key, allowed = ENCODER_CLASSES[cls]
    enc_params = dict(p["encoder_params"] or {})
    bad = sorted(set(enc_params) - allowed)
    if bad:
        raise RaebenchError(
            f"stage_1.params.encoder_params has unknown key(s) {', '.join(bad)} for {cls}; "
            f"allowed: {', '.join(sorted(allowed))}."
        )
    config_path = str(p["encoder_config_path"])
    weights_path = str(enc_params.get(weight_key, config_path))
    enc_dir = resolve_official_path(weights_path, base_dir, what=f"encoder ({weight_key})", kind="repo")
    cfg_dir = enc_dir if config_path == weights_path else _preprocessor_dir(config_path, base_dir, enc_dir)
    encoder = load_hf_encoder(
        enc_dir, input_size=int(p["encoder_input_size"]), config_dir=cfg_dir,
        affine_final_norm=not bool(enc_params.get("normalize", True)),
        source=weights_path if _is_repo_id(weights_path) else str(enc_dir),
    )

    # decoder
    dcp = str(p["decoder_config_path"])
    patch, grid = int(p["decoder_patch_size"]), encoder.grid_size
    try:
        cfg_file = resolve_official_path(dcp, base_dir, what="decoder config (decoder_config_path)", kind="config")
        dcfg = official_config(cfg_file, latent_dim=encoder.hidden_size, patch_size=patch, grid_size=grid)
    except MissingWeightsError:
        preset = _PRESET_RE.search(dcp.replace("\\", "/"))
        if preset is None:
            raise
        dcfg = preset_config(preset.group(1), latent_dim=encoder.hidden_size, patch_size=patch, grid_size=grid)
    decoder = build_decoder(dcfg)
    weights_file = None  # the last file loaded into the decoder, for provenance
    if p["pretrained_decoder_path"] is not None:
        weights_file = resolve_official_path(
            str(p["pretrained_decoder_path"]), base_dir, what="decoder weights (pretrained_decoder_path)"
        )
        load_decoder_weights(decoder, weights_file)
    if stage1.get("ckpt") is not None:  # a stage-1 training checkpoint: its EMA decoder wins, as officially
        weights_file = resolve_official_path(str(stage1["ckpt"]), base_dir, what="stage-1 checkpoint (stage_1.ckpt)")
        load_decoder_weights(decoder, weights_file)
    if weights_file is None:
        log.warning("stage_1 names no decoder weights (pretrained_decoder_path or ckpt): the decoder is randomly initialised")

    # statistics
    stats = None
    if p["normalization_stat_path"] is not None:
        what = "latent statistics (normalization_stat_path)"
        stats_path = resolve_official_path(str(p["normalization_stat_path"]), base_dir, what=what)
        stats = LatentStats.load(stats_path, eps=float(p["eps"]))
    from raebench.metrics.extractors import fingerprint_path

    # every file that changes the outputs: decoder, encoder (a Hub id as named, a local folder by content), statistics
    weights_id = f"official:{weights_file.name}@{fingerprint_path(weights_file)}" if weights_file is not None else "random"
    weights_id += f"+enc:{weights_path if _is_repo_id(weights_path) else fingerprint_path(enc_dir)}"
    if stats is not None:
        weights_id += f"+stats:{fingerprint_path(stats_path)}"
    tok = RAETokenizer(encoder, decoder, stats, noise_tau=float(p["noise_tau"]), weights_id=weights_id)
    tok.name = name
    tok = tok.eval()
    return tok.to(device) if device is not None else tok


# ---------------------------------------------------------------------------------------------
# The whole config
# ---------------------------------------------------------------------------------------------


@dataclass
class OfficialRAE:
    """What an official YAML describes. ``.tokenizer`` is built eagerly; stage 2 lazily."""

    config: Any  # omegaconf.DictConfig
    base_dir: Path
    tokenizer: Any  # RAETokenizer
    path: Path | None = None
    device: str | torch.device | None = None  # where stage 2 (model and AutoGuidance guide) is built

    @property
    def latent_size(self) -> tuple[int, ...]:
        misc = self.config.get("misc") or {}
        if misc.get("latent_size") is not None:
            return tuple(int(v) for v in misc["latent_size"])
        return tuple(self.tokenizer.latent_shape())

    @property
    def num_classes(self) -> int | None:
        misc = self.config.get("misc") or {}
        return None if misc.get("num_classes") is None else int(misc["num_classes"])

    @functools.cached_property
    def stage2(self) -> Any:
        """``raebench.stage2.official.build_from_official(config, base_dir, device)``, built on first use.

        It returns ``(model, sampler)`` (or an object with ``.model`` and ``.sample``); :attr:`model`
        and :meth:`sample` expose them.
        """
        if self.config.get("stage_2") is None:
            raise RaebenchError(f"The config {str(self.path or '')!r} has no stage_2 block, so it describes no diffusion model.")
        try:
            mod = importlib.import_module("raebench.stage2.official")
        except ModuleNotFoundError as e:
            if e.name in ("raebench.stage2", "raebench.stage2.official"):
                raise RaebenchError("This raebench build has no stage-2 support (raebench.stage2.official is missing).") from None
            raise
        return mod.build_from_official(self.config, self.base_dir, device=self.device)

    @property
    def model(self) -> Any:
        """The stage-2 network, callable as ``model(x, t, y)``."""
        s = self.stage2
        return s[0] if isinstance(s, tuple) else s.model

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        """Stage-2 sampling ``sample(noise, labels, num_steps=None, method=None, cfg_scale=None,
        cfg_interval=None)`` -> normalised latents; None means "as the YAML says"."""
        s = self.stage2
        return s[1](*args, **kwargs) if isinstance(s, tuple) else s.sample(*args, **kwargs)


def load_official_yaml(path: str | os.PathLike) -> Any:
    from omegaconf import OmegaConf

    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingWeightsError(f"The config file {str(p)!r} does not exist.")
    try:
        return OmegaConf.load(p)
    except Exception as e:
        first = str(e).splitlines()[0][:100] if str(e) else ""
        raise RaebenchError(f"The config {str(p)!r} is not valid YAML ({type(e).__name__}: {first}).") from None


def from_official_config(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> OfficialRAE:
    """Read an official RAE YAML (a path, or an already-loaded mapping) into an :class:`OfficialRAE`.

    ``base_dir`` anchors relative paths (default: the YAML's folder, then its parents, then the
    working directory).
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = None
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser().resolve()
        cfg = load_official_yaml(path)
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        cfg = OmegaConf.create(dict(plain_config(config)))
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    where = str(path or "<mapping>")
    if not isinstance(cfg, DictConfig):
        raise RaebenchError(f"The config {where!r} is a YAML {type(plain_config(cfg)).__name__}, not a mapping of blocks.")
    try:
        OmegaConf.to_container(cfg, resolve=True)  # every ${...} interpolation, checked once up front
    except OmegaConfBaseException as e:
        raise RaebenchError(f"The config {where!r} cannot be resolved ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
    if cfg.get("stage_1") is None:
        raise RaebenchError(f"The config {where!r} has no stage_1 block; it is not an RAE config.")
    if not isinstance(cfg.stage_1, DictConfig):
        raise RaebenchError(f"The config {where!r} has a stage_1 that is not a block (target, params): {cfg.stage_1!r}.")
    name = "rae-official" + (f"-{re.sub(r'[^a-z0-9.]+', '-', path.stem.lower()).strip('-')}" if path is not None else "")
    try:
        tok = build_stage1(cfg.stage_1, base, device=device, name=name)
    except RaebenchError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OmegaConfBaseException) as e:  # a malformed value
        raise RaebenchError(f"The config {where!r} has a malformed stage_1 block ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    out = OfficialRAE(cfg, base.resolve(), tok, path, device)
    misc = cfg.get("misc") or {}
    if misc.get("latent_size") is not None and tuple(misc["latent_size"]) != tuple(tok.latent_shape()):
        log.warning("misc.latent_size %s differs from the tokenizer's latents %s", list(misc["latent_size"]), tok.latent_shape())
    return out


__all__ = ["OfficialRAE", "build_stage1", "from_official_config", "plain_config", "resolve_official_path"]
