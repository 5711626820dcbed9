"""Stage-1 data: the order of samples and every per-sample random draw, derived from (seed, step).

A step's global batch is a slice of the epoch's permutation (a function of seed and epoch); rank r
takes positions [r * B/world, (r+1) * B/world) of it, split into ``grad_accum`` consecutive
micro-batches. Crops, latent noise and augmentations of the sample at position j of step s come
from generators seeded by (seed, stream, s, j). Hence resuming at any step continues the same
sequence, and the same global batch split over 1 or 2 processes sees identical samples and draws.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from raebench.images import ImageSkip, adm_center_crop, load_rgb, random_resized_crop_train
from raebench.errors import DataError

if TYPE_CHECKING:
    from raebench.stage1.config import Stage1Config

log = logging.getLogger(__name__)

# streams of per-sample random draws
CROP, NOISE, AUG_G, AUG_FAKE, AUG_REAL = 1, 2, 3, 4, 5


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers (SeedSequence hashing: nearby keys give unrelated streams)."""
    hi, lo = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) >> 1


def sample_generators(seed: int, stream: int, step: int, positions: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, stream, step, position in the global batch)."""
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, stream, step, j)) for j in positions]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))


class StepBatches:
    """This rank's micro-batches for every step from ``start_step`` to ``stop``.

    Yields lists of (image index, crop seed, position in the global batch). A step's global batch is
    a slice of the epoch's permutation; rank r takes positions [r * B/world, (r+1) * B/world), split
    into ``grad_accum`` consecutive micro-batches.
    """

    def __init__(self, n: int, cfg: "Stage1Config", start_step: int, stop: int, rank: int, world: int) -> None:
        self.n, self.cfg, self.start, self.stop, self.rank, self.world = n, cfg, start_step, stop, rank, world
        self.spe = n // cfg.global_batch
        self.micro = cfg.global_batch // (world * cfg.grad_accum)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.cfg.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        cfg, order, order_epoch = self.cfg, None, -1
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, cfg.seed, epoch), epoch
            batch = order[k * cfg.global_batch:(k + 1) * cfg.global_batch]
            for a in range(cfg.grad_accum):
                first = self.rank * (cfg.global_batch // self.world) + a * self.micro
                yield [(int(batch[j]), derive_seed(cfg.seed, CROP, step, j), j) for j in range(first, first + self.micro)]


class TrainCrops(Dataset):
    """Official train transform of image ``index`` with a given crop seed; an unreadable file is
    replaced by the next readable one (deterministically), so a bad file never stops a run."""

    def __init__(self, paths: list[str], resolution: int, scale: float) -> None:
        self.paths, self.resolution, self.scale = paths, resolution, scale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        index, seed, pos = item
        for k in range(len(self.paths)):
            path = self.paths[(index + k) % len(self.paths)]
            try:
                im = load_rgb(path)
            except ImageSkip as e:
                log.warning("skipping unreadable training image %s (%s)", path, e)
                continue
            arr = random_resized_crop_train(im, self.resolution, random.Random(seed), self.scale)
            return {"image": torch.from_numpy(arr).permute(2, 0, 1).contiguous(), "pos": pos}  # (3, R, R) uint8
        raise DataError("No training image could be read.")


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "pos": [it["pos"] for it in items]}


def load_eval_images(paths: list[str], resolution: int) -> torch.Tensor:
    """ADM center crops of readable images among ``paths``: (N, 3, R, R) uint8."""
    out = []
    for p in paths:
        try:
            out.append(torch.from_numpy(adm_center_crop(load_rgb(p), resolution)).permute(2, 0, 1))
        except ImageSkip:
            continue
    if not out:
        raise DataError("None of the validation images could be read.")
    return torch.stack(out)
