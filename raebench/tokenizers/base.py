"""The tokenizer contract and its registry spec.

Contract (stated once, here): ``encode(x)`` takes float32 NCHW images in [0, 1] and returns the
tokenizer's *normalised* latents (the ones a diffusion model sees: RAE's statistics-normalised
features, a VAE's scaled/shifted posterior mode). ``decode(z)`` returns float32 NCHW images that
are nominally in [0, 1] but are not clamped; the evaluation pipeline clamps and quantises. A
tokenizer owns its latent statistics and scale: no scale constant lives outside its file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from raebench.registry import Registry
from raebench.weights import WeightsSource


class Tokenizer(nn.Module, abc.ABC):
    """An image tokenizer: [0, 1] images <-> latents. Subclasses implement encode/decode."""

    #: registry name (``rae-dinov2-b``) and an identifier of the weights actually loaded
    name: str = "tokenizer"
    weights_id: str = "none"

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float32 in [0, 1] -> latents (N, ...)."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (N, ...) -> (N, 3, H, W) float32, nominally [0, 1], unclamped."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one image's latent at ``resolution`` (computed by a dry encode by default)."""
        p = next(iter(self.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            return tuple(self.encode(torch.zeros(1, 3, resolution, resolution, device=dev)).shape[1:])

    @property
    def device(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        if p is None:
            b = next(iter(self.buffers()), None)
            return b.device if b is not None else torch.device("cpu")
        return p.device


@dataclass(frozen=True)
class TokenizerSpec:
    """Registry metadata for a tokenizer; nothing here loads weights.

    ``builder`` is called by :meth:`build` with explicit keyword options (unknown options are a
    TypeError, never silently ignored) and returns a :class:`Tokenizer`.
    """

    name: str
    family: str  # "rae", "vae", "reference"
    description: str
    latent_shape_fn: Callable[[int], tuple[int, ...]]
    builder: Callable[..., Tokenizer]
    #: resolutions the weights were trained at (an RAE decoder: the one it expects) or that their authors
    #: publish numbers or models at; shown by ``ls``. Convolutional tokenizers (VAEs, the reference ones) run
    #: at any size their factor divides.
    native_resolutions: tuple[int, ...] = (256,)
    params: int | None = None  # parameter count of what the tokenizer runs (encoder + decoder)
    weights: tuple[WeightsSource, ...] = ()
    aliases: tuple[str, ...] = ()
    citation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def latent_shape(self, resolution: int = 256) -> tuple[int, ...]:
        return self.latent_shape_fn(resolution)

    def latent_dims(self, resolution: int = 256) -> int:
        n = 1
        for s in self.latent_shape(resolution):
            n *= s
        return n

    def build(self, **options: Any) -> Tokenizer:
        tok = self.builder(**options)
        tok.name = self.name
        return tok.eval()


TOKENIZERS: Registry[TokenizerSpec] = Registry("tokenizer")


def register_tokenizer(spec: TokenizerSpec) -> TokenizerSpec:
    return TOKENIZERS.register(spec.name, spec, aliases=spec.aliases)


def get_tokenizer_spec(name: str) -> TokenizerSpec:
    import raebench.tokenizers  # noqa: F401  (populates the registry)

    return TOKENIZERS.get(name)


def build_tokenizer(name: str, **options: Any) -> Tokenizer:
    """Build a registered tokenizer by name (aliases allowed) with explicit options."""
    return get_tokenizer_spec(name).build(**options)
