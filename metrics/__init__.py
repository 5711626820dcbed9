"""Metrics registry (installed as ``raebench.metrics``). Importing it registers every metric."""

from raebench.metrics.base import (
    EXTRACTORS,
    METRICS,
    ExtractorSpec,
    Metric,
    MetricBatch,
    MetricSpec,
    higher_is_better,
    register_extractor,
    register_metric,
)
from raebench.metrics import pixel  # noqa: F401  (psnr, ssim)

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "ExtractorSpec",
    "Metric",
    "MetricBatch",
    "MetricSpec",
    "higher_is_better",
    "register_extractor",
    "register_metric",
]
