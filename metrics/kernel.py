"""Kernel two-sample distances: KID (Bińkowski et al. 2018) and CMMD (Jayasumana et al. 2024).

KID, torch-fidelity's definition: Inception pool3 features, cubic polynomial kernel
k(x, y) = (x·y / d + 1)³, unbiased MMD² on 100 random subsets of 1000 images per side, drawn
without replacement by ``numpy.random.RandomState(2020)`` in torch-fidelity's order (candidates,
then references, for each subset): computed by torch-fidelity's own ``kid_features_to_metric`` on
the gathered features, in float64 (torch-fidelity's pipeline feeds float32). Reports the mean
(``kid``) and the population std over subsets (``kid-std``). With fewer than 1000 images on a side
the subset size shrinks to the smaller set (recorded in the notes, which also say when every subset
is the whole set), as clean-fid does (torch-fidelity's pipeline refuses); the unbiased estimate
needs at least 2 images per side.

CMMD, the official definition (google-research ``cmmd/``): CLIP ViT-L/14@336 L2-normalised image
embeddings of the centred square resized with PIL bicubic (the ``clip-l14-336`` extractor), Gaussian
RBF kernel exp(−|x − y|² / (2σ²)) with σ = 10, the biased (V-statistic) MMD² with diagonals
included, times 1000. Computed in float64 blocks (the official JAX code: float32 full matrices),
never an N × N matrix at once, over every image (the official program drops each side's remainder
after batches of 32).
"""

from __future__ import annotations

import torch

from raebench.metrics import neighbours as nb
from raebench.metrics.base import MetricSpec, TooFewImagesError, register_metric
from raebench.metrics.manifold import _TwoSetFeatures


KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def kid(cand: torch.Tensor, ref: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = KID_SEED) -> tuple[float, float]:
    """(mean, std) of the unbiased cubic-kernel MMD² over random subsets: torch-fidelity's own
    ``kid_features_to_metric`` (its subset sampling, candidates first), fed float64 features.
    Each side must hold at least ``subset_size`` ≥ 2 images (subsets are drawn without replacement)."""
    if not 2 <= subset_size <= min(cand.shape[0], ref.shape[0]):
        raise TooFewImagesError(f"KID subsets of {subset_size} images need at least {max(subset_size, 2)} images on "
                                f"each side, got {cand.shape[0]} candidates and {ref.shape[0]} references")
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(
        cand.double(), ref.double(), kid_subsets=subsets, kid_subset_size=subset_size, kid_kernel="poly",
        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def rbf_mmd2_biased(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, chunk: int | None = None) -> float:
    """Biased MMD² (diagonals included) under exp(−|a − b|² / (2σ²)), in float64 blocks."""
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> float:
        total = 0.0
        for rows in nb.blocks(a.shape[0], chunk):
            for cols in nb.blocks(b.shape[0], chunk):
                total += float(torch.exp(-gamma * nb.sq_dists(a[rows], b[cols])).sum())
        return total / (a.shape[0] * b.shape[0])

    return mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)


class KID(_TwoSetFeatures):
    feature = "inception/pool"

    def compute(self) -> dict[str, float]:
        self.notes = []
        ref, cand = self._both()
        m = min(KID_SUBSET_SIZE, ref.shape[0], cand.shape[0])
        if m < KID_SUBSET_SIZE:
            whole = [side for side, n in (("candidates", cand.shape[0]), ("references", ref.shape[0])) if n == m]
            same = ("every subset is the same two sets, so kid-std is 0" if len(whole) == 2
                    else f"every subset holds all {m} {whole[0]}")
            self.notes.append(f"KID subset size {m} < {KID_SUBSET_SIZE} (only {cand.shape[0]} candidates, "
                              f"{ref.shape[0]} references; {same})")
        mean, std = kid(cand, ref, KID_SUBSETS, m, KID_SEED)
        return {"kid": mean, "kid-std": std}


class CMMD(_TwoSetFeatures):
    feature = "clip-l14-336/embed"

    def compute(self) -> dict[str, float]:
        ref, cand = self._both()  # three N x N kernel sums, on the evaluation device
        return {"cmmd": CMMD_SCALE * rbf_mmd2_biased(cand, ref)}


register_metric(
    MetricSpec(
        name="kid", higher_is_better=False, kind="distribution", version="kid-inception2048-poly3-100x1000-seed2020-v1",
        description="Kernel Inception Distance: cubic kernel, 100 subsets of 1000, torch-fidelity's sampling",
        builder=lambda spec: KID(spec), extractors=("inception",), outputs=(("kid-std", None),),
        reference_inputs=("inception/pool",), candidate_inputs=("inception/pool",), min_images=2,  # unbiased: m(m − 1)
    )
)
# v1: the whole image (squashed when not square) resized with torch's antialiased bicubic on floats
register_metric(
    MetricSpec(
        name="cmmd", higher_is_better=False, kind="distribution",
        version="cmmd-clipl14-336-croppil-rbf10-x1000-v2",
        description="CMMD: RBF-kernel MMD (σ = 10, ×1000) of CLIP ViT-L/14@336 embeddings",
        builder=lambda spec, **o: CMMD(spec, **o), options=("device",), extractors=("clip-l14-336",),
        reference_inputs=("clip-l14-336/embed",), candidate_inputs=("clip-l14-336/embed",),
    )
)
