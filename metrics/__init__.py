"""Metrics registry (installed as ``raebench.metrics``). Importing it registers every metric."""

from raebench.metrics.base import (
    EXTRACTORS,
    METRICS,
    ExtractorSpec,
    Metric,
    MetricBatch,
    MetricSpec,
    higher_is_better,
    network_keys,
    register_extractor,
    register_metric,
)
from raebench.metrics import pixel  # noqa: F401  (psnr, ssim)
from raebench.metrics import extractors  # noqa: F401  (inception, dinov2-l14, clip-l14-336)
from raebench.metrics import frechet, inception_score, kernel, manifold, msssim, perceptual  # noqa: F401, E402

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "ExtractorSpec",
    "Metric",
    "MetricBatch",
    "MetricSpec",
    "higher_is_better",
    "network_keys",
    "register_extractor",
    "register_metric",
]
