"""Stage-2 checkpoints: read safely (safetensors or ``torch.load(weights_only=True)``), load strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from raebench.errors import CheckpointError


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict safely (safetensors, or ``torch.load(weights_only=True)``).

    Training checkpoints are dicts holding ``ema`` / ``model`` / ``state_dict``; ``key`` picks one,
    otherwise ``ema`` is preferred (what the official release and samplers use), then ``model``, then
    ``state_dict``. ``module.`` and ``_orig_mod.`` prefixes (DDP, torch.compile) are removed.
    """
    from raebench.checkpoint import load_state

    obj = load_state(path)  # safetensors or weights_only unpickling; CheckpointError otherwise
    if isinstance(obj, Mapping) and (key or any(k in obj for k in ("ema", "model", "state_dict"))):
        k = key or next(k for k in ("ema", "model", "state_dict") if k in obj)
        if k not in obj:
            raise CheckpointError(f"Checkpoint {str(path)!r} has no {k!r} entry (it has {sorted(obj)[:8]}).")
        obj = obj[k]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint {str(path)!r} does not hold a state dict.")
    return clean_state_dict(obj, repr(str(path)))


def clean_state_dict(state: Mapping, where: str = "the state dict") -> dict[str, torch.Tensor]:
    """``state`` without ``module.`` / ``_orig_mod.`` prefixes; a non-tensor entry is a :class:`CheckpointError`."""
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{where} is not a state dict of tensors ({', '.join(bad[:5])} "
                              f"{'is not a tensor' if len(bad) == 1 else 'are not tensors'}).")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_stage2_state(model: nn.Module, state: Mapping[str, torch.Tensor] | str | Path, key: str | None = None) -> nn.Module:
    """Load strictly: any missing, unexpected or mis-shaped entry raises :class:`CheckpointError`."""
    state = read_state_dict(state, key) if not isinstance(state, Mapping) else clean_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{label}: {', '.join(items[:10])}{more}")
        raise CheckpointError(
            f"Checkpoint does not match {type(model).__name__} ({'; '.join(parts)}); "
            "check the preset / YAML parameters the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=True)
    return model
