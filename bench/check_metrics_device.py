"""Every metric on an accelerator against the same metric on the CPU, with random-weight networks.

    python bench/check_metrics_device.py --device cuda        # exits 1 if a value differs beyond --rtol
    python bench/check_metrics_device.py --device cpu         # a smoke run of this script (CPU vs CPU)

The test suite checks each metric against its reference implementation on the CPU; the metric
networks (Inception for FID/sFID/KID/IS/precision/density, LPIPS' VGG and AlexNet, DINOv2 for
FD-DINOv2, CLIP for CMMD) have never run on a GPU in the tests. This builds random-weight networks
through the same loaders (files and folders given with the RAEBENCH_*_WEIGHTS variables: the
torch-fidelity Inception with kaiming-normal convolutions, torchvision VGG-16/AlexNet state dicts,
small DINOv2 and CLIP folders), runs `raebench eval` once on the CPU and once on ``--device`` over
the same synthetic images (a bicubic-f8 tokenizer: no tokenizer weights), and compares every
value. Metric networks run in float32 with TF32 off on both, so the values should agree to float32
rounding carried through each metric. DreamSim is included when the dreamsim package and its
weights folder are present (``RAEBENCH_DREAMSIM_WEIGHTS``), else left out and said so.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _metrics_helpers import random_inception_weights  # noqa: E402  (the tests' kaiming-normal Inception)

METRICS = ["psnr", "ssim", "ms-ssim", "lpips-vgg", "lpips-alex", "fid", "sfid", "kid", "is", "precision", "density",
           "fd-dinov2", "cmmd"]

#: values that count images (precision/recall, coverage) or neighbours (density): allowed one flip
COUNTS = {"precision", "recall", "density", "coverage"}


def random_torchvision(name: str, path: Path) -> Path:
    import torchvision

    torch.manual_seed(1)
    torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
    return path


def random_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                             patch_size=14, image_size=518)).save_pretrained(folder)
    return folder


def random_clip(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=256, patch_size=14, image_size=336,
                                                   projection_dim=64)).save_pretrained(folder)
    return folder


def images(folder: Path, n: int, size: int) -> Path:
    """Smooth random photographs-to-be (upsampled noise), PNG."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:03d}.png")
    return folder


def run(device: str, data: Path, results: Path, metrics: list[str], resolution: int, batch: int) -> dict[str, float]:
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate

    out = evaluate(EvalConfig(tokenizer="bicubic-f8", data=str(data), metrics=tuple(metrics), resolution=resolution,
                              batch_size=batch, device=device, results_dir=str(results)))
    if out.failed:
        print(f"  {device}: failed metrics {out.failed}")
    return {r.metric: float(r.value) for r in out.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=64, help="synthetic images")
    ap.add_argument("--resolution", type=int, default=192, help="crop size (MS-SSIM's 5 scales need >= 161)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rtol", type=float, default=1e-3, help="largest relative difference allowed")
    ap.add_argument("--atol", type=float, default=1e-6, help="absolute slack for values near 0")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    metrics = list(METRICS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RAEBENCH_CACHE"] = str(tmp / "feature-cache")  # no reference features from earlier runs
        os.environ["RAEBENCH_INCEPTION_WEIGHTS"] = str(random_inception_weights(tmp / "inception.pt"))
        os.environ["RAEBENCH_LPIPS_VGG_WEIGHTS"] = str(random_torchvision("vgg16", tmp / "vgg16.pth"))
        os.environ["RAEBENCH_LPIPS_ALEX_WEIGHTS"] = str(random_torchvision("alexnet", tmp / "alexnet.pth"))
        os.environ["RAEBENCH_DINOV2_L14_WEIGHTS"] = str(random_dinov2(tmp / "dinov2"))
        os.environ["RAEBENCH_CLIP_L14_336_WEIGHTS"] = str(random_clip(tmp / "clip"))
        import importlib.util

        if os.environ.get("RAEBENCH_DREAMSIM_WEIGHTS") and importlib.util.find_spec("dreamsim"):
            metrics.append("dreamsim")
        else:
            print("dreamsim left out (the dreamsim package or RAEBENCH_DREAMSIM_WEIGHTS is missing)")
        data = images(tmp / "images", args.n, args.resolution)
        print(f"{args.n} synthetic images at {args.resolution} px, bicubic-f8, batch {args.batch}; random-weight "
              f"metric networks; cpu vs {args.device}")
        ref = run("cpu", data, tmp / "res-cpu", metrics, args.resolution, args.batch)
        os.environ["RAEBENCH_CACHE"] = str(tmp / "feature-cache-2")
        dev = run(args.device, data, tmp / "res-dev", metrics, args.resolution, args.batch)
    bad = []
    print(f"{'metric':14s} {'cpu':>16s} {args.device:>16s} {'rel. diff':>10s}")
    for k in sorted(set(ref) | set(dev)):
        a, b = ref.get(k, math.nan), dev.get(k, math.nan)
        rel = abs(a - b) / max(abs(a), 1e-300) if a != b else 0.0
        # k-NN counts: a feature moved by float32 rounding may cross one neighbourhood boundary
        flips = 1 / (args.n * (5 if k == "density" else 1)) if k in COUNTS else 0.0
        ok = math.isfinite(a) == math.isfinite(b) and (a == b or abs(a - b) <= args.atol + args.rtol * abs(a) + flips)
        print(f"{k:14s} {a:16.8g} {b:16.8g} {rel:10.1e} {'ok' if ok else 'DIFFERS'}")
        if not ok:
            bad.append(k)
    missing = [m for m in metrics if not any(k == m or k.startswith(m + "-") for k in dev)]
    if missing:
        print(f"no value on {args.device} for {missing}")
    print("all metrics agree" if not bad and not missing else f"FAILED: {bad + missing}")
    sys.exit(1 if bad or missing else 0)


if __name__ == "__main__":
    main()
