"""Per-pair image distances for the diagnostics: LPIPS from the metrics package, or pixel RMSE.

A distance is ``(uint8 (N, 3, H, W), uint8 (N, 3, H, W)) -> (N,)``. LPIPS is the metrics package's
``lpips-alex`` / ``lpips-vgg`` metric (its per-image ``distances``), so its weights, their offline
resolution (``RAEBENCH_LPIPS_ALEX_WEIGHTS`` or ``$TORCH_HOME/hub/checkpoints``) and its version are
those of ``raebench eval``; this module builds no copy of its own. ``auto`` uses LPIPS-AlexNet when
it can be built (41 pairs/s on CPU, against 1.5 for VGG) and otherwise leaves LPIPS out with a
logged reason, and the interpolation distance falls back to RMSE; the same when ``--resolution``
is below the smallest image the LPIPS network takes (``MetricSpec.min_image_side``), which an
explicit ``lpips-*`` refuses up front. The distance's name is part of every metric name and its
version (with the fingerprint of the backbone weights) part of every metric version, so rows made
with different distances or weights never mix.
"""

from __future__ import annotations

import logging

import torch

from raebench.analysis.diagnostics import Distance, rmse_distance
from raebench.errors import RaebenchError

log = logging.getLogger(__name__)

PERCEPTUAL_CHOICES = ("auto", "lpips-alex", "lpips-vgg", "rmse", "none")


def _lpips_from_metrics(net: str, device: torch.device, resolution: int | None) -> tuple[Distance, str]:
    """LPIPS through the metrics package; RaebenchError (MissingWeightsError) when unavailable or
    when ``resolution`` is too small for it."""
    from raebench.metrics import METRICS

    spec = METRICS.get(f"lpips-{net}")
    if resolution is not None and resolution < spec.min_image_side:
        raise RaebenchError(f"{spec.name} needs images of at least {spec.min_image_side} px and --resolution is "
                            f"{resolution}; use --resolution {spec.min_image_side} or more, or --perceptual rmse.")
    metric = spec.build(device=device)
    return (lambda a, b: metric.per_image(a, b).double().cpu()), f"{spec.version}@weights:{metric.weights_id}"


def build_distance(choice: str, device: torch.device, resolution: int | None = None,
                   ) -> tuple[Distance | None, str | None, str | None, str | None]:
    """-> ``(distance, name, version, reason)``; ``distance`` is None when no perceptual distance
    is used, and ``reason`` then says why (for the log and the run record). ``resolution``: the
    side of the images it will compare."""
    if choice not in PERCEPTUAL_CHOICES:
        raise RaebenchError(f"Unknown --perceptual {choice!r}; use one of {', '.join(PERCEPTUAL_CHOICES)}.")
    if choice == "none":
        return None, None, None, "--perceptual none"
    if choice == "rmse":
        return rmse_distance, "rmse", "rmse-u8-v1", None
    net = "alex" if choice == "auto" else choice.split("-", 1)[1]
    try:
        fn, version = _lpips_from_metrics(net, device, resolution)
        return fn, f"lpips-{net}", version, None
    except RaebenchError as e:
        if choice != "auto":
            raise
        log.warning("%s LPIPS rows are left out.", e)
        return None, None, None, str(e)
