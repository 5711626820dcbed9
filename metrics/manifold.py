"""k-NN manifold metrics on Inception pool3 features: precision/recall and density/coverage.

Precision/recall (Kynkäänniemi et al. 2019, torch-fidelity's definition, k = 3): each sample's
ball has radius = distance to its k-th nearest neighbour within its own set.
    precision = fraction of candidates inside at least one reference ball   (d ≤ r)
    recall    = fraction of references inside at least one candidate ball   (d ≤ r)

Density/coverage (Naeem et al. 2020, the prdc package's definition, k = 5), reference balls only:
    density  = 1/(k·M) Σ_j Σ_i 1[d(cand_j, ref_i) < r_i]
    coverage = 1/N Σ_i 1[min_j d(ref_i, cand_j) < r_i]

Features are kept whole (float32, CPU; one copy for every metric that reads them, KID included);
distances are computed in float64 blocks
(:mod:`raebench.metrics.neighbours`), never as an N × N matrix.
"""

from __future__ import annotations

import torch

from raebench.metrics import neighbours as nb
from raebench.metrics.base import Metric, MetricBatch, MetricSpec, register_metric, require_images


class _TwoSetFeatures(Metric):
    """Keeps one extractor output of both sides whole (lists of (n, d) float32 CPU tensors), shared
    with every other metric of the batch that keeps the same output (:meth:`MetricBatch.kept`)."""

    feature = "inception/pool"

    def __init__(self, spec: MetricSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec)
        self.extractor, self.output = self.feature.split("/")
        self.device = torch.device(device)  # where compute() runs (not state: features stay on the CPU)
        self.reset()

    def reset(self) -> None:
        self.notes = []
        self.ref: list = []
        self.cand: list = []

    def update(self, batch: MetricBatch) -> None:
        # the batch's one copy, shared with the other metrics that keep these features (MetricBatch.kept)
        for kept, side in ((self.ref, 0), (self.cand, 1)):
            x = batch.kept(self.extractor, self.output, side)
            if x is not None:
                kept.append(x)

    def _both(self):
        """(references, candidates) as (N, d) tensors on ``self.device``, each side holding
        ``spec.min_images`` at least."""
        ref, cand = nb.cat(self.ref), nb.cat(self.cand)
        require_images(self.spec, candidates=cand.shape[0], references=ref.shape[0])
        return ref.to(self.device), cand.to(self.device)


class PrecisionRecall(_TwoSetFeatures):
    """torch-fidelity's definition (equal values, tested). Not its ``calculate_precision_recall_part``:
    that compares float32 distances in (10000 x N) blocks, 2 GB each at N = 50k; these helpers, shared
    with density/coverage, use float64 blocks of at most 2048 x 2048."""

    k = 3

    def compute(self) -> dict[str, float]:
        ref, cand = self._both()  # float64 distances on the evaluation device (a GPU: seconds at 50k)
        r_ref, r_cand = nb.kth_neighbour_sq(ref, self.k), nb.kth_neighbour_sq(cand, self.k)
        precision = nb.any_within(cand, ref, r_ref).double().mean().item()
        recall = nb.any_within(ref, cand, r_cand).double().mean().item()
        return {"precision": precision, "recall": recall}


class DensityCoverage(_TwoSetFeatures):
    k = 5

    def compute(self) -> dict[str, float]:
        ref, cand = self._both()
        r_ref = nb.kth_neighbour_sq(ref, self.k)
        density = nb.count_within(cand, ref, r_ref).double().sum().item() / (self.k * cand.shape[0])
        coverage = (nb.nearest_sq(ref, cand) < r_ref).double().mean().item()
        return {"density": density, "coverage": coverage}


register_metric(
    MetricSpec(
        name="precision", higher_is_better=True, kind="distribution", version="pr-inception2048-k3-tf-v1",
        description="Precision (and recall), Kynkäänniemi k = 3 on Inception pool3 (torch-fidelity)",
        builder=lambda spec, **o: PrecisionRecall(spec, **o), options=("device",), extractors=("inception",),
        aliases=("pr", "recall"),
        outputs=(("recall", True),), reference_inputs=("inception/pool",), candidate_inputs=("inception/pool",),
        min_images=PrecisionRecall.k + 1,  # a k-th nearest other image on each side
    )
)
register_metric(
    MetricSpec(
        name="density", higher_is_better=True, kind="distribution", version="dc-inception2048-k5-prdc-v1",
        description="Density (and coverage), Naeem et al. k = 5 on Inception pool3 (prdc definition)",
        builder=lambda spec, **o: DensityCoverage(spec, **o), options=("device",), extractors=("inception",),
        aliases=("coverage", "prdc"),
        outputs=(("coverage", True),), reference_inputs=("inception/pool",), candidate_inputs=("inception/pool",),
        min_images=DensityCoverage.k + 1,
    )
)
