"""Safe checkpoint I/O shared by every loader: never unpickle code, always write atomically.

``load_state`` reads ``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``, whose unpickler only accepts tensors and plain containers: a
pickle that carries a code payload (``__reduce__`` calling ``os.system``...) is refused with a
:class:`CheckpointError` before anything runs. ``save_atomic`` writes to a temporary file in the
target folder, fsyncs and renames, so a crash leaves the old checkpoint or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raebench.errors import CheckpointError, first_line


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing code. Raises CheckpointError for unsafe/corrupt files."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a folder; a checkpoint file is needed here.")
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {str(p)!r} does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"Checkpoint {str(p)!r} is not a valid safetensors file ({e}).") from None
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"Checkpoint {str(p)!r} is empty (0 bytes): corrupt or truncated.")
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip archive, or a protocol-2+ pickle
        raise CheckpointError(f"{str(p)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                              "pickle); point to the weights file.")
    # a zip checkpoint loaded to the CPU is memory-mapped (copy on write): the ranks of a job resuming
    # from one XL checkpoint (~13 GB with optimizer state) share its pages instead of 8 private copies
    mmap = head.startswith(b"PK") and str(map_location) == "cpu"
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {str(p)!r}: it contains pickled objects other than tensors and plain containers "
            f"(possibly code); raebench only loads weights (detail: {first_line(e, 160)})."
        ) from None
    except Exception as e:  # a corrupt zip/pickle surfaces as any of RuntimeError, EOFError, KeyError, IndexError...
        raise CheckpointError(f"Checkpoint {str(p)!r} is corrupt or truncated ({type(e).__name__}: {first_line(e, 120)}).") from None


def load_strict(module: torch.nn.Module, state: Any, *, what: str, path: str | os.PathLike) -> None:
    """``module.load_state_dict(state, strict=True)``; keys or shapes that do not fit are a
    CheckpointError naming the file and the first offending keys, not a RuntimeError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not the state dict of {what}.")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r} does not fit {what}: {load_error_summary(e)}.") from None


def resume_states(ck: Any, path: str | os.PathLike, targets: dict[str, Any], advice: str,
                  also: tuple[str, ...] = ("step",)) -> None:
    """Load a training checkpoint's states into ``targets`` (checkpoint key -> module, optimizer or
    scheduler), modules strictly; the keys in ``also`` (e.g. the step) must be present. A missing key
    or a state that does not fit is one CheckpointError naming the file and the key (then ``advice``),
    not a raw traceback."""
    if not isinstance(ck, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(ck).__name__}, not a training checkpoint; {advice}")
    missing = [k for k in (*targets, *also) if k not in ck]
    if missing:
        raise CheckpointError(f"{str(path)!r} has no {', '.join(missing)} state, so the run cannot resume; {advice}")
    for key, target in targets.items():
        if isinstance(target, torch.nn.Module):
            try:
                load_strict(target, ck[key], what=f"the run's {key}", path=path)
            except CheckpointError as e:
                raise CheckpointError(f"{e} {advice[0].upper()}{advice[1:]}") from None
            continue
        try:  # optimizers and schedulers check little themselves: a wrong state fails later, or here
            target.load_state_dict(ck[key])
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{str(path)!r}: its {key} state does not fit this run ({type(e).__name__}: "
                                  f"{first_line(e)}); {advice}") from None


def load_error_summary(e: BaseException) -> str:
    """The first lines of torch's load_state_dict report, on one line and shortened."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e).strip()]
    text = "; ".join(ln.rstrip(".") for ln in lines)
    return text if len(text) <= 300 else text[:297] + "..."


def read_json_object(path: str | os.PathLike, error: type[Exception] = CheckpointError, advice: str = "") -> dict[str, Any]:
    """A file that must hold a JSON object; anything else is ``error`` naming the file (then ``advice``,
    e.g. "; rebuild the cache")."""
    import json

    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{str(p)!r} is not a readable JSON file ({e}){advice}.") from None
    if not isinstance(obj, dict):
        raise error(f"{str(p)!r} must hold a JSON object, not a {type(obj).__name__}{advice}.")
    return obj


#: diffusers' message for a tensor whose shape differs from the config's model (model_loading_utils)
_DIFFUSERS_SHAPE = re.compile(r"because (\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got torch\.Size\(\[([^\]]*)\]\)")


def strict_from_pretrained(
    cls: Any,
    folder: str | os.PathLike,
    *,
    what: str,
    unexpected_ok: Callable[[str], bool] | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained`` (transformers or diffusers) on a local folder, every weight accounted for.

    Both libraries only log a warning for a checkpoint that does not fit: a missing weight stays
    randomly initialised (or on the meta device, which fails later), an unused one is dropped. Here
    missing, mismatched, unloaded and (unless ``unexpected_ok(key)``) unused keys are a
    :class:`CheckpointError` naming them, and so is anything the loader raises on a broken folder
    (invalid JSON, a truncated safetensors file, a pickle with code). Nothing is downloaded and no
    remote code runs.
    """
    folder = Path(folder)
    if cls.__module__.startswith("transformers"):  # report mismatched shapes in the loading info, checked below
        kwargs.setdefault("ignore_mismatched_sizes", True)
    with _quiet_hf_loggers():
        try:
            model, info = cls.from_pretrained(str(folder), output_loading_info=True, local_files_only=True, **kwargs)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"Refused to load {what} from {str(folder)!r}: its pickled weights contain objects other than tensors "
                "(possibly code); use a safetensors copy."
            ) from None
        except Exception as e:  # OSError, ValueError (JSON), RuntimeError/ValueError (shapes), SafetensorError...
            shape = _DIFFUSERS_SHAPE.search(str(e))
            if shape:  # diffusers raises on the first mismatch, advising ignore_mismatched_sizes (random layers)
                key, want, got = shape.groups()
                raise CheckpointError(
                    f"The weights in {str(folder)!r} do not fit {what} as its config.json describes it: {key} has "
                    f"shape ({got}) in the file, ({want}) in the model that config builds (a config.json of other "
                    "weights, or weights of another model size).") from e
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"Cannot load {what} from {str(folder)!r} ({type(e).__name__}: {first}).") from e
    unexpected = [k for k in info.get("unexpected_keys") or () if not (unexpected_ok and unexpected_ok(k))]
    missing = sorted(info.get("missing_keys") or ())
    tensors = [*model.named_parameters(), *model.named_buffers()]
    problems = {
        "missing": missing,
        "not matching in shape": [str(k) for k in info.get("mismatched_keys") or ()],
        "unused": sorted(unexpected),
        "left unloaded (meta device)": [n for n, t in tensors if t.is_meta and n not in missing],
        "failing to load": [str(m).splitlines()[0] for m in info.get("error_msgs") or ()],
    }
    parts = [f"{len(v)} {k} ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})" for k, v in problems.items() if v]
    if parts:
        raise CheckpointError(f"The weights in {str(folder)!r} do not fit {what}: {'; '.join(parts)}.")
    return model


@contextlib.contextmanager
def _quiet_hf_loggers():
    """transformers/diffusers warn about the keys checked above (the check reports them instead), and
    transformers draws a loading bar; both are silenced for the call and restored after."""
    import logging
    import sys

    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging = getattr(sys.modules.get("transformers"), "utils", None)
    hf_logging = getattr(hf_logging, "logging", None)
    bar = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bar:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bar:
            hf_logging.enable_progress_bar()


def run_checkpoint(source: str | os.PathLike, what: str) -> Path:
    """A training run folder (``checkpoints/last.pt`` inside) or a checkpoint file -> the checkpoint file."""
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"No {what} checkpoint at {str(p)!r}; give a run folder or its checkpoints/last.pt.")
    return p


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
