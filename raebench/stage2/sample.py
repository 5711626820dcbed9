"""Generate many samples for evaluation: class-balanced labels, sharded, resumable, ADM npz output.

Output contract (the ADM evaluation suite's): ``arr_0`` uint8 (N, H, W, 3) images and ``arr_1`` int64
(N,) class labels (also stored as ``labels``). Work is cut into global batches; batch ``b`` belongs to
rank ``b % world`` and draws its noise from a generator seeded by (seed, b), so the result does not
depend on the number of ranks and an interrupted run resumes batch by batch. Each finished batch is a
part file written atomically; rank 0 merges the parts into the final npz (also atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raebench.distributed import rank_world
from raebench.results import atomic_path
from raebench.errors import RaebenchError

log = logging.getLogger(__name__)

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, labels) -> latents
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # latents -> float images (N, 3, H, W) in [0, 1]


def class_labels(num: int, num_classes: int, mode: str = "equal", seed: int = 0) -> torch.Tensor:
    """(num,) labels. 'equal': every class num // num_classes times (the remainder spread over the
    first classes), in a seeded random order; 'random': i.i.d. uniform classes."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randint(num_classes, (num,), generator=g)
    if mode != "equal":
        raise RaebenchError(f"--label-sampling must be 'equal' or 'random', got {mode!r}.")
    labels = torch.arange(num) % num_classes
    return labels[torch.randperm(num, generator=g)]


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, **arrays)


@torch.no_grad()
def generate_npz(
    sample_fn: SampleFn,
    decode: DecodeFn,
    out: str | os.PathLike,
    labels: torch.Tensor,
    latent_shape: tuple[int, ...],
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Sample ``len(labels)`` images into an ADM npz at ``out``; see the module docstring."""
    from raebench.data import to_uint8

    out = Path(out)
    rank, world = rank_world()
    n = len(labels)
    parts = out.with_name(f".{out.name}.parts")
    key = hashlib.sha256(labels.numpy().tobytes() + f"{seed}/{batch_size}/{latent_shape}".encode()).hexdigest()[:16]
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        meta = parts / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
            raise RaebenchError(f"{parts} holds parts of a different sampling run; delete it or choose another --out.")
        meta.write_text(json.dumps({"key": key, "n": n, "batch_size": batch_size, "seed": seed}))
    if world > 1:
        dist.barrier()
    num_batches = math.ceil(n / batch_size)
    mine = [b for b in range(num_batches) if b % world == rank]
    for done, b in enumerate(mine, 1):
        part = parts / f"b{b:07d}.npz"
        if part.is_file():
            continue
        y = labels[b * batch_size:(b + 1) * batch_size]
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(y), *latent_shape, generator=g).to(device)  # (B, C, H, W)
        with torch.random.fork_rng(devices=[]):  # stochastic samplers (SDE) draw from the global CPU RNG:
            torch.manual_seed(seed * 1_000_003 + b + 7_919)  # seeded per batch, so reruns and resumes repeat
            img = decode(sample_fn(noise, y.to(device)))  # (B, 3, H, W) float in [0, 1]
        _save_npz_atomic(part, images=to_uint8(img).permute(0, 2, 3, 1).cpu().numpy(), labels=y.numpy())
        if progress:
            progress(done, len(mine))
    if world > 1:
        dist.barrier()
    if rank == 0:
        arrays = [np.load(parts / f"b{b:07d}.npz") for b in range(num_batches)]
        images = np.concatenate([a["images"] for a in arrays])
        labs = np.concatenate([a["labels"] for a in arrays]).astype(np.int64)
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_npz_atomic(out, arr_0=images, arr_1=labs, labels=labs)
        shutil.rmtree(parts, ignore_errors=True)
        log.debug("wrote %d samples to %s", len(images), out)
    if world > 1:
        dist.barrier()
    return out


def save_grid(npz: str | os.PathLike, png: str | os.PathLike, n: int = 64) -> Path:
    """A PNG grid of the first ``n`` samples of an ADM npz."""
    from PIL import Image

    arr = np.load(npz)["arr_0"][:n]
    cols = int(math.ceil(math.sqrt(len(arr))))
    rows = int(math.ceil(len(arr) / cols))
    h, w = arr.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(png)
    return Path(png)


def load_trained(checkpoint: str | os.PathLike, key: str = "ema") -> tuple[nn.Module, dict]:
    """A raebench stage-2 training checkpoint -> (eval model, info with shift/latent_shape/config)."""
    from raebench.checkpoint import load_state
    from raebench.stage2.checkpoints import load_stage2_state
    from raebench.stage2.train import TrainConfig, build_for_training
    from raebench.stage2.transport import shift_from_dims

    ck = load_state(checkpoint)
    if not isinstance(ck, dict) or "config" not in ck or "latent_shape" not in ck:
        raise RaebenchError(f"{checkpoint} is not a raebench stage-2 training checkpoint; use --config for official ones.")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ck["config"].items()}
    cfg = TrainConfig(**fields)
    shape = tuple(ck["latent_shape"])
    model = load_stage2_state(build_for_training(cfg, shape), ck[key]).eval()
    return model, {"config": cfg, "latent_shape": shape, "shift": shift_from_dims(math.prod(shape), cfg.shift_base),
                   "step": ck.get("step")}
