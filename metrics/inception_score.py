"""Inception Score (Salimans et al. 2016), torch-fidelity's definition.

Candidates only. Logits of the TF Inception graph without the bias (torch-fidelity's
``logits_unbiased``, 1008 classes), images shuffled by ``RandomState(2020).permutation(N)``, 10
contiguous splits; per split exp(mean_i KL(p(y|x_i) ‖ p(y))) in float64; reports the mean (``is``)
and the population std over splits (``is-std``).
"""

from __future__ import annotations

import torch

from raebench.metrics import neighbours as nb
from raebench.metrics.base import Metric, MetricBatch, MetricSpec, register_metric, require_images


IS_SPLITS = 10
IS_SEED = 2020


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int | None = IS_SEED) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` of (N, C) logits (shuffled when seeded):
    torch-fidelity's own ``isc_features_to_metric`` (float64)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits, shuffle=seed is not None, rng_seed=seed or 0)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


class InceptionScore(Metric):
    def __init__(self, spec: MetricSpec) -> None:
        super().__init__(spec)
        self.reset()

    def reset(self) -> None:
        self.notes = []
        self.logits: list = []

    def update(self, batch: MetricBatch) -> None:
        cand = batch.features.get("inception", (None, None))[1]
        if cand is not None:
            self.logits.append(cand["logits"].detach().to("cpu", copy=True))

    def compute(self) -> dict[str, float]:
        logits = nb.cat(self.logits)
        require_images(self.spec, candidates=logits.shape[0])  # one image per split at least
        mean, std = inception_score(logits)
        return {"is": mean, "is-std": std}


register_metric(
    MetricSpec(
        name="is", higher_is_better=True, kind="distribution", version="is-tfinception-logits-nobias-10split-seed2020-v1",
        description="Inception Score of the candidates, 10 splits (torch-fidelity)",
        builder=lambda spec: InceptionScore(spec), extractors=("inception",), aliases=("inception-score",),
        outputs=(("is-std", None),), candidate_inputs=("inception/logits",), min_images=IS_SPLITS,
    )
)
