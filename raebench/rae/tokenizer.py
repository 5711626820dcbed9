"""RAETokenizer: frozen encoder + latent statistics + ViT decoder behind the tokenizer contract.

``encode``: [0, 1] images -> encoder features (C, h, w) -> [noise, training only] -> (z - mean) /
sqrt(var + eps). ``decode``: the inverse normalisation -> decoder -> un-normalise with the
encoder's mean/std -> images (unclamped). This is the official RAE's ``encode``/``decode``
(arXiv:2510.11690), and :mod:`raebench.official` loads its YAML configs into this class.

Noise augmentation (the decoder's robustness trick): z + sigma * eps with eps ~ N(0, I) and, per
sample, sigma ~ tau * U[0, 1) (the official code's rule) or sigma = tau * |N(0, 1)| (the paper's
half-normal rule). It is added to the raw features, before the statistics, and only when asked:
``encode(x, noise_tau=...)`` explicitly, or in training mode with the tokenizer's own ``noise_tau``
(the official ``noise_tau`` config entry). Inference never adds noise.
"""

from __future__ import annotations

import logging

import torch

from raebench.errors import CheckpointError
from raebench.rae.decoder import RAEDecoder
from raebench.rae.encoders import RepresentationEncoder
from raebench.rae.stats import LatentStats
from raebench.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

NOISE_RULES = ("uniform", "half-normal")


def add_noise(
    z: torch.Tensor, tau: float, rule: str = "uniform", generator: torch.Generator | None = None
) -> torch.Tensor:
    """z + sigma * eps with one sigma per sample (see the module docstring for the rules)."""
    if tau <= 0:
        return z
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    if rule == "uniform":
        sigma = tau * torch.rand(shape, device=z.device, dtype=z.dtype, generator=generator)
    elif rule == "half-normal":
        sigma = tau * torch.randn(shape, device=z.device, dtype=z.dtype, generator=generator).abs()
    else:
        raise ValueError(f"unknown noise rule {rule!r}; use one of {NOISE_RULES}")
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return z + sigma * eps


class RAETokenizer(Tokenizer):
    """A Representation Autoencoder. Latents are (C, h, w) with h = w = encoder input / encoder patch."""

    def __init__(
        self,
        encoder: RepresentationEncoder,
        decoder: RAEDecoder,
        stats: LatentStats | None = None,
        *,
        noise_tau: float = 0.0,
        noise_rule: str = "uniform",
        weights_id: str = "random",
    ) -> None:
        super().__init__()
        if decoder.config.latent_dim != encoder.hidden_size:
            raise CheckpointError(
                f"The decoder expects {decoder.config.latent_dim}-channel latents but the encoder gives {encoder.hidden_size}."
            )
        g = encoder.grid_size
        if stats is not None and stats.shape != (encoder.hidden_size, g, g):
            raise CheckpointError(
                f"The latent statistics have shape {stats.shape} but the encoder gives {(encoder.hidden_size, g, g)} "
                f"at input size {encoder.input_size}; use the statistics computed for this encoder and resolution."
            )
        if g != decoder.config.grid_size:
            d = decoder.config.grid_size
            log.info("the decoder resamples %dx%d latent tokens to its %dx%d grid", g, g, d, d)
        if noise_rule not in NOISE_RULES:
            raise ValueError(f"unknown noise rule {noise_rule!r}; use one of {NOISE_RULES}")
        self.encoder = encoder
        self.decoder = decoder
        self.stats = stats
        self.noise_tau = float(noise_tau)
        self.noise_rule = noise_rule
        self.weights_id = weights_id

    # -- shapes ------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """Side of the decoded images."""
        return self.decoder.config.image_size

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        g = self.encoder.grid_size  # the encoder resizes every input to its own input size
        return (self.encoder.hidden_size, g, g)

    def train(self, mode: bool = True) -> "RAETokenizer":
        super().train(mode)
        self.encoder.train(mode)  # keeps its backbone in eval mode
        return self

    # -- the contract ------------------------------------------------------------------------

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> raw encoder features (N, C, h, w): no noise, no statistics."""
        return self.encoder(x)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.stats is None else self.stats.normalize(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.stats is None else self.stats.denormalize(z)

    def encode(
        self,
        x: torch.Tensor,
        *,
        noise_tau: float | None = None,
        noise_rule: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> normalised latents (N, C, h, w).

        ``noise_tau`` None means: the tokenizer's ``noise_tau`` in training mode, no noise in eval mode.
        """
        z = self.encode_features(x)
        tau = (self.noise_tau if self.training else 0.0) if noise_tau is None else float(noise_tau)
        if tau > 0:
            z = add_noise(z, tau, noise_rule or self.noise_rule, generator)
        return self.normalize(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, C, h, w) -> (N, 3, S, S) images, nominally [0, 1], unclamped."""
        x = self.decoder(self.denormalize(z))  # encoder-normalised pixel space
        return x * self.encoder.std.to(x.dtype) + self.encoder.mean.to(x.dtype)

    def extra_repr(self) -> str:
        return f"weights_id={self.weights_id!r}, noise_tau={self.noise_tau}, noise_rule={self.noise_rule!r}"
