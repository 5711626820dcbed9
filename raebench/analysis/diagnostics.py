"""Decoder diagnostics on a small subset of images: robustness to latent noise, interpolation
smoothness.

Both decode latents and compare images the way the evaluator does: decoded images are clamped and
rounded to uint8 (:func:`raebench.images.to_uint8`) before any score, PSNR is the project's per-image
8-bit PSNR (:func:`raebench.metrics.pixel.psnr_per_image`, mean over images), and a perceptual
distance is any ``(uint8 (N,3,H,W), uint8 (N,3,H,W)) -> (N,)`` callable (LPIPS when available,
:func:`rmse_distance` otherwise; its name is part of every metric name).

* **Decoder robustness** (:func:`decoder_robustness`): for each relative σ in a grid,
  ``x_σ = decode(z + σ · s · ε)`` with one fixed ``ε ~ N(0, I)`` per image (seeded, shared across
  σ so curves are smooth) and ``s`` the latent's per-element std (root mean per-channel variance, from
  :class:`raebench.analysis.spectrum.LatentStats`). Scores compare ``x_σ`` with ``decode(z)`` (how
  much the decoder amplifies latent noise) and with the image (what a generator with that much
  latent error would deliver). σ must be finite, positive and at most ``MAX_SIGMA``. When the
  latents do not vary (``s`` zero, or below ``1e-6`` of their largest magnitude, so σ·s adds no
  noise that survives float32) robustness is undefined: every per-σ score is NaN and the curve's
  ``note`` says why.
* **Interpolation smoothness** (:func:`interpolation_smoothness`): for pairs (a, b), decode
  ``z_t = (1 − t) z_a + t z_b`` at ``t = 0, 1/S, …, 1``; ``d_k`` is the distance between consecutive
  decodes. Path-length style, each step is normalised by its length: ``v_k = d_k · S`` (distance per
  unit t). Reported: the mean of ``v_k`` over pairs and steps (the path length), its relative
  variance along each path ``Var_k(v_k) / Mean_k(v_k)²`` averaged over pairs (0 when every step
  changes the image equally: a smooth, evenly parametrised space; large when the decode jumps
  between regimes), and the path ratio ``Σ_k d_k / d(decode(z_a), decode(z_b))`` averaged over pairs
  (1 for a straight path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from raebench.images import to_float, to_uint8
from raebench.metrics.pixel import psnr_per_image

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0)
#: noise 100 times the latents' spread decodes to noise for any tokenizer; larger values only probe overflow
MAX_SIGMA = 100.0
STD_REL = 1e-6  # a latent std below this fraction of the largest |latent| adds no noise that survives float32
DEFAULT_INTERP_STEPS = 8


def rmse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image root-mean-square difference of uint8 images on the [0, 1] scale -> (N,) float64."""
    return (to_float(a).double() - to_float(b).double()).pow(2).flatten(1).mean(1).sqrt()


def check_sigmas(sigmas: Sequence[float]) -> None:
    """ValueError unless ``sigmas`` is a non-empty sequence of finite numbers in (0, MAX_SIGMA]."""
    bad = [s for s in sigmas if not (math.isfinite(s) and 0 < s <= MAX_SIGMA)]
    if not sigmas or bad:
        raise ValueError(f"noise levels must be numbers in (0, {MAX_SIGMA:g}] (relative to the latent std), got {tuple(sigmas)}")


def _decode_u8(tokenizer, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, z.shape[0], batch_size):
            out.append(to_uint8(tokenizer.decode(z[s : s + batch_size]).float()).cpu())
    return torch.cat(out)


@dataclass
class RobustnessCurve:
    sigmas: tuple[float, ...]  # relative to latent_std
    latent_std: float
    n_images: int
    psnr_clean: float  # decode(z) against the image, dB
    psnr_vs_decode: list[float]  # dB, one per σ
    psnr_vs_image: list[float]
    distance_name: str | None = None
    dist_vs_decode: list[float] | None = None
    dist_vs_image: list[float] | None = None
    #: a few uint8 images for a figure: "original", "reconstruction" and the σ nearest to 0.5
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""  # why the per-σ scores are NaN, when they are


def decoder_robustness(
    tokenizer,
    images: torch.Tensor,
    latents: torch.Tensor,
    sigmas: Sequence[float],
    latent_std: float,
    *,
    distance: Distance | None = None,
    distance_name: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    keep: int = 0,
) -> RobustnessCurve:
    """PSNR (and a perceptual distance) of decode(z + σ·s·ε) vs decode(z) and vs the image.

    ``images``: uint8 (N, 3, H, W) originals; ``latents``: their encodings (N, ...), on the
    tokenizer's device. ``keep``: how many images to keep in ``examples`` for a figure.
    """
    check_sigmas(sigmas)
    g = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(latents.device, latents.dtype)
    clean = _decode_u8(tokenizer, latents, batch_size)
    ref = images.cpu()
    curve = RobustnessCurve(
        sigmas=tuple(float(s) for s in sigmas), latent_std=float(latent_std), n_images=int(images.shape[0]),
        psnr_clean=float(psnr_per_image(to_float(clean), to_float(ref)).mean()),
        psnr_vs_decode=[], psnr_vs_image=[],
        distance_name=distance_name if distance is not None else None,
        dist_vs_decode=[] if distance is not None else None,
        dist_vs_image=[] if distance is not None else None,
    )
    if keep:
        curve.examples = {"original": ref[:keep], "reconstruction": clean[:keep]}
    if not (math.isfinite(latent_std) and latent_std > STD_REL * float(latents.abs().max())):
        curve.note = (f"decoder robustness is NaN: the latents do not vary (per-element std {latent_std:.3g}), "
                      "so no σ adds noise")
        nan = [math.nan] * len(curve.sigmas)
        curve.psnr_vs_decode, curve.psnr_vs_image = nan, list(nan)
        if distance is not None:
            curve.dist_vs_decode, curve.dist_vs_image = list(nan), list(nan)
        return curve
    shown = min(curve.sigmas, key=lambda s: abs(math.log(s / 0.5))) if curve.sigmas else None
    for s in curve.sigmas:
        noisy = _decode_u8(tokenizer, latents + (s * latent_std) * eps, batch_size)
        if keep and s == shown:
            curve.examples[f"noise σ={s:g}·std"] = noisy[:keep]
        curve.psnr_vs_decode.append(float(psnr_per_image(to_float(noisy), to_float(clean)).mean()))
        curve.psnr_vs_image.append(float(psnr_per_image(to_float(noisy), to_float(ref)).mean()))
        if distance is not None:  # one call for both comparisons: networks pay per call on small batches
            d = distance(torch.cat([noisy, noisy]), torch.cat([clean, ref])).double()
            curve.dist_vs_decode.append(float(d[: len(ref)].mean()))
            curve.dist_vs_image.append(float(d[len(ref) :].mean()))
    return curve


@dataclass
class InterpolationResult:
    distance_name: str
    steps: int
    step_dist: torch.Tensor  # (P, S) float64: d_k per pair and step (not normalised)
    endpoint_dist: torch.Tensor  # (P,) float64

    @property
    def speed(self) -> torch.Tensor:
        """(P, S) distance per unit t: d_k · S."""
        return self.step_dist * self.steps

    @property
    def step_mean(self) -> float:
        return float(self.speed.mean())

    @property
    def step_relvar(self) -> float:
        v = self.speed
        mean = v.mean(1)
        ok = mean > 0
        if not bool(ok.any()):
            return math.nan
        return float((v[ok].var(1, unbiased=False) / mean[ok] ** 2).mean())

    @property
    def path_ratio(self) -> float:
        ok = self.endpoint_dist > 0
        if not bool(ok.any()):
            return math.nan
        return float((self.step_dist.sum(1)[ok] / self.endpoint_dist[ok]).mean())


def interpolation_pairs(n: int, n_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Disjoint pairs (a, b) of distinct images from a seeded permutation of range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [(perm[2 * i], perm[2 * i + 1]) for i in range(min(n_pairs, n // 2))]


def interpolation_smoothness(
    tokenizer,
    latents: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    steps: int = DEFAULT_INTERP_STEPS,
    distance: Distance = rmse_distance,
    distance_name: str = "rmse",
    batch_size: int = 16,
) -> InterpolationResult:
    """Per-step distances along linear latent interpolations (see module doc)."""
    if not pairs:
        raise ValueError("interpolation needs at least one pair of images")
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=latents.dtype, device=latents.device)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    step_d, end_d = [], []
    for a, b in pairs:
        za, zb = latents[a : a + 1], latents[b : b + 1]
        path = (1 - t).view(shape) * za + t.view(shape) * zb  # (S+1, ...)
        imgs = _decode_u8(tokenizer, path, batch_size)  # (S+1, 3, H, W) uint8
        d = distance(torch.cat([imgs[:-1], imgs[:1]]), torch.cat([imgs[1:], imgs[-1:]])).double().cpu()  # steps, ends
        step_d.append(d[:steps])
        end_d.append(d[steps:])
    return InterpolationResult(distance_name, steps, torch.stack(step_d), torch.cat(end_d))
