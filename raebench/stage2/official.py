"""Build the stage-2 model and sampler from an official RAE YAML (``configs/stage2/...``).

Schema used (the official one; unknown keys elsewhere in the file are ignored):

- ``stage_2``: ``target`` (``...DDT.DiTwDDTHead`` or ``...lightningDiT.LightningDiT``), ``params``
  (constructor keywords, passed through unchanged so typos fail), optional ``ckpt`` (a state dict,
  ``{'ema': ...}`` or the official training checkpoint, whose ``ema`` is used). Paths resolve as
  in :func:`raebench.official.resolve_official_path`: absolute, against ``base_dir`` and the folders
  above it (the official configs name ``models/...`` relative to the repository root), the working
  directory, then ``models/...`` as files of the RAE-collections Hub repository.
- ``transport.params``: ``path_type`` Linear, ``prediction`` velocity, ``time_dist_type``.
- ``sampler``: ``mode`` ODE | SDE and ``params``, the official ``sample_ode``/``sample_sde`` keywords
  (any other key is refused, as there): ``sampling_method`` euler | heun2 | dopri5 for ODE,
  ``num_steps`` (default 50 for ODE, 250 for SDE, the official defaults), ``atol``, ``rtol``
  (``reverse: true`` is refused); for SDE ``sampling_method`` euler (Euler-Maruyama) | heun,
  ``diffusion_form`` (default here "sigma": the official default "SBDM" gives NaN for this path and is
  rejected), ``diffusion_norm``, ``last_step`` Mean | Tweedie | Euler | null, ``last_step_size``).
- ``guidance``: ``method`` cfg | autoguidance, ``scale`` (as in the official scripts, guidance is on
  only when scale > 1), ``t_min``/``t_max`` (the official sampling configs spell them
  ``t-min``/``t-max``; both are read, underscores first, as ``src/sample_ddp.py`` does),
  ``guidance_model`` (target/params/ckpt) for AutoGuidance (loaded when guidance is on; with a YAML
  scale <= 1 it is loaded only if a later ``cfg_scale`` > 1 asks for guidance).
- ``misc``: ``latent_size`` [C, H, W], ``num_classes``, ``null_label`` (the CFG null class; default the
  model's ``num_classes``), ``time_dist_shift_dim`` (default C*H*W) and ``time_dist_shift_base``
  (default 4096): shift s = sqrt(dim / base).

Unlike the official loader, checkpoints are read with ``weights_only=True`` and loaded strictly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from raebench.errors import CheckpointError, MissingWeightsError, RaebenchError
from raebench.official import plain_config, resolve_official_path
from raebench.stage2.checkpoints import load_stage2_state
from raebench.stage2.models import DiTDH, LightningDiT
from raebench.stage2.samplers import canonical_last_step, canonical_method, diffusion_coefficient, has_null_class, sample

log = logging.getLogger(__name__)

_TARGETS = {"DiTwDDTHead": DiTDH, "DDT": DiTDH, "LightningDiT": LightningDiT}


def build_official_model(
    section: Mapping[str, Any], base_dir: str | Path | None = None, device: str | torch.device | None = None,
) -> nn.Module:
    """A ``{target, params, ckpt}`` block -> eval-mode model with the checkpoint loaded strictly."""
    target = str(section.get("target", ""))
    cls = _TARGETS.get(target.rsplit(".", 1)[-1])
    if cls is None:
        raise RaebenchError(
            f"Unknown stage-2 target {target!r}; expected stage2.models.DDT.DiTwDDTHead or "
            "stage2.models.lightningDiT.LightningDiT."
        )
    params = dict(section.get("params") or {})
    try:
        model = cls(**params)
    except TypeError as e:
        raise RaebenchError(f"stage_2.params do not fit {cls.__name__}: {e}; fix the YAML keys.") from e
    ckpt = section.get("ckpt")
    if ckpt:
        try:
            path = resolve_official_path(str(ckpt), base_dir, what="stage-2 checkpoint (ckpt)")
        except MissingWeightsError as e:
            raise CheckpointError(str(e)) from None
        if not path.is_file():
            raise CheckpointError(f"The stage-2 checkpoint {str(path)!r} is a folder, not a file; fix `ckpt` in the YAML.")
        load_stage2_state(model, path)
        from raebench.metrics.extractors import fingerprint_path

        model.weights_id = f"{path.name}@{fingerprint_path(path)}"  # recorded with samples drawn from it
    else:
        log.warning("no `ckpt` in the stage-2 YAML block: %s is randomly initialised", cls.__name__)
        model.weights_id = "random"
    model = model.eval()
    return model.to(device) if device is not None else model


def _guidance_value(guidance: Mapping[str, Any], key: str, default: float) -> float:
    if key in guidance:
        return float(guidance[key])
    return float(guidance.get(key.replace("_", "-"), default))


# the keyword arguments of the official Sampler.sample_ode / sample_sde (src/stage2/transport/transport.py)
_SAMPLER_KEYS = {
    "ODE": frozenset({"sampling_method", "num_steps", "atol", "rtol", "reverse"}),
    "SDE": frozenset({"sampling_method", "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "num_steps"}),
}


class _LazyGuide:
    """The AutoGuidance model of a YAML whose own scale does not guide: loaded on the first guided call."""

    def __init__(self, section: Mapping[str, Any], base_dir: str | Path | None, device) -> None:
        self.section, self.base_dir, self.device = section, base_dir, device
        self.model: nn.Module | None = None

    def get(self) -> nn.Module:
        if self.model is None:
            self.model = build_official_model(self.section, self.base_dir, self.device)
        return self.model


@dataclass
class OfficialSampler:
    """``sampler(noise, labels, num_steps=None, method=None, cfg_scale=None, cfg_interval=None)``.

    Returns normalised latents (N, C, H, W); each None means "as the YAML says". ``method`` is
    'euler' or 'heun' (torchdiffeq heun2), also 'adaptive', 'euler-maruyama' and 'sde-heun'.
    An explicit ``cfg_scale`` != 1 guides: with the YAML's AutoGuidance model when it names one (loaded
    then, if the YAML's own scale did not guide), by classifier-free guidance otherwise.
    """

    model: nn.Module
    shift: float
    num_steps: int
    method: str
    cfg_scale: float
    cfg_interval: tuple[float, float]
    guide: nn.Module | _LazyGuide | None = None
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion_norm: float = 1.0
    diffusion_form: str = "sigma"
    last_step: str | None = "mean"
    last_step_size: float = 0.04
    null_class: int | None = None  # None: the model's num_classes

    def __call__(
        self,
        noise: torch.Tensor,
        labels: torch.Tensor,
        num_steps: int | None = None,
        method: str | None = None,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        scale = float(cfg_scale if cfg_scale is not None else self.cfg_scale)
        guide = self.guide
        if isinstance(guide, _LazyGuide):
            guide = guide.get() if scale != 1.0 else None
        return sample(
            self.model, noise, torch.as_tensor(labels, device=noise.device).long(),
            num_steps=int(num_steps if num_steps is not None else self.num_steps),
            method=method if method is not None else self.method,
            shift=self.shift,
            cfg_scale=scale,
            cfg_interval=tuple(cfg_interval if cfg_interval is not None else self.cfg_interval),
            guide=guide, rtol=self.rtol, atol=self.atol, diffusion_norm=self.diffusion_norm,
            generator=generator, diffusion_form=self.diffusion_form, last_step=self.last_step,
            last_step_size=self.last_step_size, null_class=self.null_class,
        )


def build_from_official(
    cfg: Any, base_dir: str | Path | None = None, device: str | torch.device | None = None,
) -> tuple[nn.Module, OfficialSampler]:
    """Parsed official YAML (dict or OmegaConf) -> (model, sample_fn) on ``device``; see the module docstring.

    Every value is checked here, before any sampling: a malformed one (a list where a block belongs,
    text where a number belongs, an impossible step count, guidance interval, class count or latent
    size) is a :class:`RaebenchError` naming it."""
    cfg = plain_config(cfg)
    if not isinstance(cfg, Mapping) or "stage_2" not in cfg:
        raise RaebenchError("The YAML has no `stage_2` block; pass an official RAE stage-2 config.")
    try:
        return _build_from_official(cfg, base_dir, device)
    except RaebenchError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a malformed value the checks did not name
        raise RaebenchError(f"The YAML's stage-2 blocks hold a malformed value ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}).") from None


def _block(cfg: Mapping[str, Any], key: str, where: str = "") -> dict:
    """``cfg[key]`` as a dict ({} when absent or null); anything else is refused."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RaebenchError(f"`{where}{key}` in the YAML must be a block of keys, not {type(value).__name__} {value!r}.")
    return dict(value)


def _number(block: Mapping[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = block.get(key, default)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = kind(value)
    except (TypeError, ValueError):
        raise RaebenchError(f"`{where}.{key}` must be {'an integer' if kind is int else 'a number'}, got {value!r}.") from None
    if not math.isfinite(out):
        raise RaebenchError(f"`{where}.{key}` must be finite, got {value!r}.")
    return out


def _build_from_official(cfg: Mapping[str, Any], base_dir, device) -> tuple[nn.Module, OfficialSampler]:
    _block(cfg, "stage_2")
    misc = _block(cfg, "misc")
    transport = _block(_block(cfg, "transport"), "params", "transport.")
    sampler_cfg = _block(cfg, "sampler")
    sp = _block(sampler_cfg, "params", "sampler.")
    guidance = _block(cfg, "guidance")
    method_name = guidance.get("method", "cfg")
    if method_name not in ("cfg", "autoguidance"):  # the official scripts treat anything else as cfg, silently
        raise RaebenchError(f"guidance.method {method_name!r} is not cfg or autoguidance (lower case, as the official "
                            "scripts compare it).")
    num_steps = _number(sp, "num_steps", 250 if str(sampler_cfg.get("mode", "ODE")).upper() == "SDE" else 50, int,
                        "sampler.params")
    if num_steps < 2:
        raise RaebenchError(f"sampler.params.num_steps must be at least 2 (the points of the time grid), got {num_steps}.")
    scale = _number(guidance, "scale", 1.0, float, "guidance")
    interval = (_guidance_value(guidance, "t_min", 0.0), _guidance_value(guidance, "t_max", 1.0))
    if not (math.isfinite(interval[0]) and math.isfinite(interval[1]) and interval[0] < interval[1]):
        raise RaebenchError(f"guidance t_min/t_max must be finite with t_min < t_max, got {interval[0]} and {interval[1]}.")
    model = build_official_model(cfg["stage_2"], base_dir, device)
    model_shape = (model.in_channels, model.input_size, model.input_size)
    if misc.get("latent_size") is not None:
        try:
            latent_size = tuple(int(v) for v in misc["latent_size"])
        except (TypeError, ValueError):
            raise RaebenchError(f"misc.latent_size must be [C, H, W], got {misc['latent_size']!r}.") from None
        if latent_size != model_shape:
            raise RaebenchError(f"misc.latent_size {list(latent_size)} is not the stage-2 model's latent shape "
                                f"{list(model_shape)} (stage_2.params); the two must agree.")
    if misc.get("num_classes") is not None:
        asked = _number(misc, "num_classes", None, int, "misc")
        if not 1 <= asked <= model.num_classes:
            raise RaebenchError(f"misc.num_classes {asked} is not between 1 and the {model.num_classes} classes of the "
                                f"stage-2 model (label {model.num_classes} is its null class).")
    if transport.get("path_type", "Linear") != "Linear" or transport.get("prediction", "velocity") != "velocity":
        raise RaebenchError("Only the Linear path with velocity prediction is supported (transport.params).")

    shift_dim = _number(misc, "time_dist_shift_dim", math.prod(model_shape), float, "misc")
    shift_base = _number(misc, "time_dist_shift_base", 4096, float, "misc")
    if shift_dim <= 0 or shift_base <= 0:
        raise RaebenchError(f"misc.time_dist_shift_dim and time_dist_shift_base must be positive, got {shift_dim} and {shift_base}.")
    shift = math.sqrt(shift_dim / shift_base)

    mode = str(sampler_cfg.get("mode", "ODE")).upper()
    if mode not in _SAMPLER_KEYS:
        raise RaebenchError(f"sampler.mode {sampler_cfg.get('mode')!r} is not supported; use ODE or SDE.")
    unknown = sorted(set(sp) - _SAMPLER_KEYS[mode])
    if unknown:  # the official sample_ode / sample_sde take keyword arguments only: a typo fails there too
        raise RaebenchError(f"sampler.params has {', '.join(map(repr, unknown))}, which the official {mode} sampler "
                            f"does not take; its keys are {', '.join(sorted(_SAMPLER_KEYS[mode]))}.")
    if mode == "ODE" and sp.get("reverse"):
        raise RaebenchError("sampler.params.reverse: true integrates from data to noise; raebench samples only from "
                            "noise to data (leave reverse out or false).")
    sde = dict(diffusion_form=str(sp.get("diffusion_form", "sigma")), last_step=sp.get("last_step", "Mean"),
               last_step_size=float(sp.get("last_step_size", 0.04)))
    if mode == "SDE":
        sde_method = str(sp.get("sampling_method", "euler")).lower()  # the official default "Euler" fails there
        if sde_method not in ("euler", "heun"):
            raise RaebenchError(f"SDE sampling_method {sp.get('sampling_method')!r} is not supported; use euler or heun.")
        method = "euler-maruyama" if sde_method == "euler" else "sde-heun"
        try:
            diffusion_coefficient(sde["diffusion_form"], torch.ones(1))
            canonical_last_step(sde["last_step"])
        except ValueError as e:
            raise RaebenchError(f"sampler.params: {e}") from e
    else:
        try:
            method = canonical_method(str(sp.get("sampling_method", "dopri5")))
        except ValueError:
            raise RaebenchError(f"ODE sampling_method {sp.get('sampling_method')!r} is not supported; use euler, "
                                "heun2 or dopri5.") from None
        if method in ("euler-maruyama", "sde-heun"):
            raise RaebenchError(f"sampling_method {sp.get('sampling_method')!r} is an SDE method; set sampler.mode: SDE.")
    scale = scale if scale > 1.0 else 1.0  # the official scripts guide only when scale > 1
    guide = None
    if method_name == "autoguidance":
        if not guidance.get("guidance_model"):
            raise RaebenchError("guidance.method is autoguidance but guidance.guidance_model is missing.")
        if scale > 1.0:
            guide = build_official_model(guidance["guidance_model"], base_dir, device)
        else:  # unguided as the YAML stands; built if a cfg_scale > 1 is asked for later
            guide = _LazyGuide(guidance["guidance_model"], base_dir, device)
    null_class = int(misc.get("null_label", getattr(model, "num_classes", 1000)))
    rows = model.y_embedder.embedding_table.num_embeddings
    if scale > 1.0 and not has_null_class(model, null_class):
        raise RaebenchError(
            f"The CFG null class {null_class} (misc.null_label, default num_classes) is not a row of the "
            f"model's {rows}-row label table; set misc.null_label or train with class_dropout_prob > 0."
        )
    sampler = OfficialSampler(
        model=model,
        shift=shift,
        num_steps=num_steps,  # default 50 for ODE, 250 for SDE: the official defaults
        method=method,
        cfg_scale=scale,
        cfg_interval=interval,
        guide=guide,
        atol=_number(sp, "atol", 1e-6, float, "sampler.params"),
        rtol=_number(sp, "rtol", 1e-3, float, "sampler.params"),
        diffusion_norm=_number(sp, "diffusion_norm", 1.0, float, "sampler.params"),
        null_class=null_class,
        **sde,
    )
    return model, sampler
