"""Diffusability probe: how hard is a latent space to generate, for a fixed small budget?

Recipe (fixed; every number is in :attr:`ProbeConfig.version`, so rows from different budgets never
mix). The stage-2 trainer (:func:`raebench.stage2.train.train`) trains a preset (default
``ditdh-s``, patch size 1) on the latents of ``probe_images`` images, unconditionally (one class;
label dropout 0.1 as the recipe, the null class is never sampled): AdamW lr 2e-4 held constant,
betas (0.9, 0.95), no weight decay, gradient clipping 1.0, EMA 0.999, the sin-cos positions and
time frequencies kept fixed (the stage-2 recipe trains them), logit-normal(0, 1) times
shifted by ``s = max(1, sqrt(C·H·W / 4096))`` (t = 0 is data, t = 1 noise), batch ``batch_size``, for
``steps`` optimizer steps, fp32, seeded. Its run folder lives under
``<results>/analysis/probes/<key>`` (the key covers tokenizer, data, resolution and the recipe), so
re-running the same analysis reuses or resumes the training. Then ``n_samples`` latents are drawn
from the EMA model with :func:`raebench.stage2.samplers.sample` (Euler, 50 grid points, the same
shift) and scored:

* ``diffuse-latent-fd``: Fréchet distance between Gaussian fits of the C-dimensional *tokens* of
  the generated and the training latents (a C×C covariance; flattened latents would need
  (C·H·W)² memory);
* ``diffuse-fd-<reference>``: Fréchet distance between a reference encoder's features of the
  decoded samples and of the real images (FD-DINOv2 with ``dinov2-l``, the FD-DINOv2 extractor).

With a few hundred samples the Fréchet distances carry a large positive bias; they compare
tokenizers under the same budget, they are not gFID.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raebench.analysis.spectrum import tokens_of
from raebench.images import to_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    preset: str = "ditdh-s"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.999
    n_samples: int = 256
    sample_steps: int = 50
    seed: int = 0

    @property
    def version(self) -> str:
        return (f"diffuse-{self.preset}-steps{self.steps}-bs{self.batch_size}-lr{self.lr:g}-ema{self.ema_decay:g}-fp32-"
                f"samples{self.n_samples}-euler{self.sample_steps}-seed{self.seed}-v2")  # v2: first readable images


SHIFT_BASE = 4096
MAX_TOKENS = 4096  # the probe trains a patch-1 model: larger latent grids are out of its budget


def feature_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two (N, d) feature sets (the metrics package's
    float64 implementation, exact through the features themselves when N ≤ d)."""
    from raebench.metrics.frechet import GaussianStats, frechet_distance

    sa, sb = GaussianStats(), GaussianStats()
    sa.update(a)
    sb.update(b)
    return frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov(), sa.factor(), sb.factor())


@dataclass
class ProbeResult:
    config: ProbeConfig
    latent_fd: float
    reference_fd: dict[str, float]
    final_loss: float  # mean training loss over the last 10% of this run's steps (nan when reused)
    seconds_train: float


class _InMemoryLatents:
    """The stage-2 trainer's latent-source interface over latents held in memory, one class."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.x = latents.detach().float().cpu()
        self.labels = torch.zeros(len(self.x), dtype=torch.long)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def identity(self) -> dict:
        """What the run records of its data: a resumed probe must see the same latents."""
        digest = hashlib.sha256(self.x.contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"n": len(self), "latent_shape": list(self.latent_shape), "fingerprint": digest}

    def fetch(self, idx: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.labels[idx]

    def prepare(self, raw: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return raw[0].to(device), raw[1].to(device)


def train_and_sample(latents: torch.Tensor, cfg: ProbeConfig, work_dir: str | Path) -> tuple[torch.Tensor, float]:
    """Train (or resume) the probe on ``latents`` (M, C, H, W) in ``work_dir``; return the EMA
    model's samples (n_samples, C, H, W) on the latents' device and the recent mean training loss."""
    # from the defining modules: ``raebench.stage2.sample`` is also a submodule, which replaces the
    # package's re-exported function once anything imports it
    from raebench.stage2.samplers import sample
    from raebench.stage2.transport import shift_from_dims
    from raebench.stage2.checkpoints import read_state_dict
    from raebench.stage2.train import TrainConfig, build_for_training, train

    if latents.ndim != 4 or latents.shape[2] != latents.shape[3]:
        raise ValueError(f"the diffusability probe needs square (N, C, H, W) latents, got {tuple(latents.shape)}")
    m, c, h, _ = latents.shape
    if h * h > MAX_TOKENS:
        raise ValueError(f"a {h}x{h} latent grid is {h * h} tokens for the patch-1 probe (at most {MAX_TOKENS}); use a smaller --resolution")
    if m < cfg.batch_size:
        raise ValueError(f"{m} probe images are fewer than one batch ({cfg.batch_size}); lower --probe-batch-size")
    epochs = math.ceil(cfg.steps / (m // cfg.batch_size)) + 1
    tcfg = TrainConfig(
        model=cfg.preset, out=str(work_dir), num_classes=1, epochs=epochs, global_batch=cfg.batch_size, lr=cfg.lr,
        final_lr=cfg.lr, constant_epochs=epochs, decay_end_epoch=epochs, ema_decay=cfg.ema_decay, precision="fp32",
        shift_base=min(SHIFT_BASE, c * h * h),  # s = max(1, sqrt(C·H·W / 4096)): the transport needs s >= 1
        seed=cfg.seed, log_every=max(1, cfg.steps // 10), ckpt_every=max(1, cfg.steps // 4), max_steps=cfg.steps,
        freeze_embeddings=True,  # the probe's fixed recipe (its version): positions and time frequencies fixed
        # latents in memory: loader workers would only copy them
        **({"num_workers": 0} if "num_workers" in TrainConfig.__dataclass_fields__ else {}),
    )
    dev = latents.device
    run = train(tcfg, dev, source=_InMemoryLatents(latents), lock_advice="use another --results folder")
    losses = run["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    model = build_for_training(tcfg, (c, h, h)).to(dev).eval()
    model.load_state_dict(read_state_dict(Path(run["out"]) / "checkpoints" / "last.pt", key="ema"))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn((cfg.n_samples, c, h, h), generator=g).to(dev)
    labels = torch.zeros(cfg.n_samples, dtype=torch.long, device=dev)
    shift = shift_from_dims(c * h * h, tcfg.shift_base)
    out = [sample(model, noise[s : s + cfg.batch_size], labels[s : s + cfg.batch_size], num_steps=cfg.sample_steps,
                  method="euler", shift=shift) for s in range(0, cfg.n_samples, cfg.batch_size)]
    return torch.cat(out), (float(np.mean(tail)) if tail else math.nan)


def diffusability_probe(
    tokenizer,
    latents: torch.Tensor,
    cfg: ProbeConfig,
    work_dir: str | Path,
    references: dict[str, tuple[torch.nn.Module, torch.Tensor]] | None = None,
    decode_batch: int = 16,
) -> ProbeResult:
    """Run the probe; ``references[name] = (encoder, real_features (N, D))`` adds an FD per reference."""
    import time

    t0 = time.perf_counter()
    samples, final_loss = train_and_sample(latents, cfg, work_dir)
    seconds = time.perf_counter() - t0
    ok = torch.isfinite(samples.flatten(1)).all(1)
    if not bool(ok.all()):
        log.warning("diffusability probe: %d of %d samples are NaN/Inf and are dropped", int((~ok).sum()), ok.numel())
    samples = samples[ok]
    if samples.shape[0] < 2:
        return ProbeResult(cfg, math.nan, {k: math.nan for k in references or {}}, final_loss, seconds)
    latent_fd = feature_fd(tokens_of(samples), tokens_of(latents))
    ref_fd: dict[str, float] = {}
    if references:
        feats: dict[str, list[torch.Tensor]] = {k: [] for k in references}
        with torch.no_grad():
            for s in range(0, samples.shape[0], decode_batch):
                imgs = to_uint8(tokenizer.decode(samples[s : s + decode_batch]).float())
                for name, (enc, _) in references.items():
                    feats[name].append(enc(imgs).double().cpu())
        for name, (_, real) in references.items():
            ref_fd[name] = feature_fd(torch.cat(feats[name]), real)
    return ProbeResult(cfg, latent_fd, ref_fd, final_loss, seconds)
