"""Semantic alignment and latent-space diagnostics (``raebench analyze``).

Modules, one concept each: :mod:`.alignment` (linear probe, kNN, mutual-kNN, CKNNA, CKA),
:mod:`.spectrum` (streaming spectrum and sparsity statistics), :mod:`.diagnostics` (decoder
robustness, interpolation smoothness), :mod:`.diffusability` (a fixed-budget stage-2 probe),
:mod:`.references` (reference encoders), :mod:`.perceptual` (LPIPS or RMSE distances),
:mod:`.plots` (figures), :mod:`.config` (settings, metric versions, checks), :mod:`.reuse` (what a
re-run can take from stored rows), :mod:`.measure` (one tokenizer's measurements and rows) and
:mod:`.run` (the pass over the data, the gather under torchrun, figures).
"""

from raebench.analysis.alignment import cknna, knn_accuracy, linear_cka, linear_probe, mutual_knn, pool_tokens
from raebench.analysis.spectrum import LatentStats, effective_rank, participation_ratio, topk_energy

__all__ = [
    "cknna", "knn_accuracy", "linear_cka", "linear_probe", "mutual_knn", "pool_tokens",
    "LatentStats", "effective_rank", "participation_ratio", "topk_energy",
]
