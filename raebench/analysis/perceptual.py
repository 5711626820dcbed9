"""Per-pair image distances for the diagnostics: LPIPS from the metrics package, or pixel RMSE.

A distance is ``(uint8 (N, 3, H, W), uint8 (N, 3, H, W)) -> (N,)``. LPIPS is the metrics package's
``lpips-alex`` / ``lpips-vgg`` metric (its per-image ``distances``), so its weights, their offline
resolution (``RAEBENCH_LPIPS_ALEX_WEIGHTS`` or ``$TORCH_HOME/hub/checkpoints``) and its version are
those of ``raebench eval``; this module builds no copy of its own. ``auto`` uses LPIPS-AlexNet when
it can be built (41 pairs/s on CPU, against 1.5 for VGG) and otherwise leaves LPIPS out with a
logged reason, and the interpolation distance falls back to RMSE. The distance's name is part of
every metric name, so rows made with different distances never mix.
"""

from __future__ import annotations

import logging

import torch

from raebench.analysis.diagnostics import Distance, rmse_distance
from raebench.errors import RaebenchError

log = logging.getLogger(__name__)

PERCEPTUAL_CHOICES = ("auto", "lpips-alex", "lpips-vgg", "rmse", "none")


def _lpips_from_metrics(net: str, device: torch.device) -> tuple[Distance, str]:
    """LPIPS through the metrics package; RaebenchError (MissingWeightsError) when unavailable."""
    from raebench.metrics import METRICS

    spec = METRICS.get(f"lpips-{net}")
    metric = spec.build(device=device)
    return (lambda a, b: metric.per_image(a, b).double().cpu()), spec.version


def build_distance(choice: str, device: torch.device) -> tuple[Distance | None, str | None, str | None, str | None]:
    """-> ``(distance, name, version, reason)``; ``distance`` is None when no perceptual distance
    is used, and ``reason`` then says why (for the log and the run record)."""
    if choice not in PERCEPTUAL_CHOICES:
        raise RaebenchError(f"Unknown --perceptual {choice!r}; use one of {', '.join(PERCEPTUAL_CHOICES)}.")
    if choice == "none":
        return None, None, None, "--perceptual none"
    if choice == "rmse":
        return rmse_distance, "rmse", "rmse-u8-v1", None
    net = "alex" if choice == "auto" else choice.split("-", 1)[1]
    try:
        fn, version = _lpips_from_metrics(net, device)
        return fn, f"lpips-{net}", version, None
    except RaebenchError as e:
        if choice != "auto":
            raise
        log.warning("%s LPIPS rows are left out.", e)
        return None, None, None, str(e)
