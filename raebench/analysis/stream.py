"""The state of ``raebench analyze``'s single pass over the data, per tokenizer.

:class:`Accumulator` takes each batch's latents once: the spectrum sums (:class:`LatentStats`), the
token-mean pooled latents, which images were finite, and the seeded subsets of images kept for the
decoder diagnostics and the diffusability probe (:class:`Keep`). Its ``state``/``merge`` carry one
rank's shard to rank 0 under torchrun, merged in rank order (= data order).
"""

from __future__ import annotations

import heapq
import math
import random

import torch

from raebench.analysis import alignment as al
from raebench.analysis.spectrum import LatentStats
from raebench.images import to_float


class Keep:
    """The ``k`` readable images that come first in a seeded permutation of the data set, kept while
    streaming (memory O(k)): the same images whatever the batching, the sharding or the unreadable
    files (a random subset drawn from the listed files would shrink by every unreadable one)."""

    def __init__(self, n: int, k: int, seed: int) -> None:
        self.k = k
        self.rank = [0] * n if k else []  # image index -> its place in the permutation
        for r, i in enumerate(random.Random(seed).sample(range(n), n) if k else []):
            self.rank[i] = r
        self.heap: list[tuple[int, int, tuple]] = []  # (-rank, index, payload): the worst kept on top

    def wants(self, index: int) -> bool:
        return bool(self.k) and (len(self.heap) < self.k or self.rank[index] < -self.heap[0][0])

    def offer(self, index: int, payload: tuple) -> None:
        heapq.heappush(self.heap, (-self.rank[index], index, payload))
        if len(self.heap) > self.k:
            heapq.heappop(self.heap)

    def merge(self, items: list[tuple[int, int, tuple]]) -> None:
        for neg_r, index, payload in items:
            heapq.heappush(self.heap, (neg_r, index, payload))
            if len(self.heap) > self.k:
                heapq.heappop(self.heap)

    def payloads(self) -> list[tuple]:
        """The kept payloads in data order."""
        return [p for _, _, p in sorted(self.heap, key=lambda item: item[1])]


class Accumulator:
    """Per-tokenizer state of the pass."""

    def __init__(self, tok, diag: Keep, probe: Keep) -> None:
        self.tok = tok
        self.stats = LatentStats()
        self.pooled: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.diag, self.probe = diag, probe  # payloads (uint8 image (3, R, R), latent) and (latent,)
        self.nonfinite = 0
        self.latent_shape: tuple[int, ...] = ()

    def update(self, images: torch.Tensor, index: list[int]) -> None:
        with torch.no_grad():
            z = self.tok.encode(to_float(images)).float()
        self.latent_shape = tuple(z.shape[1:])
        ok = torch.isfinite(z.flatten(1)).all(1)  # (N,)
        self.nonfinite += int((~ok).sum())
        self.valid.append(ok.cpu())
        pooled = al.pool_tokens(z).double().cpu()
        pooled[~ok.cpu()] = math.nan
        self.pooled.append(pooled)
        if bool(ok.any()):
            self.stats.update(z[ok])
        for j, i in enumerate(index):
            if not bool(ok[j]):
                continue
            # clones: a view z[j] would keep the whole batch's latents alive (on the GPU) while it is kept
            if self.diag.wants(i):
                self.diag.offer(i, (images[j].cpu(), z[j].clone()))
            if self.probe.wants(i):
                self.probe.offer(i, (z[j].clone(),))

    def state(self) -> dict:
        """This shard's part, on the CPU (what another rank merges)."""
        cpu = lambda heap: [(r, i, tuple(t.cpu() for t in p)) for r, i, p in heap]  # noqa: E731
        return {"stats": self.stats.state(), "pooled": self.pooled, "valid": self.valid, "nonfinite": self.nonfinite,
                "latent_shape": self.latent_shape, "diag": cpu(self.diag.heap), "probe": cpu(self.probe.heap)}

    def merge(self, st: dict, device: torch.device) -> None:
        """Append the next shard (shards merged in rank order keep data order)."""
        self.stats.merge(st["stats"])
        self.pooled += st["pooled"]
        self.valid += st["valid"]
        self.nonfinite += st["nonfinite"]
        self.latent_shape = self.latent_shape or tuple(st["latent_shape"])
        self.diag.merge([(r, i, (img, z.to(device))) for r, i, (img, z) in st["diag"]])
        self.probe.merge([(r, i, (z.to(device),)) for r, i, (z,) in st["probe"]])
