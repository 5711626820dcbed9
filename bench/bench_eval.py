"""Evaluation overhead and memory: the full metric pass vs the bare tokenizer forward.

    python bench/bench_eval.py --tokenizer bicubic-f8 --metrics psnr,ssim --n 64 [--device cuda]
    python bench/bench_eval.py --tokenizer random-rae-small-B --metrics psnr,ssim,lpips-alex --n 16
    python bench/bench_eval.py --memory --n 64          # peak RSS at N and 4N images (streaming check)

Overhead: time of ``raebench.evaluate`` (data loading, tokenizer, quantisation, every metric,
result writing) divided by the time of encode+decode alone on the same images already in memory.
Memory: peak resident memory of a fresh process evaluating N and then 4N images; a streaming
pipeline keeps them equal within noise (only metrics that must keep per-image features grow, by
their feature size x N).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _images(n: int, res: int) -> str:
    """A folder of n copies of the embedded photographs (distinct files)."""
    import shutil

    from raebench.data import resolve_data

    src = resolve_data().images.paths
    d = tempfile.mkdtemp(prefix="raebench-bench-")
    for i in range(n):
        p = src[i % len(src)]
        shutil.copy(p, f"{d}/{i:06d}{p[p.rfind('.'):]}")
    return d


def random_rae(encoder: str = "small", decoder: str = "B"):
    """An RAE with random weights built through the real classes: DINOv2-with-registers
    (``small``/``base`` sizes) + a ViT decoder preset. For timing only: no download needed."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from raebench.rae.decoder import build_decoder, preset_config
    from raebench.rae.encoders import wrap_hf_model
    from raebench.rae.tokenizer import RAETokenizer

    width, depth, heads = {"small": (384, 12, 6), "base": (768, 12, 12)}[encoder]
    cfg = Dinov2WithRegistersConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                    intermediate_size=4 * width, patch_size=14, image_size=518, num_register_tokens=4)
    enc = wrap_hf_model(Dinov2WithRegistersModel(cfg).eval(), "dinov2_with_registers", input_size=224,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    dec = build_decoder(preset_config(decoder, latent_dim=width))
    tok = RAETokenizer(enc, dec).eval()
    tok.name = f"random-rae-dinov2-{encoder}-dec{decoder}"
    return tok


def overhead(args) -> None:
    from raebench.folders import scan_folder
    from raebench.images import to_float
    from raebench.loaders import ImageDataset, make_loader
    from raebench.eval_config import EvalConfig, build_tokenizer_from_config, resolve_device
    from raebench.evaluate import evaluate

    folder = _images(args.n, args.resolution)
    cfg = EvalConfig(tokenizer=args.tokenizer, metrics=tuple(args.metrics.split(",")), data=folder,
                     resolution=args.resolution, batch_size=args.batch_size, device=args.device,
                     results_dir=tempfile.mkdtemp(), num_workers=args.workers)
    dev = resolve_device(args.device)
    if args.tokenizer.startswith("random-rae"):
        _, _, enc, dec = args.tokenizer.split("-")  # random-rae-small-B
        tok = random_rae(enc, dec).to(dev)
        cfg = EvalConfig(**{**cfg.__dict__, "tokenizer": "pixels"})
    else:
        tok = build_tokenizer_from_config(cfg, dev)
    batches = [b["image"].to(dev) for b in make_loader(ImageDataset(scan_folder(folder), args.resolution), args.batch_size)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():  # warm-up
        tok.decode(tok.encode(to_float(batches[0])))
    evaluate(cfg, tokenizer=tok)  # warm-up: builds extractors, caches
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            tok.decode(tok.encode(to_float(b)))
    sync()
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(cfg, tokenizer=tok)
    sync()
    full = time.perf_counter() - t0
    print(f"{args.tokenizer} · {args.n} images @ {args.resolution} · metrics {args.metrics} · {dev}")
    print(f"bare encode+decode : {bare:8.2f} s  ({args.n / bare:7.1f} img/s)")
    print(f"full evaluation    : {full:8.2f} s  ({args.n / full:7.1f} img/s)")
    print(f"overhead           : {100 * (full / bare - 1):+.1f} %  (target <= 15 %)")


def _child(args_json: str) -> None:
    from raebench.eval_config import EvalConfig
    from raebench.evaluate import evaluate

    a = json.loads(args_json)
    evaluate(EvalConfig(**a))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory(args) -> None:
    out = {}
    for n in (args.n, 4 * args.n):
        folder = _images(n, args.resolution)
        a = dict(tokenizer=args.tokenizer, metrics=args.metrics.split(","), data=folder, resolution=args.resolution,
                 batch_size=args.batch_size, device=args.device, results_dir=tempfile.mkdtemp(), num_workers=0)
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(a)], capture_output=True, text=True, check=True)
        out[n] = int(r.stdout.strip().splitlines()[-1]) / 1024
        print(f"N={n:6d}: peak RSS {out[n]:8.1f} MiB")
    print(f"ratio 4N/N: {out[4 * args.n] / out[args.n]:.3f} (streaming target: 1.00 within noise)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2])
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="bicubic-f8")
    ap.add_argument("--metrics", default="psnr,ssim")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    memory(args) if args.memory else overhead(args)
