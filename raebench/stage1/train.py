"""Train an RAE decoder on a frozen encoder (stage 1): ``raebench train stage1``.

One linear loop (:func:`train`) per optimizer step:

1. for each micro-batch of this rank: encode (frozen, no grad), add noise (sigma ~ tau * U[0, 1) per
   sample), decode, L1 + LPIPS (+ adaptive-weighted GAN once it is on), backward of loss / grad_accum,
   with DDP gradient sync only on the last micro-batch (``no_sync`` before);
2. clip (optional), AdamW step, LR schedule, EMA update;
3. once the discriminator is on: fresh reconstructions of the *clean* latents by the updated decoder
   (the official trainer's choice), clamped and 8-bit quantised (the generator's GAN term in step 1
   sees the raw reconstruction, as officially), DiffAugment on fakes and reals, hinge loss with fakes
   and reals scored in two train-mode forwards (two spectral-norm power iterations per update, as the
   official discriminator), gradients accumulated over the micro-batches and averaged over ranks, one
   AdamW step. The official trainer wraps its discriminator in DDP but then updates the bare module,
   so each GPU trains its own copy on its share of the batch; raebench keeps one discriminator
   (gradients averaged), which single-GPU runs cannot tell apart;
4. log (CSV, TensorBoard if installed, W&B if asked), sample grid, online PSNR/SSIM, checkpoint
   (also at the step where SIGTERM/SIGUSR1 stops the run: :mod:`raebench.preempt`).

Fixes against the official stage-1 trainer: gradients are accumulated, not zeroed per micro-batch;
checkpoints carry everything needed to continue (RNG states, both schedulers, the step) and are
written atomically; a resumed run reproduces the uninterrupted one, because every random draw of a
step (sample order, crops, latent noise, augmentations) is derived from (seed, step, position in
the global batch) and the spectral norms iterate a fixed number of times per step; the exported decoder is a plain
official-format state dict that loads strictly (a stage-1 checkpoint loaded non-strictly into the
decoder gave the official repo's users pure-noise reconstructions). The adaptive GAN weight is
computed from the gradients at the decoder's output (:func:`~raebench.stage1.losses.adaptive_gan_backward`):
the same weight and gradients as the official two ``autograd.grad`` calls on the last layer, with one
backward pass fewer through LPIPS and through the discriminator.

Steps: ``steps_per_epoch = n_images // global_batch`` (the last partial batch of an epoch is dropped
so every step sees a full global batch); epochs in the config become steps by that factor.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from raebench import distributed
from raebench.folders import scan_folder
from raebench.images import to_float, to_uint8
from raebench.errors import DataError, MissingWeightsError, RaebenchError
from raebench.preempt import Preempted, StopOnSignal, ignore_in_worker
from raebench.eval_config import resolve_device
from raebench.results import atomic_write_bytes, provenance
from raebench.stage1.config import LEGACY_VALUES, RUN_ONLY_FIELDS, Stage1Config
from raebench.stage1.data import AUG_FAKE, AUG_G, AUG_REAL, NOISE, StepBatches, TrainCrops, collate, load_eval_images, sample_generators
from raebench.stage2.train import NonFiniteGradientError, clip_and_step, compare_data  # shared with stage 2

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "raebench-stage1-v1"
LOG_COLUMNS = (
    "step", "epoch", "images", "lr", "disc_lr", "l1", "lpips", "gan", "adaptive_weight", "gan_weight_eff", "total",
    "disc_loss", "logits_real", "logits_fake", "disc_acc", "sec_per_step",
)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_trainable_rae(cfg: Stage1Config):
    """Frozen encoder + trainable decoder as an :class:`RAETokenizer` without statistics (the
    decoder learns on raw encoder features, as in the official recipe; statistics only rescale
    latents for stage 2 and cancel in encode/decode)."""
    from raebench.rae.decoder import DecoderConfig, build_decoder
    from raebench.rae.encoders import build_encoder
    from raebench.rae.tokenizer import RAETokenizer

    if not cfg.encoder:
        raise RaebenchError("This preset names no encoder; pass one with --encoder DIR_OR_REPO (or --set encoder=...).")
    enc = build_encoder(cfg.encoder, input_size=cfg.encoder_input_size)
    if enc.grid_size != cfg.grid:
        raise RaebenchError(
            f"The encoder gives {enc.grid_size}x{enc.grid_size} tokens at input {cfg.encoder_input_size}, but the "
            f"decoder needs {cfg.grid}x{cfg.grid} for {cfg.resolution} px with patch {cfg.decoder_patch}; set "
            f"encoder_input_size to {cfg.grid * enc.patch_size}."
        )
    dcfg = DecoderConfig(
        latent_dim=enc.hidden_size, hidden_size=cfg.decoder_hidden, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
        mlp_dim=cfg.decoder_mlp, patch_size=cfg.decoder_patch, grid_size=cfg.grid, layer_norm_eps=cfg.decoder_layer_norm_eps,
    )
    dec = build_decoder(dcfg, init_decoder_file(cfg.init_decoder) if cfg.init_decoder else None)
    # the official trainer calls decoder.requires_grad_(True), which also unfreezes the sin-cos positions
    dec.decoder_pos_embed.requires_grad_(cfg.train_pos_embed)
    return RAETokenizer(enc, dec, None, noise_tau=cfg.noise_tau, noise_rule=cfg.noise_rule)


def init_decoder_file(source: str) -> str:
    """``--init-decoder``: a weights file, or a folder written by ``raebench export-decoder``."""
    from raebench.rae.decoder import decoder_file

    return str(decoder_file(source))


class PixelDecoder(nn.Module):
    """What DDP wraps: the tokenizer's ``decode`` (decoder + un-normalisation); the frozen encoder
    inside it has no trainable parameters, so DDP synchronises the decoder's gradients only."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(z)  # (N, 3, R, R), nominally [0, 1]


def lr_lambda(warmup_steps: int, total_steps: int, final_ratio: float):
    """Official schedule: linear warmup from zero ((t+1)/warmup), cosine to ``final_ratio`` at ``total_steps``."""

    def f(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if t >= total_steps:
            return final_ratio
        progress = (t - warmup_steps) / max(total_steps - warmup_steps, 1)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# ---------------------------------------------------------------------------------------------
# Distributed helpers, RNG states, checkpoints
# ---------------------------------------------------------------------------------------------


def _all_reduce_mean_(tensors: list[torch.Tensor], world: int) -> None:
    """Average tensors over ranks in place (one flat all-reduce)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def rng_state() -> dict:
    st = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state(),
    }
    # this rank's GPU only (a resume may see another number of GPUs), and only once this process uses
    # CUDA: get_rng_state would otherwise open a context on GPU 0 in every rank of a --device cpu run
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    v, keys, pos = state["python"]
    random.setstate((v, tuple(keys), pos))
    name, arr, p, g, c = state["numpy"]
    np.random.set_state((name, arr.numpy().astype(np.uint32), p, g, c))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():  # models on a GPU by now
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints of earlier versions: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def _checked_step(module: nn.Module, opt: torch.optim.Optimizer, clip: float | None, what: str, step: int,
                  cfg: Stage1Config) -> None:
    """Clip (``clip`` > 0) and step, refusing a non-finite gradient norm before any parameter changes; the
    norm is of DDP-averaged gradients, the same on every rank, so all ranks stop together and the last
    checkpoint stays good."""
    try:
        clip_and_step(module, opt, clip)
    except NonFiniteGradientError as e:
        hint = "lower the learning rate or use --precision fp32" if cfg.precision == "bf16" else \
            "lower the learning rate or check the images"
        raise RaebenchError(f"Training stopped at step {step + 1}: the {what} gradients became non-finite ({e}); the "
                            f"last checkpoint, if one was written, holds the last good state; {hint}.") from None


def compare_configs(saved: dict, cfg: Stage1Config, encoder_recorded: bool = False) -> list[str]:
    """Trajectory-changing differences between a saved run config and ``cfg``. With the encoder's
    weights recorded (``encoder_recorded``), its path or name is not compared: the weights are."""
    now = cfg.to_dict()
    saved = {**LEGACY_VALUES, **saved}  # a setting added later has its old behaviour in older runs
    skip = RUN_ONLY_FIELDS | ({"encoder"} if encoder_recorded else set())
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in skip and saved.get(k) != v]


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's state: names, dtypes, shapes and bytes of every
    tensor. A frozen encoder is identified by it, wherever its files live (~0.3 s for DINOv2-B)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Logging, samples, validation
# ---------------------------------------------------------------------------------------------


VAL_COLUMNS = ("step", "n", "psnr", "ssim")


def truncate_csv(path: Path, columns: tuple[str, ...], last_step: int) -> None:
    """Rewrite ``path`` with only the rows up to ``last_step`` (a resumed run logs the rest again)."""
    keep: list[dict] = []
    if path.is_file():
        with open(path, newline="") as f:
            keep = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= last_step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(keep)
    atomic_write_bytes(path, buf.getvalue().encode())


class RunLog:
    """``log.csv`` and ``val.csv`` (rank 0), TensorBoard if installed, W&B if asked."""

    def __init__(self, run_dir: Path, start_step: int, cfg: Stage1Config) -> None:
        self.path, self.val_path = run_dir / "log.csv", run_dir / "val.csv"
        truncate_csv(self.path, LOG_COLUMNS, start_step)
        truncate_csv(self.val_path, VAL_COLUMNS, start_step)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            pass
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RaebenchError("wandb=true needs the wandb package: pip install wandb (or raebench[wandb]).") from None
            self.wandb = wandb.init(project="raebench-stage1", name=run_dir.name, dir=str(run_dir), config=cfg.to_dict(),
                                    resume="allow", id=run_dir.name)

    def write(self, row: dict, val: bool = False) -> None:
        path, columns = (self.val_path, VAL_COLUMNS) if val else (self.path, LOG_COLUMNS)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, columns).writerow({k: row.get(k, "") for k in columns})
        scalars = {("val/" if val else "") + k: v for k, v in row.items() if isinstance(v, float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


@torch.no_grad()
def reconstruct(tokenizer: nn.Module, images: torch.Tensor, device: torch.device, batch: int, autocast) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> uint8 reconstructions through ``tokenizer`` without noise."""
    out = []
    for i in range(0, len(images), batch):
        x = to_float(images[i:i + batch].to(device))
        with autocast:
            y = tokenizer.decode(tokenizer.encode_features(x))
        out.append(to_uint8(y.float()).cpu())
    return torch.cat(out)


def save_grid(path: Path, images: torch.Tensor, recons: torch.Tensor) -> None:
    """Inputs on the top row, reconstructions below, as a PNG written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat([images, recons]), nrow=len(images), padding=2)  # (3, H, W) uint8
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def plan(cfg: Stage1Config, n_images: int, world: int = 1) -> dict[str, int]:
    """Epochs -> optimizer steps for ``n_images`` (what --dry-run prints)."""
    spe = n_images // cfg.global_batch
    if spe < 1:
        raise DataError(f"{n_images} training images are fewer than one global batch ({cfg.global_batch}); "
                        "lower global_batch or add images.")
    if cfg.global_batch % (world * cfg.grad_accum):
        raise RaebenchError(f"global_batch {cfg.global_batch} is not divisible by world size x grad_accum = "
                            f"{world} x {cfg.grad_accum}.")
    return {
        "images": n_images, "steps_per_epoch": spe, "total_steps": cfg.epochs * spe,
        "micro_batch": cfg.global_batch // (world * cfg.grad_accum),
        "warmup_steps": int(cfg.warmup_epochs * spe), "lpips_start_step": int(cfg.lpips_start_epoch * spe),
        "disc_start_step": int(cfg.disc_start_epoch * spe), "gan_start_step": int(cfg.gan_start_epoch * spe),
    }


def train(cfg: Stage1Config, run_dir: str | os.PathLike, device: str = "auto") -> dict[str, Any]:
    """Run or resume the stage-1 run in ``run_dir``; returns {'step', 'run_dir', 'decoder'}.

    One job per run folder: a second one on the same ``run_dir`` is refused while the first runs
    (:mod:`raebench.locks`), so two jobs never overwrite each other's checkpoints and logs.
    """
    from raebench.locks import exclusive

    run_dir = Path(run_dir)
    with exclusive(run_dir, "stage-1 training job", "start another run with --name"):
        return _train(cfg, run_dir, device)


def _train(cfg: Stage1Config, run_dir: str | os.PathLike, device: str = "auto") -> dict[str, Any]:
    from raebench.checkpoint import load_state, resume_states, save_atomic
    from raebench.results import remove_orphan_temps
    from raebench.rae.tokenizer import add_noise
    from raebench.stage1.discriminator import build_discriminator, diff_augment, quantize_8bit
    from raebench.stage1.export import export_decoder
    from raebench.stage1.losses import LastLayerTap, adaptive_gan_backward, build_lpips, generator_loss, hinge_d_loss

    distributed.init(str(device))  # an unusable device is refused here, said once under torchrun
    device = resolve_device(distributed.local_device(str(device)))
    rank, world = distributed.rank_world()
    device = distributed.pin_cuda(device)  # --device cuda: the current GPU, with its index
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if not cfg.data:
        raise RaebenchError("Give the training images with --data DIR.")
    images = scan_folder(cfg.data)
    if not images.paths:
        raise DataError(f"No image files under {cfg.data!r}.")
    data = {"n": len(images.paths), "fingerprint": images.fingerprint()}  # a resume must see the same images
    p = plan(cfg, len(images.paths), world)
    spe, total, accum, micro = p["steps_per_epoch"], p["total_steps"], cfg.grad_accum, p["micro_batch"]
    stop = min(total, cfg.max_steps) if cfg.max_steps is not None else total

    # models: the same seed on every rank, so the discriminator heads (no DDP) start equal
    torch.manual_seed(cfg.seed)
    # the three networks are built in this order (the seed's draws) and every missing file is named in one error
    missing: list[str] = []

    def attempt(build):
        try:
            return build()
        except MissingWeightsError as e:
            missing.append(str(e))
            return None

    tok = attempt(lambda: build_trainable_rae(cfg))
    lpips = attempt(lambda: build_lpips(cfg.lpips_weights)) if cfg.lpips_weight > 0 else None
    disc = attempt(lambda: build_discriminator(cfg)) if cfg.gan_weight > 0 else None
    if missing:
        raise MissingWeightsError(missing[0] if len(missing) == 1 else
                                  f"{len(missing)} weights are missing:\n" + "\n".join(f"- {m}" for m in missing))
    encoder_id = weights_digest(tok.encoder)  # a resume must see the same frozen encoder
    tok = tok.to(device)
    decoder = tok.decoder.train()
    ema = copy.deepcopy(decoder).requires_grad_(False).eval()
    lpips = lpips.to(device) if lpips is not None else None
    disc = disc.to(device).eval() if disc is not None else None
    if disc is not None:
        disc.heads.requires_grad_(False)  # switched on for the discriminator's own update only
    params = [q for q in decoder.parameters() if q.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p["warmup_steps"], total, cfg.final_lr / cfg.lr))
    disc_params = list(disc.heads.parameters()) if disc is not None else []
    dopt = dsched = None
    if disc is not None:
        dopt = torch.optim.AdamW(disc_params, lr=cfg.disc_lr, betas=cfg.disc_betas, weight_decay=cfg.disc_weight_decay,
                                 eps=1e-8, fused=fused)
        # counted in discriminator updates, as the official trainer does
        dsched = torch.optim.lr_scheduler.LambdaLR(dopt, lr_lambda(int(cfg.disc_warmup_epochs * spe), total, cfg.disc_final_lr / cfg.disc_lr))

    step, disc_updates = 0, 0
    if ckpt_path.is_file():
        ck = load_state(ckpt_path, map_location="cpu")
        saved_enc = ck.get("encoder_weights")  # older checkpoints: none, the encoder path is compared instead
        diff = compare_configs(ck.get("config", {}), cfg, saved_enc is not None) + compare_data(ck.get("data"), data)
        if saved_enc is not None and saved_enc != encoder_id:
            diff.insert(0, f"encoder weights: {saved_enc} -> {encoder_id}")
        # rank 0's verdict on every rank: each rank stops, rank 0 alone says why
        distributed.refuse(f"{str(run_dir)!r} holds a run with other settings or data ({'; '.join(diff[:4])}); "
                           "re-run with its settings and data, or start a new run with --name." if diff else None)
        states = {"model": decoder, "ema": ema, "opt": opt, "sched": sched}
        if disc is not None:
            states.update(disc=disc.heads, disc_opt=dopt, disc_sched=dsched)
        resume_states(ck, ckpt_path, states, "delete it (or start a new run with --name) to start afresh.",
                      also=("step", "disc_updates", "rng"))
        step, disc_updates = int(ck["step"]), int(ck["disc_updates"])
        rngs = ck["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if rank == 0:
            log.info("resumed %s at step %d/%d", run_dir, step, total)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # half-written files of a killed job (we hold the lock): checkpoints, logs, sample grids, an export
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples", run_dir / "decoder"):
            remove_orphan_temps(folder)
        meta = {"config": cfg.to_dict(), "plan": p, "world_size": world, "device": str(device), **provenance()}
        atomic_write_bytes(run_dir / "config.json", json.dumps(meta, indent=2).encode())
        log.info("stage 1: %d images listed (an unreadable one is replaced by the next readable, with a warning), "
                 "%d steps/epoch, %d steps (%d epochs), micro-batch %d x %d accum x %d ranks",
                 p["images"], spe, total, cfg.epochs, micro, accum, world)
    runlog = RunLog(run_dir, step, cfg) if rank == 0 else None

    ddp = PixelDecoder(tok)
    if world > 1:
        if rank:  # torch warns once per process when a micro-batch of 1 gives the cls token's gradient a
            # strided view (a copy into DDP's bucket): alike on every rank, so rank 0 alone says it
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ddp = nn.parallel.DistributedDataParallel(
            ddp, device_ids=[device.index] if device.type == "cuda" else None, **distributed.no_buffer_sync()
        )
    tap = LastLayerTap(decoder.decoder_pred)  # the adaptive GAN weight is measured on the last layer
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    loader = DataLoader(
        TrainCrops(images.paths, cfg.resolution, cfg.crop_scale), batch_sampler=StepBatches(len(images.paths), cfg, step, stop, rank, world),
        num_workers=cfg.num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=2 if cfg.num_workers > 0 else None,
        worker_init_fn=ignore_in_worker,  # a SIGTERM to every process of the job stops the step, not a worker
        # iter() draws the workers' base seed: from a generator of its own, not the global one, which a
        # checkpoint saves (a resumed run drew once more and saved another state than an uninterrupted run)
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_images = None
    if rank == 0 and (cfg.sample_every > 0 or cfg.val_every > 0):
        val_list = scan_folder(cfg.val_data) if cfg.val_data else images
        val_images = load_eval_images(val_list.paths[: max(cfg.val_n, 8)], cfg.resolution)
    ema_tok = type(tok)(tok.encoder, ema, None)  # shares the frozen encoder; decodes with the EMA weights

    with StopOnSignal() as preempt:  # the stop signals only set a flag, read after each step
        batches = iter(loader)
        t_last, logged_step = time.perf_counter(), step
        while step < stop:
            epoch = step // spe
            use_lpips = lpips is not None and step >= p["lpips_start_step"]
            use_gan = disc is not None and step >= p["gan_start_step"]
            train_disc = disc is not None and step >= p["disc_start_step"]

            # -- decoder update ------------------------------------------------------------------
            opt.zero_grad(set_to_none=True)
            # l1, lpips, gan, lambda, total | d_loss, real, fake, acc | one stop flag per signal (preempt.mark)
            sums = torch.zeros(9 + len(preempt.signals), dtype=torch.float64, device=device)
            stash = []  # (clean latents, real images, positions) for the discriminator phase
            for a in range(accum):
                mb = next(batches)
                # uint8 from the pinned batch, converted on the device: a quarter of the bytes, and an
                # asynchronous copy (a float tensor made on the CPU is pageable, so its copy blocks)
                x = to_float(mb["image"].to(device, non_blocking=True))  # (B, 3, R, R) in [0, 1]
                with torch.no_grad(), autocast:
                    z = tok.encode_features(x).float()  # (B, C, h, w) raw features
                gens = sample_generators(cfg.seed, NOISE, step, mb["pos"], device)
                zn = torch.cat([add_noise(z[i:i + 1], cfg.noise_tau, cfg.noise_rule, g) for i, g in enumerate(gens)])
                if train_disc:
                    stash.append((z, x, mb["pos"]))
                sync = contextlib.nullcontext() if (a == accum - 1 or world == 1) else ddp.no_sync()
                with sync:
                    with autocast:
                        rec = ddp(zn).float()
                        l1 = (rec - x).abs().mean()
                        lp = lpips(rec * 2 - 1, x * 2 - 1).mean() if use_lpips else l1.new_zeros(())
                    rec_loss = l1 + cfg.lpips_weight * lp
                    if use_gan:
                        # the raw reconstruction, as the official trainer feeds the generator's GAN term (its
                        # discriminator update below sees clamped, 8-bit-quantised reconstructions)
                        fake = rec * 2 - 1
                        fake = diff_augment(fake, sample_generators(cfg.seed, AUG_G, step, mb["pos"], device),
                                            cfg.diffaug_translation, cfg.diffaug_color, cfg.diffaug_cutout)
                        with autocast:
                            g_loss = generator_loss(disc(fake).float())
                        lam = adaptive_gan_backward(rec_loss, g_loss, tap, cfg.gan_weight, cfg.max_adaptive_weight, 1.0 / accum)
                        loss = rec_loss + cfg.gan_weight * lam * g_loss
                    else:
                        g_loss = lam = l1.new_zeros(())
                        loss = rec_loss
                        (loss / accum).backward()
                sums[:5] += torch.stack([l1, lp, g_loss, lam, loss]).detach().double()
            lr_now = opt.param_groups[0]["lr"]
            _checked_step(decoder, opt, cfg.clip_grad, "decoder", step, cfg)  # a non-finite gradient changes nothing
            sched.step()
            update_ema(ema, decoder, cfg.ema_decay)

            # -- discriminator update --------------------------------------------------------------
            dlr_now = float("nan")
            if train_disc:
                dopt.zero_grad(set_to_none=True)
                disc.heads.requires_grad_(True)
                for a, (z, x, pos) in enumerate(stash):
                    # as the official discriminator: fake, then real, in two train-mode forwards (two spectral-
                    # norm power iterations per update, the real batch scored after the second); further
                    # micro-batches of an accumulated step in eval mode, so the step count stays the same
                    disc.train(a == 0)
                    with torch.no_grad(), autocast:
                        fake = quantize_8bit(tok.decode(z).float() * 2 - 1, straight_through=False)
                    fake = diff_augment(fake, sample_generators(cfg.seed, AUG_FAKE, step, pos, device),
                                        cfg.diffaug_translation, cfg.diffaug_color, cfg.diffaug_cutout)
                    real = diff_augment(x * 2 - 1, sample_generators(cfg.seed, AUG_REAL, step, pos, device),
                                        cfg.diffaug_translation, cfg.diffaug_color, cfg.diffaug_cutout)
                    with autocast:
                        logits_fake = disc(fake).float()
                        logits_real = disc(real).float()
                    d_loss = hinge_d_loss(logits_real, logits_fake)
                    (d_loss / accum).backward()
                    acc = (logits_real > logits_fake).float().mean()
                    sums[5:9] += torch.stack([d_loss, logits_real.mean(), logits_fake.mean(), acc]).detach().double()
                disc.eval()
                disc.heads.requires_grad_(False)  # the decoder's GAN term only needs gradients to the image
                _all_reduce_mean_([q.grad for q in disc_params if q.grad is not None], world)
                dlr_now = dopt.param_groups[0]["lr"]
                _checked_step(disc.heads, dopt, None, "discriminator", step, cfg)
                dsched.step()
                disc_updates += 1
            step += 1

            # -- bookkeeping -----------------------------------------------------------------------
            preempt.mark(sums[9:])  # SIGTERM/SIGUSR1 on any rank: every rank stops after this step, in the same all-reduce
            if world > 1:
                dist.all_reduce(sums)
            m = (sums / (accum * world)).tolist()  # the step's one host-device sync
            signum = preempt.decide(m[9:])
            if not all(math.isfinite(v) for v in m[:5]):  # the same values on every rank: all stop together
                hint = "lower lr or use --precision fp32" if cfg.precision == "bf16" else "lower lr or check the images"
                raise RaebenchError(f"The decoder loss became non-finite at step {step}; {hint}.")
            if rank == 0 and (step % cfg.log_every == 0 or step == stop):
                now = time.perf_counter()
                row = {
                    "step": step, "epoch": epoch, "images": step * cfg.global_batch, "lr": lr_now,
                    "disc_lr": dlr_now if train_disc else "", "l1": m[0], "lpips": m[1] if use_lpips else "",
                    "gan": m[2] if use_gan else "", "adaptive_weight": m[3] if use_gan else "",
                    "gan_weight_eff": cfg.gan_weight * m[3] if use_gan else 0.0, "total": m[4],
                    "disc_loss": m[5] if train_disc else "", "logits_real": m[6] if train_disc else "",
                    "logits_fake": m[7] if train_disc else "", "disc_acc": m[8] if train_disc else "",
                    "sec_per_step": (now - t_last) / (step - logged_step),
                }
                t_last, logged_step = now, step
                runlog.write(row)
                log.info("step %d/%d  l1 %.4f  lpips %s  gan %s  lr %.2e", step, total, m[0],
                         f"{m[1]:.4f}" if use_lpips else "-", f"{m[2]:.4f} (x{m[3]:.3g})" if use_gan else "-", lr_now)
            if rank == 0 and val_images is not None:
                if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == stop):
                    shown = val_images[:8]
                    save_grid(run_dir / "samples" / f"step-{step:07d}.png", shown, reconstruct(ema_tok, shown, device, micro, autocast))
                if cfg.val_every > 0 and (step % cfg.val_every == 0 or step == stop):
                    from raebench.metrics.pixel import psnr_per_image, ssim_per_image

                    ref = val_images[: cfg.val_n]
                    rec_u8 = reconstruct(ema_tok, ref, device, micro, autocast)
                    runlog.write({"step": step, "n": len(ref), "psnr": float(psnr_per_image(to_float(ref), to_float(rec_u8)).mean()),
                                  "ssim": float(ssim_per_image(to_float(ref), to_float(rec_u8)).mean())}, val=True)
            if step % cfg.ckpt_every == 0 or step == stop or signum:
                rngs: list = [rng_state()]
                if world > 1:
                    rngs = [None] * world
                    dist.all_gather_object(rngs, rng_state())
                if rank == 0:
                    save_atomic({
                        "format": CHECKPOINT_FORMAT, "step": step, "disc_updates": disc_updates,
                        "model": decoder.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "disc": disc.heads.state_dict() if disc is not None else {},
                        "disc_opt": dopt.state_dict() if dopt is not None else {},
                        "disc_sched": dsched.state_dict() if dsched is not None else {},
                        "rng": rngs, "config": cfg.to_dict(), "data": data, "encoder_weights": encoder_id,
                    }, ckpt_path)
                if world > 1:
                    dist.barrier()
            if signum:
                if rank == 0:
                    runlog.close()
                raise Preempted.saved(signum, f"at step {step}", "checkpoint", show=rank == 0)

    exported = None
    if rank == 0:
        runlog.close()
        if step >= total:
            exported = export_decoder(ckpt_path, run_dir / "decoder")
            log.info("done: EMA decoder exported to %s", exported)
    if world > 1:
        dist.barrier()
    return {"step": step, "total_steps": total, "run_dir": str(run_dir), "decoder": str(exported) if exported else None}
