"""MS-SSIM (Wang, Simoncelli & Bovik 2003) on 8-bit images, pytorch-msssim's definition.

Five scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); at each scale the SSIM
contrast-structure term cs (scales 1–4) or the full SSIM (scale 5) with the same Gaussian window as
SSIM (11 taps, σ = 1.5, valid region), K1 = 0.01, K2 = 0.03, data range 1; negative terms are set
to 0 before the fractional powers (as pytorch-msssim 1.0 does, which avoids NaN); between scales a
2×2 average pool (zero-padded on odd sides, padding counted). Per channel, then the mean over
channels, then over images. Float64. Needs images larger than 160 px on the short side.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from raebench.metrics.base import MetricSpec, PairedMean, register_metric
from raebench.metrics.pixel import _gaussian_window, ssim_cs_maps


MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ssim, cs), each (N, C): means over the valid region of one scale."""
    ssim, cs = ssim_cs_maps(a, b, g)
    return ssim.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ms_ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N,) float64 MS-SSIM."""
    a, b = a.double(), b.double()
    g = _gaussian_window(1.5).to(a.device)
    need = (g.numel() - 1) * 2 ** (len(MS_WEIGHTS) - 1)
    if min(a.shape[-2:]) <= need:
        raise ValueError(f"MS-SSIM needs images larger than {need} px on the short side, got {tuple(a.shape[-2:])}")
    terms = []
    for i in range(len(MS_WEIGHTS)):
        ssim, cs = _ssim_cs(a, b, g)
        if i < len(MS_WEIGHTS) - 1:
            terms.append(cs.relu())
            pad = [s % 2 for s in a.shape[2:]]
            a, b = F.avg_pool2d(a, 2, padding=pad), F.avg_pool2d(b, 2, padding=pad)
    terms.append(ssim.relu())
    w = torch.tensor(MS_WEIGHTS, dtype=torch.float64, device=a.device).view(-1, 1, 1)
    return torch.prod(torch.stack(terms) ** w, 0).mean(1)  # (levels, N, C) -> (N, C) -> (N,)


register_metric(
    MetricSpec(
        name="ms-ssim", higher_is_better=True, kind="paired", version="msssim-gauss11-1.5-5scale-relu-u8-v1",
        description="MS-SSIM, 5 scales, Gaussian 11/1.5, data range 1 (pytorch-msssim)",
        builder=lambda spec: PairedMean(spec, ms_ssim_per_image), aliases=("msssim",),
        min_image_side=(_gaussian_window().numel() - 1) * 2 ** (len(MS_WEIGHTS) - 1) + 1,  # the window after 4 halvings
    )
)
