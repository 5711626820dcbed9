"""TF32 on CUDA, set and restored in one place.

PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs (and matmuls when asked),
which moves float32 results far beyond float32 rounding. raebench runs float32 work in full
precision (``fp32`` rows mean fp32) except where a recipe asks for TF32 (stage-2 training, as the
official trainer). Torch >= 2.9 has a new API (``fp32_precision``); once anything sets it, reading
the legacy ``allow_tf32`` flags raises, so the new API is used wherever it exists.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _new_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _get() -> tuple:
    if _new_api():
        return ("new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    return ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def _set(state: tuple) -> None:
    kind, matmul, conv = state
    if kind == "new":
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def state_for(enabled: bool) -> tuple:
    """The flag values that allow (``enabled``) or forbid TF32 for matmuls and convolutions."""
    if _new_api():
        mode = "tf32" if enabled else "ieee"
        return ("new", mode, mode)
    return ("legacy", enabled, enabled)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 allowed (``enabled``) or forbidden for matmuls and cuDNN convolutions inside; the
    previous settings come back afterwards. A no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    prev = _get()
    _set(state_for(enabled))
    try:
        yield
    finally:
        _set(prev)
