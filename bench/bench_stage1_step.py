"""Stage 1 (decoder) training-step time through `raebench train stage1`, with random weights.

    python bench/bench_stage1_step.py --device cuda --precision bf16 --batch 64 --steps 12   # the recipe, on a GPU
    python bench/bench_stage1_step.py --tiny --steps 6                                       # a smoke run on a CPU

Builds a random DINOv2-B-with-registers encoder folder (the recipe's encoder shape; ``--tiny``: a
32-px toy), writes synthetic images at the preset's resolution, runs the command line with every
loss on from step 1 (L1 + LPIPS + GAN with the adaptive weight, and the discriminator update; LPIPS
and discriminator backbones random, so nothing is downloaded), and reads each step's
``sec_per_step`` from the run's log.csv. The first ``--warmup`` steps (allocator, cuDNN/cuBLAS
autotuning) are left out of the median. No official comparison: the official stage-1 trainer needs
its LPIPS and DINO weights and a different data pipeline; this is raebench's own figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_encoder(folder: Path, tiny: bool) -> None:
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    shape = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8,
                  image_size=32) if tiny else
             # facebook/dinov2-with-registers-base
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  patch_size=14, image_size=518))
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **shape)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class_{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth random images (upsampled noise) compress like photos, unlike white noise
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(d / f"{i}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="stage-1 preset (default dinov2-b-decxl; --tiny: tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset and encoder (a CPU smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 64; --tiny 4)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default 4 batches)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default min(8, cores); --tiny 0)")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    preset = args.preset or ("tiny" if args.tiny else "dinov2-b-decxl")
    batch = args.batch or (4 if args.tiny else 64)
    workers = args.workers if args.workers is not None else (0 if args.tiny else min(8, os.cpu_count() or 1))
    from raebench.stage1.config import PRESETS

    cfg = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_encoder(tmp / "encoder", args.tiny)
        make_images(tmp / "images", args.images or 4 * batch, cfg.resolution)
        sets = dict(global_batch=batch, grad_accum=1, lpips_weights="random", disc_weights="random",
                    lpips_start_epoch=0, disc_start_epoch=0, gan_start_epoch=0, sample_every=0, val_every=0,
                    log_every=1, num_workers=workers)
        cmd = [sys.executable, "-m", "raebench", "train", "stage1", "-p", preset, "--data", str(tmp / "images"),
               "--encoder", str(tmp / "encoder"), "--results", str(tmp / "res"), "--name", "bench",
               "--device", args.device, "--precision", args.precision, "--max-steps", str(args.steps)]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows = list(csv.DictReader(open(tmp / "res" / "stage1" / "bench" / "log.csv")))
    rows = [r for r in rows if r.get("sec_per_step")]
    if len(rows) != args.steps or any(r["gan"] == "" or r["disc_loss"] == "" for r in rows):
        sys.exit(f"expected {args.steps} steps with the GAN and discriminator on, got {len(rows)}: {rows[-1:]}")
    secs = [float(r["sec_per_step"]) for r in rows[args.warmup:]]
    med = statistics.median(secs)
    print(f"stage 1 {preset}, {args.precision}, global batch {batch}, on {args.device}: median step "
          f"{med * 1e3:.1f} ms (min {min(secs) * 1e3:.1f}, max {max(secs) * 1e3:.1f}, steps {args.warmup + 1}-"
          f"{args.steps}), {batch / med:.1f} images/s; last l1 {float(rows[-1]['l1']):.4f}, "
          f"gan {float(rows[-1]['gan']):.4f}, disc {float(rows[-1]['disc_loss']):.4f}")


if __name__ == "__main__":
    main()
