"""Train a stage-2 denoiser (DiT-DH / LightningDiT) on RAE latents.

One frozen :class:`TrainConfig` per run; presets follow the official RAE recipe (AdamW 2e-4, betas
(0.9, 0.95), no weight decay, constant LR for 40 epochs then linear to 2e-5 at epoch 800, global
batch 1024, gradient clipping 1.0, EMA 0.9995, logit-normal(0, 1) times with the dimension shift,
every parameter trained, the sin-cos positions and the time embedding's Fourier frequencies included
(the official trainer's ``model.requires_grad_(True)``; ``freeze_embeddings`` keeps them fixed),
fp32 as the official README recommends; ``--precision bf16`` for bf16 autocast).

Latents come from a latent cache written once by :func:`cache_latents` (``raebench cache-latents``;
each image stored with its horizontal flip, one variant drawn per step) or are computed on the fly
by a frozen tokenizer from an image folder (with random flips); both live in
:mod:`raebench.stage2.latents`.

Runs are resumable: everything lives in ``cfg.out`` (``config.json``, ``log.csv``,
``checkpoints/last.pt``), and re-running the same command continues from the last checkpoint; a
changed setting that alters the trajectory (anything but :data:`RUN_ONLY_FIELDS`) or other training
data is refused. A checkpoint holds ``{model, ema, opt, sched, step, config, data, latent_shape,
log_pending}`` (``data``: the identity of the training data, with ``tokenizer_weights``, the weights
that made the latents: a cache's, carried over from its ``meta.json``, or the on-the-fly
tokenizer's; ``log_pending``: each rank's losses of the steps since the last ``log_every`` row, so
the first row after a resume averages the same steps as an uninterrupted run's) and is written to a
temporary file then renamed. SIGTERM or SIGUSR1 stops every rank after the same step with such a
checkpoint (:mod:`raebench.preempt`).

Every random draw of a step is a function of (seed, step, position in the global batch): the data
order of (seed, epoch), the cache variant or flip, the time and the label dropout of (seed, step),
the noise of (seed, step, position). Each rank takes its slice of the global batch, so a run gives
the same result on any number of ranks (up to float summation order) and a resumed run reproduces
an uninterrupted one without saved RNG states. Multi-process runs use ``torchrun`` (gloo on CPU,
nccl on GPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raebench import distributed
from raebench.errors import DataError, RaebenchError, check_rates
from raebench.preempt import Preempted, StopOnSignal, ignore_in_worker
from raebench.stage2.latents import (
    RECORDED_LATER,
    LatentCache,
    OnTheFly,
    _write_json,
    setting_differs,
)
from raebench.stage2.models import MODELS, count_params
from raebench.stage2.transport import Transport, shift_from_dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a stage-2 run (written to ``out/config.json``)."""

    model: str = "ditdh-xl"
    out: str = "runs/stage2"
    latents: str | None = None  # a latent cache directory (raebench cache-latents)
    tokenizer: str | None = None  # ... or a tokenizer name plus an image folder, encoded on the fly
    data: str | None = None
    # the on-the-fly tokenizer's local files, as eval's --weights/--decoder/--stats (None: the Hugging Face cache)
    weights: str | None = None
    decoder: str | None = None
    stats: str | None = None
    resolution: int = 256
    num_classes: int = 1000
    class_dropout: float = 0.1
    epochs: int = 1400
    global_batch: int = 1024
    grad_accum: int = 1
    lr: float = 2e-4
    final_lr: float = 2e-5
    constant_epochs: float = 40  # constant LR, then linear decay ...
    decay_end_epoch: float = 800  # ... reaching final_lr here
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0  # 0 or None: no clipping
    ema_decay: float = 0.9995
    time_dist: str = "logit-normal"
    time_mu: float = 0.0
    time_sigma: float = 1.0
    shift_base: float = 4096
    # fp32 as the official recipe ("we recommend using fp32 for more stable training", the official
    # README); bf16 autocast is opt-in (--precision bf16): 1.6x faster on an H200 for DiT-DH-XL
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 4  # data-loading processes (image decoding or latent-cache reads)
    log_every: int = 100
    ckpt_every: int = 5000  # optimizer steps
    keep_every: int = 0  # also keep checkpoints/step-NNNNNNN.pt every N steps (0: only last.pt), e.g. for FID vs step
    max_steps: int | None = None  # stop early (the schedule still follows `epochs`)
    compile: bool = False  # torch.compile the model (as the official --compile); an execution setting
    # keep the sin-cos positions and the time embedding's Fourier frequencies fixed; the official trainer's
    # model.requires_grad_(True) unfreezes both, so the recipe trains them (AdamW and EMA)
    freeze_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise RaebenchError(f"precision must be bf16 or fp32, got {self.precision!r}.")
        for name in ("global_batch", "grad_accum", "epochs", "num_classes", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise RaebenchError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise RaebenchError(f"max_steps must be at least 1 (or unset), got {self.max_steps}.")
        if not 0 <= self.class_dropout < 1:
            raise RaebenchError(f"class_dropout must lie in [0, 1), got {self.class_dropout}.")
        if self.seed < 0:
            raise RaebenchError(f"seed must be non-negative, got {self.seed}.")
        if self.keep_every < 0:
            raise RaebenchError(f"keep_every must be at least 0 (0: keep only last.pt), got {self.keep_every}.")
        check_rates(self, ("lr",), ("final_lr", "weight_decay") + (("clip_grad",) if self.clip_grad is not None else ()))
        if not 0 <= self.ema_decay < 1:
            raise RaebenchError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")


#: Settings that may change between a run and its resumption (they do not change the trajectory).
RUN_ONLY_FIELDS = frozenset({"out", "num_workers", "log_every", "ckpt_every", "keep_every", "max_steps", "compile"})

#: The value a setting had in runs written before the setting was recorded in their config
#: (runs before ``freeze_embeddings`` kept the positions and time frequencies fixed).
LEGACY_VALUES: dict[str, Any] = {"freeze_embeddings": True}

#: the official recipe for each DiT-DH size, LightningDiT of the same sizes for comparison, and a
#: tiny preset for tests and smoke runs
PRESETS: dict[str, TrainConfig] = {
    **{f"ditdh-{s}": TrainConfig(model=f"ditdh-{s}") for s in ("s", "b", "l", "xl")},
    **{f"lightningdit-{s}": TrainConfig(model=f"lightningdit-{s}") for s in ("s", "b", "l", "xl")},
    "tiny": TrainConfig(
        model="ditdh-tiny", num_classes=10, epochs=50, global_batch=64, lr=1e-3, final_lr=1e-4,
        constant_epochs=10, decay_end_epoch=50, ema_decay=0.99, precision="fp32", log_every=10, ckpt_every=50,
        num_workers=0,
        resolution=64, shift_base=64,
    ),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise RaebenchError(f"Unknown stage-2 training preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# Latent sources
# ----------------------------------------------------------------------------------------------


# streams of the per-step random draws (see derive_seed)
_DATA, _TIMES, _NOISE = 1, 2, 3


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integers (SeedSequence hashing: nearby keys give unrelated streams)."""
    hi, lo = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) >> 1


class _StepBatches(torch.utils.data.Dataset):
    """Keys (step, offset, indices) -> (step, source.fetch(...)), so loader workers can prefetch steps.

    The data-side draws (flips, cache variants) are made for the whole global batch from a generator
    of (seed, step); ``offset`` is the position of this rank's first example in the global batch.
    """

    def __init__(self, source: Any, seed: int, global_batch: int) -> None:
        self.source, self.seed, self.global_batch = source, seed, global_batch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, torch.Tensor]) -> tuple[int, Any]:
        step, offset, idx = key
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _DATA, step))
        u = torch.rand(self.global_batch, generator=gen)[offset:offset + len(idx)]  # (B,)
        return step, self.source.fetch(idx, u)


def open_source(cfg: TrainConfig, device: torch.device):
    if cfg.latents:
        return LatentCache(cfg.latents)
    if cfg.tokenizer and cfg.data:
        from raebench.stage2.latents import build_tokenizer

        tok = build_tokenizer(cfg.tokenizer, device, cfg.resolution, cfg.weights, cfg.decoder, cfg.stats)
        return OnTheFly(tok, cfg.data, cfg.resolution, device)
    raise RaebenchError("Give --latents DIR (from `raebench cache-latents`) or --tokenizer NAME with --data DIR.")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Official schedule: 1 until ``constant_epochs``, then linear to final_lr/lr at ``decay_end_epoch``."""
    start = int(cfg.constant_epochs * steps_per_epoch)
    end = max(int(cfg.decay_end_epoch * steps_per_epoch), start)
    final = cfg.final_lr / cfg.lr
    if step < start:
        return 1.0
    if step >= end:
        return final
    return 1.0 - (1.0 - final) * (step - start) / max(end - start, 1)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - decay)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel (CPU and CUDA) as in the official trainer."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:  # a device or torch build without the fused kernel
        return torch.optim.AdamW(params, **kw)


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, max_norm: float | None) -> None:
    """Check the global gradient norm, clip it to ``max_norm`` (None or <= 0: no clipping), step.

    Same result as ``clip_grad_norm_`` + ``opt.step()``; with a fused optimizer the clip factor is
    handed to the optimizer kernel as its gradient divisor (``grad_scale``) instead of a separate
    multiply over every gradient (one pass over all gradients less per step). A non-finite norm
    raises :class:`NonFiniteGradientError` before any parameter changes; under DDP the gradients,
    hence the norm, are the same on every rank, so all ranks stop together.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        opt.step()
        return
    # the global 2-norm as clip_grad_norm_ computes it (one fused kernel per device and dtype on GPUs;
    # nn.utils.get_total_norm needs torch >= 2.6)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
    if not bool(torch.isfinite(norm)):
        raise NonFiniteGradientError(f"the gradient norm is {float(norm)}; the parameters were not updated")
    if not max_norm or max_norm <= 0:
        opt.step()
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
    if not all(g.get("fused") for g in opt.param_groups):
        torch._foreach_mul_(grads, coef)  # as clip_grad_norm_
        opt.step()
        return
    opt.grad_scale = (1.0 / coef).to(torch.float32)  # the fused kernel divides each gradient by it
    try:
        opt.step()
    finally:
        del opt.grad_scale


class NonFiniteGradientError(RaebenchError):
    """The loss or gradients became NaN/Inf: the step was not taken."""


def train_step(
    ddp: nn.Module, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, transport: Transport,
    x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, autocast: contextlib.AbstractContextManager | None = None,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """One optimisation step on the batch (x, y): accumulated backward, clip, AdamW, EMA; returns the loss.

    ``ddp`` is the (possibly DistributedDataParallel-wrapped) ``model``. ``draws``: the batch's times
    (B,) and noise (B, C, H, W) (see :func:`step_draws`); None draws them from torch's global RNG.
    """
    opt.zero_grad(set_to_none=True)
    if draws is None:
        loss = accumulate_gradients(ddp, transport.loss, x, y, cfg.grad_accum, autocast)
    else:
        loss = accumulate_gradients(ddp, transport.loss_at, x, y, cfg.grad_accum, autocast, extra=draws)
    clip_and_step(model, opt, cfg.clip_grad)
    update_ema(ema, model, cfg.ema_decay)
    return loss


def accumulate_gradients(
    model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, accum: int,
    autocast: contextlib.AbstractContextManager | None = None, extra: tuple[torch.Tensor, ...] = (),
) -> float:
    """Backward of the mean loss over the batch in ``accum`` equal micro-batches; returns that loss.

    ``loss_fn(model, x, y, *extra)`` gets each micro-batch's slice of x, y and the ``extra`` per-example
    tensors. Each micro-batch contributes mean/accum, so the gradient equals that of one big batch;
    DDP only all-reduces on the last micro-batch.
    """
    if len(x) % accum:
        raise RaebenchError(f"the per-rank batch {len(x)} does not split into {accum} equal micro-batches.")
    micro, total = len(x) // accum, None
    for a in range(accum):
        part = slice(a * micro, (a + 1) * micro)
        last = a == accum - 1
        sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast or contextlib.nullcontext():
                loss = loss_fn(model, x[part], y[part], *(e[part] for e in extra)).mean() / accum  # share of the batch mean
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()  # on the device: no sync per micro-batch
    return float(total)


def step_draws(
    cfg: TrainConfig, transport: Transport, step: int, offset: int, n: int, latent_shape: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions [offset, offset + n) of the global batch's random draws at ``step``: times (n,), noise
    (n, C, H, W) and the label-dropout mask (n,).

    Times and dropout are drawn for the whole global batch from a generator of (seed, step), the noise
    of each example from a generator of (seed, step, position) on ``device``: the same values however
    the batch is split over ranks.
    """
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, _TIMES, step))
    t = transport.sample_t(cfg.global_batch, generator=g)[offset:offset + n]  # (n,)
    drop = (torch.rand(cfg.global_batch, generator=g) < cfg.class_dropout)[offset:offset + n]  # (n,)
    noise = torch.empty((n, *latent_shape), device=device)  # (n, C, H, W), each row from its own generator
    for i, j in enumerate(range(offset, offset + n)):
        torch.randn(latent_shape, generator=torch.Generator(device).manual_seed(derive_seed(cfg.seed, _NOISE, step, j)),
                    out=noise[i])
    return t.to(device), noise, drop.to(device)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batches(n: int, cfg: TrainConfig, start_step: int, rank: int, world: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(step, offset, this rank's indices for the whole step) for every optimizer step from ``start_step``;
    ``offset`` is the position of the first of them in the global batch."""
    spe = n // cfg.global_batch
    per_rank = cfg.global_batch // world
    step = start_step
    while True:
        epoch, k = divmod(step, spe)
        order = _epoch_order(n, cfg.seed, epoch)
        for j in range(k, spe):
            idx = order[j * cfg.global_batch:(j + 1) * cfg.global_batch]
            yield step, rank * per_rank, idx[rank * per_rank:(rank + 1) * per_rank]
            step += 1


def build_for_training(cfg: TrainConfig, latent_shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = latent_shape
    if h != w:
        raise RaebenchError(f"stage-2 models need square latents, got {h}x{w}.")
    return MODELS.get(cfg.model).build(in_channels=c, input_size=h, num_classes=cfg.num_classes,
                                       class_dropout_prob=cfg.class_dropout)


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse unlabelled examples (-1) and labels that ``num_classes`` does not cover (label
    ``num_classes`` is the null class of classifier-free guidance)."""
    if not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"{where} has unlabelled examples (label {lo}); stage-2 training needs labelled images, "
                        "one subfolder per class.")
    if hi >= num_classes:
        raise DataError(f"{where} has labels up to {hi}, more than --num-classes {num_classes} covers; "
                        f"set --num-classes {hi + 1}.")
    seen = int(torch.unique(labels).numel())
    if seen < num_classes and distributed.is_main():  # legal (a subset of a label space), but `sample` draws
        # every class; every rank reads the same labels: said once under torchrun
        log.warning("%s has examples of %d of the model's %d classes (--num-classes); the others are never "
                    "trained, and `raebench sample --label-sampling equal` draws them all (pass --num-classes %d "
                    "there to sample only the first %d).", where, seen, num_classes, hi + 1, hi + 1)


def compare_configs(saved: dict, cfg: TrainConfig, data_recorded: bool = False, weights_recorded: bool = False) -> list[str]:
    """Trajectory-changing differences between a saved run config and ``cfg``. With ``data_recorded``
    (the checkpoint holds the data's identity, compared by :func:`compare_data`), the paths of the
    data may differ: the same cache by another path, or moved, is the same data; with
    ``weights_recorded`` (it also holds the tokenizer's ``tokenizer_weights``), so may the paths of
    the tokenizer's local files."""
    skip = (RUN_ONLY_FIELDS | ({"latents", "data"} if data_recorded else set())
            | ({"weights", "decoder", "stats"} if weights_recorded else set()))
    saved = {**LEGACY_VALUES, **saved}  # a setting added later has its old behaviour in older runs
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in _jsonable(cfg).items() if k not in skip and saved.get(k) != v]


def compare_data(saved: dict | None, now: dict) -> list[str]:
    """Differences between the data a run was trained on and ``now`` (old checkpoints record none;
    a key of :data:`RECORDED_LATER` that ``saved`` lacks is unknown, not different; the tokenizer's
    weights are compared by content, :func:`~raebench.stage2.latents.same_weights`)."""
    if saved is None:
        return []
    keys = (set(saved) | set(now)) - (RECORDED_LATER - set(saved))
    return [f"data {k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(keys)
            if setting_differs(k, saved.get(k), now.get(k))]


LOG_COLUMNS = ("step", "epoch", "images", "lr", "loss", "sec_per_step")
CHECKPOINT_FORMAT = "raebench-stage2-v2"  # v2: per-step draws of (seed, step, position), no RNG states


def train(cfg: TrainConfig, device: str | torch.device = "cpu", source=None,
          lock_advice: str = "choose another --out") -> dict:
    """Run (or resume) training; returns {'step', 'losses', 'out'}. ``source`` overrides cfg data.

    One job per run folder: a second one on the same ``cfg.out`` is refused while the first runs
    (:mod:`raebench.locks`), so two jobs never overwrite each other's checkpoints and log;
    ``lock_advice`` ends that refusal (what the caller's user should change).
    """
    from raebench.locks import exclusive
    from raebench.tf32 import tf32

    out = Path(cfg.out)
    with exclusive(out, "stage-2 training job", lock_advice):
        with tf32(torch.device(device).type == "cuda"):  # as the official trainer; restored afterwards
            return _train(cfg, device, source)


def _train(cfg: TrainConfig, device: str | torch.device = "cpu", source=None) -> dict:
    from raebench.checkpoint import load_state, resume_states
    from raebench.results import remove_orphan_temps
    from raebench.stage1.train import truncate_csv

    device = torch.device(device)
    distributed.init(device)
    device = distributed.pin_cuda(device)  # "cuda" (the API's, or outside torchrun): the current GPU, indexed for DDP
    rank, world = distributed.rank_world()
    if cfg.global_batch % (world * cfg.grad_accum):
        raise RaebenchError(f"global_batch {cfg.global_batch} must divide by world size x grad_accum = {world * cfg.grad_accum}.")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    source = source if source is not None else open_source(cfg, device)
    check_labels(source.labels, cfg.num_classes, repr(cfg.latents or cfg.data or "the training data"))
    data = source.identity()
    n = len(source)
    spe = n // cfg.global_batch
    if spe < 1:
        raise DataError(f"{n} training examples are fewer than one global batch ({cfg.global_batch}).")
    total = cfg.epochs * spe
    stop = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    ck = load_state(ckpt_path) if ckpt_path.is_file() else None
    if ck is not None:
        saved = ck.get("data")
        recorded = saved is not None and "tokenizer_weights" in saved
        diff = compare_configs(ck.get("config", {}), cfg, saved is not None, recorded) + compare_data(saved, data)
        if list(ck.get("latent_shape", data["latent_shape"])) != data["latent_shape"]:
            diff.append(f"latent shape: {ck['latent_shape']} -> {data['latent_shape']}")
        # rank 0's verdict on every rank: each rank stops, rank 0 alone says why
        distributed.refuse(f"{str(out)!r} holds a run with other settings or data ({'; '.join(diff)}); re-run with "
                           "its settings, or choose another --out to start afresh." if diff else None)
        if ck.get("format") != CHECKPOINT_FORMAT and rank == 0:
            log.warning("%s was written by an older raebench with other random draws; the resumed run will not "
                        "reproduce an uninterrupted one", ckpt_path)
        if not recorded:  # its first steps were trained on latents of unrecorded weights: it stays unknown
            data = {k: v for k, v in data.items() if k not in RECORDED_LATER}

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_for_training(cfg, source.latent_shape).to(device)
    if not cfg.freeze_embeddings:  # as the official trainer: every parameter trains, the fixed tables included
        model.requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spe, cfg))
    shift = shift_from_dims(math.prod(source.latent_shape), cfg.shift_base)
    transport = Transport(cfg.time_dist, cfg.time_mu, cfg.time_sigma, shift)

    step, pending = 0, []  # pending: this rank's losses of the steps since the last log_every row
    if ck is not None:
        resume_states(ck, ckpt_path, {"model": model, "ema": ema, "opt": opt, "sched": sched},
                      "delete it (or choose another --out) to start afresh.")
        step = int(ck["step"])
        pending = _pending_at_resume(ck.get("log_pending"), step, cfg.log_every, rank, world)
        if rank == 0:
            log.info("resumed %s at step %d", out, step)
    del ck
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "checkpoints"):  # half-written files of a killed job (we hold the lock)
            remove_orphan_temps(folder)
        _write_json(out / "config.json", {**_jsonable(cfg), "data_identity": data})
        truncate_csv(out / "log.csv", LOG_COLUMNS, step)
        kept = ckpt_path.with_name(f"step-{step:07d}.pt")
        if cfg.keep_every and step and step % cfg.keep_every == 0 and not kept.is_file():
            _keep_copy(ckpt_path, kept)  # a job killed between saving last.pt and keeping it: last.pt is that step
        log.info("%s: %.2fM parameters, %d examples, %d steps/epoch, %d steps, shift %.3f", cfg.model,
                 count_params(model) / 1e6, n, spe, total, shift)

    ddp = model
    if world > 1:
        # gradients live in the all-reduce buckets (no copy in and out each step); buffers are constants
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  gradient_as_bucket_view=True, **distributed.no_buffer_sync())
    if cfg.compile:
        ddp = torch.compile(ddp)
    elif device.type == "cuda" and rank == 0:
        log.info("tip: --compile made a DiT-DH-XL bf16 step 1.6x faster on an H200 (bench/README.md), "
                 "after about a minute of compilation")
    # The network's only train-mode behaviour is label dropout; the trainer draws it itself (step_draws),
    # so that it does not depend on the number of ranks, and runs the network in eval mode.
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    losses: list[float] = []
    t_last, timed = time.perf_counter(), step
    keys = itertools.takewhile(lambda b: b[0] < stop, _batches(n, cfg, step, rank, world))
    loader = torch.utils.data.DataLoader(
        _StepBatches(source, cfg.seed, cfg.global_batch), batch_size=None, sampler=keys, num_workers=cfg.num_workers,
        prefetch_factor=2 if cfg.num_workers > 0 else None, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # the loader leaves torch's global RNG alone
        worker_init_fn=ignore_in_worker,  # a SIGTERM to every process of the job stops the step, not a worker
    )
    per_rank = cfg.global_batch // world
    with StopOnSignal() as preempt:  # the stop signals only set a flag, read after each step
        for s, raw in loader:
            assert s == step, (s, step)
            x, y = source.prepare(raw, device)
            t, noise, drop = step_draws(cfg, transport, step, rank * per_rank, len(y), source.latent_shape, device)
            y = torch.where(drop, cfg.num_classes, y)  # the null class (never drawn when class_dropout is 0)
            try:
                total_loss = train_step(ddp, model, ema, opt, transport, x, y, cfg, autocast, draws=(t, noise))
            except NonFiniteGradientError as e:
                hint = "use --precision fp32, " if cfg.precision == "bf16" else ""
                kept = (f"The checkpoint in {ckpt_path.parent} holds the last good state" if ckpt_path.is_file() else
                        "No checkpoint was written yet (it failed before the first)")
                raise RaebenchError(
                    f"Training stopped at step {step + 1}: {e} (loss {losses[-1] if losses else 'n/a'} at the previous "
                    f"step). {kept}; lower the learning rate, {hint}or check the latents for NaN/Inf.") from None
            sched.step()
            losses.append(total_loss)
            pending.append(total_loss)
            step += 1
            if step % cfg.log_every == 0 or step == stop:
                _log_row(out / "log.csv", pending, step, spe, cfg, sched.get_last_lr()[0],
                         (time.perf_counter() - t_last) / (step - timed), rank, world, device)
                t_last, timed = time.perf_counter(), step
                if step % cfg.log_every == 0:  # a row at the stop alone leaves the steps to the next row pending
                    pending = []
            keep = bool(cfg.keep_every) and step % cfg.keep_every == 0
            signum = preempt.agree(device)  # SIGTERM/SIGUSR1 on any rank: every rank stops after this step
            if step % cfg.ckpt_every == 0 or step == stop or keep or signum:
                _save(ckpt_path, model, ema, opt, sched, step, cfg, rank, world, data, pending, device)
                if keep and rank == 0:
                    _keep_copy(ckpt_path, ckpt_path.with_name(f"step-{step:07d}.pt"))
            if signum:
                raise Preempted.saved(signum, f"at step {step}", "checkpoint", show=rank == 0)
    return {"step": step, "losses": losses, "out": str(out)}


def _keep_copy(last: Path, kept: Path) -> None:
    """``last`` kept as ``kept``: a hard link (no copy; the next save replaces last.pt by a rename, so
    the link keeps this step's file), or an atomic copy where the file system has no hard links."""
    import os
    import shutil

    kept.unlink(missing_ok=True)
    try:
        os.link(last, kept)
    except OSError:  # streamed to a temporary name, then renamed: never a half-written step file
        tmp = kept.with_name(f".{kept.name}.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, kept)


def _pending_at_resume(saved: list[list[float]] | None, step: int, log_every: int, rank: int, world: int) -> list[float]:
    """This rank's losses of the steps since the last ``log_every`` row before ``step``, from a
    checkpoint's ``log_pending`` (one list per rank that saved it): its own at the same number of
    ranks; at another, each step's mean over the saved ranks (the same row value up to rounding).
    Checkpoints without it (older raebench) give none: that row averages the steps after the resume."""
    keep = step % log_every  # a changed --log-every: the steps since the last row of the new interval
    if not saved or not keep:
        return []
    losses = [float(v) for v in saved[rank]] if len(saved) == world else [float(np.mean(v)) for v in zip(*saved)]
    return losses[max(0, len(losses) - keep):]


def _log_row(path: Path, losses: list[float], step: int, spe: int, cfg: TrainConfig, lr: float, sec_per_step: float,
             rank: int, world: int, device: torch.device) -> None:
    """Append a row to ``log.csv`` (rank 0): the loss averaged over ``losses`` (the steps since the
    last ``log_every`` row, resumed ones included) and all ranks."""
    import csv

    loss = torch.tensor(float(np.mean(losses)), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    if rank != 0:
        return
    row = {"step": step, "epoch": step // spe, "images": step * cfg.global_batch, "lr": lr, "loss": float(loss),
           "sec_per_step": sec_per_step}
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_COLUMNS).writerow(row)
    log.info("step %d  loss %.4f  lr %.2e  %.2f steps/s", step, row["loss"], lr, 1 / max(row["sec_per_step"], 1e-9))


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _save(path: Path, model, ema, opt, sched, step: int, cfg: TrainConfig, rank: int, world: int, data: dict,
          pending: list[float], device: torch.device) -> None:
    log_pending = [list(pending)]  # every rank's: the next row averages them with the steps after a resume
    if world > 1:
        log_pending = [[] for _ in range(world)]
        if pending:  # the same length on every rank
            mine = torch.tensor(pending, dtype=torch.float64, device=device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            log_pending = [p.tolist() for p in parts]
    if rank == 0:
        from raebench.checkpoint import save_atomic

        save_atomic({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
                     "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "config": _jsonable(cfg),
                     "data": data, "latent_shape": data["latent_shape"], "log_pending": log_pending}, path)
    if world > 1:
        dist.barrier()
