"""One-pass metrics vs the reference tools called separately, and our Fréchet distance vs sqrtm.

    python bench/bench_metrics.py --n 32 --resolution 64            # random weights (offline)
    python bench/bench_metrics.py --n 1000 --resolution 256 --inception-weights W --lpips-weights V

Part 1, on the same PNG folders (originals and their bicubic-f8 reconstructions, read from disk by
every pipeline): raebench's one pass (``raebench score``: FID, KID, IS, PSNR, SSIM, LPIPS; each
image decoded once, Inception run once per image) against torch-fidelity (FID, KID, IS in one
call) + scikit-image (PSNR, SSIM per image pair) + the lpips package (per pair). Model construction
is included on both sides; the values are printed side by side. Target: >= 1.5x.

Part 2: the Fréchet distance of two full-rank 2048-d Gaussians, ours (Cholesky factor + symmetric
eigenvalues) against scipy's ``sqrtm`` of the product (pytorch-fid / ADM). Target: >= 10x.

Without ``--inception-weights`` / ``--lpips-weights`` the networks get random weights (kaiming
convolutions for Inception), saved to a temporary folder and given to both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_folders(n: int, res: int, root: Path) -> tuple[Path, Path]:
    """n photo crops and their bicubic-f8 reconstructions, as PNG folders with matching names."""
    from _metrics_helpers import photo_crops, save_pngs

    from raebench.images import to_float, to_uint8
    from raebench.tokenizers.reference import BicubicTokenizer

    ref = photo_crops(n, res, seed=0)
    rec = to_uint8(BicubicTokenizer(8).reconstruct(to_float(ref)))
    return save_pngs(ref, root / "ref"), save_pngs(rec, root / "rec")


def random_weights(root: Path, net: str) -> tuple[Path, Path]:
    import torchvision
    from _metrics_helpers import random_inception_weights

    inc = random_inception_weights(root / "inception.pth")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    name = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
    torch.save(model.state_dict(), hub / name)
    return inc, hub / name


def ours(ref: Path, rec: Path, n: int, net: str, batch_size: int) -> tuple[float, dict]:
    from raebench.metrics.scoring import score

    os.environ["RAEBENCH_CACHE"] = tempfile.mkdtemp()  # a cold cache: reference features are extracted too
    t0 = time.perf_counter()
    out = score(str(ref), str(rec), ("fid", "kid", "is", "psnr", "ssim", f"lpips-{net}"), device="cpu",
                batch_size=batch_size, write=False)
    return time.perf_counter() - t0, {r.metric: r.value for r in out.rows}


def separately(ref: Path, rec: Path, n: int, net: str, inception: Path, batch_size: int) -> tuple[float, dict]:
    import lpips
    import torch_fidelity
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    t0 = time.perf_counter()
    tf = torch_fidelity.calculate_metrics(
        input1=str(rec), input2=str(ref), cuda=False, fid=True, kid=True, isc=True, batch_size=batch_size,
        kid_subset_size=min(n, 1000), feature_extractor_weights_path=str(inception), cache=False, verbose=False)
    files = sorted(os.listdir(ref))
    psnr, ssim = [], []
    for f in files:
        a = np.asarray(Image.open(ref / f).convert("RGB")) / 255.0
        b = np.asarray(Image.open(rec / f).convert("RGB")) / 255.0
        psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
        ssim.append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0, channel_axis=2))
    model = lpips.LPIPS(net=net, verbose=False)

    def load(path):  # lpips.load_image needs OpenCV; the same array through PIL
        return lpips.im2tensor(np.asarray(Image.open(path).convert("RGB")))

    with torch.no_grad():
        lp = [model(load(ref / f), load(rec / f)).item() for f in files]
    seconds = time.perf_counter() - t0
    return seconds, {"fid": tf["frechet_inception_distance"], "kid": tf["kernel_inception_distance_mean"],
                     "is": tf["inception_score_mean"], "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
                     f"lpips-{net}": float(np.mean(lp))}


def frechet_bench(d: int = 2048, repeats: int = 3) -> None:
    import scipy.linalg
    from raebench.metrics.frechet import frechet_distance

    rng = np.random.default_rng(0)
    a1, a2 = rng.standard_normal((d, d + 64)) / d, rng.standard_normal((d, d + 64)) / d
    s1 = a1 @ a1.T
    s2 = a2 @ a2.T + 0.1 * s1
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1

    def reference():
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        covmean = covmean.real if np.iscomplexobj(covmean) else covmean
        return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    frechet_distance(mu1[:64], s1[:64, :64], mu2[:64], s2[:64, :64])  # warm-up: library initialisation
    t_ours, t_ref = [], []
    for _ in range(repeats):
        time.sleep(1)  # let the other library's BLAS threads stop spinning before timing
        t0 = time.perf_counter()
        v_ours = frechet_distance(mu1, s1, mu2, s2)
        t_ours.append(time.perf_counter() - t0)
        time.sleep(1)
        t0 = time.perf_counter()
        v_ref = reference()
        t_ref.append(time.perf_counter() - t0)
    o, r = float(np.median(t_ours)), float(np.median(t_ref))
    print(f"\nFréchet distance, d = {d}, full rank (median of {repeats})")
    print(f"  ours (Cholesky + eigvalsh) : {o:7.3f} s   value {v_ours:.10g}   (all: {', '.join(f'{t:.2f}' for t in t_ours)})")
    print(f"  scipy sqrtm                : {r:7.3f} s   value {v_ref:.10g}   (rel. diff {abs(v_ours - v_ref) / v_ref:.1e}; "
          f"all: {', '.join(f'{t:.1f}' for t in t_ref)})")
    print(f"  speed-up                   : {r / o:7.1f}x  (target >= 10x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lpips", default="alex", choices=("alex", "vgg"))
    ap.add_argument("--inception-weights", default=None)
    ap.add_argument("--lpips-weights", default=None, help="torchvision backbone file for --lpips")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-pass", action="store_true", help="only the Fréchet part")
    args = ap.parse_args()
    if args.n < 10:
        ap.error("--n must be at least 10: the Inception Score in the one-pass part needs 10 candidates")
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, torch.get_num_threads())))
    root = Path(tempfile.mkdtemp(prefix="raebench-bench-metrics-"))
    if not args.skip_pass:
        inc, backbone = (Path(args.inception_weights), Path(args.lpips_weights)) if args.inception_weights else \
            random_weights(root, args.lpips)
        # both sides: Inception from the same file; the LPIPS backbone where torchvision (inside lpips) looks
        os.environ["RAEBENCH_INCEPTION_WEIGHTS"] = str(inc)
        os.environ[f"RAEBENCH_LPIPS_{args.lpips.upper()}_WEIGHTS"] = str(backbone)
        os.environ["TORCH_HOME"] = str(backbone.parent.parent.parent)
        ref, rec = make_folders(args.n, args.resolution, root)
        t_one, t_sep = [], []
        for r in range(args.repeats):  # alternate the order: a shared machine drifts
            for which in (("ours", "sep") if r % 2 == 0 else ("sep", "ours")):
                time.sleep(1)  # idle BLAS/OpenMP threads of the previous run stop spinning
                if which == "ours":
                    t, v_one = ours(ref, rec, args.n, args.lpips, args.batch_size)
                    t_one.append(t)
                else:
                    t, v_sep = separately(ref, rec, args.n, args.lpips, inc, args.batch_size)
                    t_sep.append(t)
        o, s = float(np.median(t_one)), float(np.median(t_sep))
        print(f"{args.n} image pairs @ {args.resolution} px, CPU x{torch.get_num_threads()} threads, "
              f"{'random' if not args.inception_weights else 'given'} weights, median of {args.repeats}")
        print(f"{'metric':12s} {'raebench':>14s} {'separately':>14s}")
        for k in v_sep:
            print(f"{k:12s} {v_one[k]:14.6g} {v_sep[k]:14.6g}")
        print(f"time: raebench one pass {o:7.2f} s · torch-fidelity + skimage + lpips {s:7.2f} s · "
              f"speed-up {s / o:.2f}x (target >= 1.5x)")
        print(f"      all runs: ours {', '.join(f'{t:.1f}' for t in t_one)} · separately {', '.join(f'{t:.1f}' for t in t_sep)}")
    frechet_bench(repeats=args.repeats)


if __name__ == "__main__":
    main()
