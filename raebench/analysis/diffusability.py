"""Diffusability probe: how hard is a latent space to generate, for a fixed small budget?

Recipe (fixed; every number is in :attr:`ProbeConfig.version`, so rows from different budgets never
mix): a stage-2 preset (:data:`raebench.stage2.models.MODELS`, default ``ditdh-s``) is built for the
latent geometry with one class (unconditional generation; the null class exists but is never
sampled), patch size ``max(1, H // 16)`` so that every latent has at most 16×16 tokens, trained with
:class:`raebench.stage2.transport.Transport` (linear path, velocity, logit-normal(0, 1) times shifted
by ``s = sqrt(C·H·W / 4096)``; t = 0 is data, t = 1 noise) for ``steps`` AdamW steps (lr 2e-4, betas
(0.9, 0.95), no weight decay, gradient clipping 1.0, no EMA) on minibatches drawn with replacement
from the probe's latents, seeded. Then ``n_samples`` latents are drawn with
:func:`raebench.stage2.samplers.sample` (Euler, 50 grid points, the same shift) and scored:

* ``diffuse-latent-fd``: Fréchet distance between Gaussian fits of the C-dimensional *tokens* of
  the generated and the training latents (a C×C covariance; flattened latents would need
  (C·H·W)² memory);
* ``diffuse-fd-<reference>``: Fréchet distance between a reference encoder's features (e.g.
  DINOv2) of the decoded samples and of the real images (FD-DINOv2 with ``dinov2-*``).

With a few hundred samples the Fréchet distances carry a large positive bias; they compare
tokenizers under the same budget, they are not gFID.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from raebench.analysis.spectrum import tokens_of
from raebench.data import to_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    preset: str = "ditdh-s"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    n_samples: int = 256
    sample_steps: int = 50
    seed: int = 0

    @property
    def version(self) -> str:
        return (f"diffuse-{self.preset}-steps{self.steps}-bs{self.batch_size}-lr{self.lr:g}-"
                f"samples{self.n_samples}-euler{self.sample_steps}-seed{self.seed}-v1")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, via symmetric eigendecompositions (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(0.5 * (s1 + s1.T))
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ₁^½
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def gaussian_fit(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) -> mean (D,), covariance (D, D) (unbiased), float64."""
    a = x.detach().double().cpu().numpy()
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


@dataclass
class ProbeResult:
    config: ProbeConfig
    patch: int
    latent_fd: float
    reference_fd: dict[str, float]
    final_loss: float
    seconds_train: float


def train_and_sample(latents: torch.Tensor, cfg: ProbeConfig) -> tuple[torch.Tensor, int, float]:
    """Train the probe model on ``latents`` (M, C, H, W) and return (samples (n, C, H, W), patch,
    mean loss of the last 10% of steps)."""
    from raebench.stage2 import Transport, build_model, sample, shift_from_dims

    if latents.ndim != 4 or latents.shape[2] != latents.shape[3]:
        raise ValueError(f"the diffusability probe needs square (N, C, H, W) latents, got {tuple(latents.shape)}")
    m, c, h, _ = latents.shape
    dev = latents.device
    patch = max(1, h // 16)
    if h % patch:
        raise ValueError(f"latent side {h} is not divisible by the probe's patch size {patch}")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the model's initialisation
    model = build_model(cfg.preset, in_channels=c, input_size=h, num_classes=1, patch_size=patch).to(dev)
    shift = shift_from_dims(c * h * h)
    transport = Transport("logit-normal", 0.0, 1.0, shift=max(shift, 1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=dev)
    tail, n_tail = 0.0, max(1, cfg.steps // 10)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(m, (cfg.batch_size,), generator=g).to(dev)
        loss = transport.loss(model, latents[idx], y, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= cfg.steps - n_tail:
            tail += float(loss) / n_tail
    model.eval()
    noise = torch.randn((cfg.n_samples, c, h, h), generator=g).to(dev)
    labels = torch.zeros(cfg.n_samples, dtype=torch.long, device=dev)
    out = []
    for s in range(0, cfg.n_samples, cfg.batch_size):
        out.append(sample(model, noise[s : s + cfg.batch_size], labels[s : s + cfg.batch_size],
                          num_steps=cfg.sample_steps, method="euler", shift=max(shift, 1.0)))
    return torch.cat(out), patch, tail


def diffusability_probe(
    tokenizer,
    latents: torch.Tensor,
    cfg: ProbeConfig,
    references: dict[str, tuple[torch.nn.Module, torch.Tensor]] | None = None,
    decode_batch: int = 16,
) -> ProbeResult:
    """Run the probe; ``references[name] = (encoder, real_features (N, D))`` adds an FD per reference."""
    import time

    t0 = time.perf_counter()
    samples, patch, final_loss = train_and_sample(latents, cfg)
    seconds = time.perf_counter() - t0
    ok = torch.isfinite(samples.flatten(1)).all(1)
    if not bool(ok.all()):
        log.warning("diffusability probe: %d of %d samples are NaN/Inf and are dropped", int((~ok).sum()), ok.numel())
    samples = samples[ok]
    if samples.shape[0] < 2:
        return ProbeResult(cfg, patch, math.nan, {k: math.nan for k in references or {}}, final_loss, seconds)
    latent_fd = frechet_distance(*gaussian_fit(tokens_of(samples)), *gaussian_fit(tokens_of(latents)))
    ref_fd: dict[str, float] = {}
    if references:
        feats: dict[str, list[torch.Tensor]] = {k: [] for k in references}
        with torch.no_grad():
            for s in range(0, samples.shape[0], decode_batch):
                imgs = to_uint8(tokenizer.decode(samples[s : s + decode_batch]).float())
                for name, (enc, _) in references.items():
                    feats[name].append(enc(imgs).double().cpu())
        for name, (_, real) in references.items():
            ref_fd[name] = frechet_distance(*gaussian_fit(torch.cat(feats[name])), *gaussian_fit(real))
    return ProbeResult(cfg, patch, latent_fd, ref_fd, final_loss, seconds)
