"""Weightless reference tokenizers: real baselines that need no download.

``pixels`` is the identity (the pixel-space reference and a test fixture). ``bicubic-f8`` and
``bicubic-f16`` box-downsample to a latent grid of side H/f and upsample bicubically; at 256 px,
bicubic-f8 keeps 3x32x32 = 3,072 numbers, close to SD-VAE's 4x32x32 = 4,096, so it is the
"how much does a learned tokenizer beat plain resampling" floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raebench.errors import RaebenchError
from raebench.tokenizers.base import Tokenizer, TokenizerSpec, register_tokenizer


class PixelTokenizer(Tokenizer):
    weights_id = "none"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0  # latents centred like the others: [-1, 1]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z + 1.0) / 2.0


class BicubicTokenizer(Tokenizer):
    weights_id = "none"

    def __init__(self, factor: int, resolution: int | None = None) -> None:
        super().__init__()
        self.factor = factor
        if resolution is not None and resolution % factor:
            lo, hi = resolution // factor * factor, -(-resolution // factor) * factor
            tries = f"{lo} or {hi}" if lo else f"{hi}"  # below the factor: only the factor itself
            raise RaebenchError(f"bicubic-f{factor} needs a resolution divisible by {factor}; --resolution {resolution} "
                                f"is not (try {tries}).")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the factor {self.factor}")
        z = F.avg_pool2d(x, self.factor)  # box filter: exact mean of each f x f cell
        return z * 2.0 - 1.0  # (N, 3, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = (z + 1.0) / 2.0
        return F.interpolate(x, scale_factor=self.factor, mode="bicubic", align_corners=False)


register_tokenizer(
    TokenizerSpec(
        name="pixels",
        family="reference",
        description="Identity in pixel space (the reference and a test fixture).",
        latent_shape_fn=lambda r: (3, r, r),
        builder=lambda: PixelTokenizer(),
        native_resolutions=(256, 512),
        params=0,
    )
)
for _f in (8, 16):
    register_tokenizer(
        TokenizerSpec(
            name=f"bicubic-f{_f}",
            family="reference",
            description=f"Box downsample by {_f}, bicubic upsample: a weightless {3}x(H/{_f})x(W/{_f}) latent.",
            latent_shape_fn=lambda r, f=_f: (3, r // f, r // f),
            builder=lambda resolution=None, f=_f: BicubicTokenizer(f, resolution),
            native_resolutions=(256, 512),
            params=0,
        )
    )
