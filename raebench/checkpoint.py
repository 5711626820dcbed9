"""Safe checkpoint I/O shared by every loader: never unpickle code, always write atomically.

``load_state`` reads ``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``, whose unpickler only accepts tensors and plain containers: a
pickle that carries a code payload (``__reduce__`` calling ``os.system``...) is refused with a
:class:`CheckpointError` before anything runs. ``save_atomic`` writes to a temporary file in the
target folder, fsyncs and renames, so a crash leaves the old checkpoint or the new one, never half.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from raebench.errors import CheckpointError


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing code. Raises CheckpointError for unsafe/corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {str(p)!r} does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"Checkpoint {str(p)!r} is not a valid safetensors file ({e}).") from None
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {str(p)!r}: it contains pickled objects other than tensors and plain containers "
            f"(possibly code); raebench only loads weights (detail: {str(e).splitlines()[0][:160]})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {str(p)!r} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}).") from None


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` (or safetensors for a flat tensor dict and a ``.safetensors`` path) atomically."""
    from raebench.results import atomic_path

    p = Path(path)
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in obj.items()}, str(tmp))
        else:
            torch.save(obj, tmp)
    return p
