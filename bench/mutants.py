"""Mutation testing by hand: can the tests see a silently wrong number?

Each mutant is one deliberate, plausible bug (a wrong data range, a missing centring, an off-by-one
neighbour, a flipped time convention, a key column left out ...). The script applies one mutant at a
time to this checkout, runs only the tests named for it (with a timeout), restores the file's exact
bytes (also on Ctrl-C) and records "killed" (some selected test failed) or "survived" (all passed).
A surviving mutant is a test gap, or an equivalent mutant (same numbers by construction).

    python bench/mutants.py                 # all mutants
    python bench/mutants.py --only psnr     # mutants whose name contains "psnr"
    python bench/mutants.py --list          # names only

Tests that already fail without any mutant make the verdict meaningless, so the selections name
tests that pass on a clean checkout; ``--baseline`` runs every selection unmutated first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PIX = "tests/test_pixel_metrics.py"
FRE = "tests/test_metrics_frechet.py"
DIS = "tests/test_metrics_distribution.py"
PER = "tests/test_metrics_perceptual.py"
DATA = "tests/test_data.py"
STATS = "tests/test_rae_stats.py"
TOK = "tests/test_rae_tokenizer.py"
DEC = "tests/test_rae_decoder.py"
ORA = "tests/test_rae_oracle.py"
TRA = "tests/test_stage2_transport.py"
SAM = "tests/test_stage2_samplers.py"
ALI = "tests/test_analysis_alignment.py"
RES = "tests/test_results.py"

PSNR_SSIM = [f"{PIX}::test_psnr_ssim_equal_skimage", f"{PIX}::test_metric_classes_mean_over_images_and_batch_independence",
             f"{PIX}::test_psnr_identical_is_capped_not_infinite", f"{PIX}::test_ssim_rejects_too_small_images"]
MSSSIM = [PER, "-k", "ms_ssim"]
FID = [FRE, "-k", "not d2048 and not device"]
KIDT = [DIS, "-k", "kid"]
IST = [DIS, "-k", "inception_score"]
PRT = [DIS, "-k", "precision_recall or neighbourhood"]
DCT = [DIS, "-k", "density_coverage or neighbourhood"]
CMMDT = [DIS, "-k", "cmmd"]
LPIPST = [PER, "-k", "lpips_alex or lpips_vgg"]
DST = [PER, "-k", "dreamsim_equals or dreamsim_ensemble"]
U8 = [DATA, "-k", "to_uint8"]
ADM = [DATA, "-k", "adm_crop"]
STATST = [STATS, ORA]
TOKT = [f"{TOK}::test_noise_rules", f"{TOK}::test_noise_only_when_asked",
        f"{TOK}::test_training_noise_is_added_to_the_raw_features_before_the_statistics", ORA]
DECT = [DEC, ORA]
TRANS = [TRA, SAM, "-k", "not adaptive"]
SAMP = [SAM]
ALIT = [ALI]
REST = [RES, "-k", "key_column or latest_row or metric_networks"]

KEY_TEXT = (
    'KEY_COLUMNS = (\n    "tokenizer", "weights_id", "precision", "dataset", "split", "resolution", "n_images", "seed", "metric",\n'
    '    "metric_version", "data_fingerprint", "candidates_fingerprint", "metric_networks",\n)'
)

#: (name, file, [(old, new), ...], pytest arguments); every ``old`` must occur exactly once in the file.
#: A "-k" expression filters every path given in the same arguments: combine files with node ids only.
MUTANTS: list[tuple[str, str, list[tuple[str, str]], list[str]]] = [
    # --- PSNR / SSIM / MS-SSIM
    ("psnr-data-range-255", "metrics/pixel.py", [("torch.log10(1.0 / mse", "torch.log10(255.0**2 / mse")], PSNR_SSIM),
    ("psnr-pooled-mse", "metrics/pixel.py",
     [("mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)",
       "mse = (a.double() - b.double()).pow(2).mean().expand(a.shape[0])")], PSNR_SSIM),
    ("psnr-no-cap", "metrics/pixel.py", [("return out.clamp(max=PSNR_CAP_DB)", "return out")], PSNR_SSIM),
    ("psnr-mean-over-channels-only", "metrics/pixel.py",
     [("pow(2).flatten(1).mean(1)", "pow(2)[:, 0].flatten(1).mean(1)")],
     PSNR_SSIM),
    ("ssim-window-truncate-4", "metrics/pixel.py", [("truncate: float = 3.5", "truncate: float = 4.0")], PSNR_SSIM),
    ("ssim-sigma-default-1.0", "metrics/pixel.py",
     [("def _gaussian_window(sigma: float = 1.5", "def _gaussian_window(sigma: float = 1.0")], PSNR_SSIM),
    ("ssim-K1-0.02", "metrics/pixel.py", [("c1 = (0.01 * data_range)", "c1 = (0.02 * data_range)")], PSNR_SSIM),
    ("ssim-K2-0.01", "metrics/pixel.py", [("c2 = (0.03 * data_range)", "c2 = (0.01 * data_range)")], PSNR_SSIM),
    ("ssim-uncentred-covariance", "metrics/pixel.py", [("2 * (e_ab - mu_a * mu_b) + c2", "2 * e_ab + c2")], PSNR_SSIM),
    ("ssim-skimage-sample-covariance", "metrics/pixel.py",
     [("use_sample_covariance=False,\n", "use_sample_covariance=True,\n")], PSNR_SSIM),
    ("ssim-skimage-data-range-255", "metrics/pixel.py",
     [("data_range=data_range, channel_axis=0)", "data_range=255.0, channel_axis=0)")], PSNR_SSIM),
    ("msssim-weights-swapped", "metrics/msssim.py",
     [("MS_WEIGHTS = (0.0448, 0.2856, 0.3001,", "MS_WEIGHTS = (0.0448, 0.3001, 0.2856,")], MSSSIM),
    ("msssim-last-scale-cs", "metrics/msssim.py", [("terms.append(ssim.relu())", "terms.append(cs.relu())")], MSSSIM),
    ("msssim-abs-not-relu", "metrics/msssim.py", [("terms.append(cs.relu())", "terms.append(cs.abs())")], MSSSIM),
    ("msssim-maxpool", "metrics/msssim.py",
     [("F.avg_pool2d(a, 2, padding=pad), F.avg_pool2d(b, 2, padding=pad)",
       "F.max_pool2d(a, 2, padding=pad), F.max_pool2d(b, 2, padding=pad)")], MSSSIM),
    # --- Fréchet distance
    ("fid-trace-term-once", "metrics/frechet.py", [("- 2.0 * tr\n", "- tr\n")], FID),
    ("fid-sqrt-of-sum", "metrics/frechet.py", [("lam.sqrt().sum()", "lam.sum().sqrt()")], FID),
    ("fid-cov-ddof0", "metrics/frechet.py", [("/ (self.n - 1)", "/ self.n")], FID),
    ("fid-factor-ddof0", "metrics/frechet.py", [("/ math.sqrt(n - 1)", "/ math.sqrt(n)")], FID),
    ("fid-mean-term-l1", "metrics/frechet.py", [("float(diff @ diff)", "float(diff.abs().sum())")], FID),
    ("fid-merge-drops-shift-square", "metrics/frechet.py",
     [(" + n * torch.outer(delta, delta)", "")], FID),
    ("fid-householder-wrong-rows", "metrics/frechet.py", [("return hx[1:].T", "return hx[:-1].T")], FID),
    # --- KID / CMMD / IS / precision-recall / density-coverage
    ("kid-degree-2", "metrics/kernel.py", [("kid_kernel_poly_degree=3", "kid_kernel_poly_degree=2")], KIDT),
    ("kid-coef0-0", "metrics/kernel.py", [("kid_kernel_poly_coef0=1", "kid_kernel_poly_coef0=0")], KIDT),
    ("kid-seed", "metrics/kernel.py", [("rng_seed=seed, verbose", "rng_seed=seed + 1, verbose")], KIDT),
    ("kid-subset-size-minus-1", "metrics/kernel.py",
     [("m = min(KID_SUBSET_SIZE, ref.shape[0], cand.shape[0])", "m = min(KID_SUBSET_SIZE, ref.shape[0], cand.shape[0]) - 1")], KIDT),
    ("kid-sides-swapped", "metrics/kernel.py", [("cand.double(), ref.double(), kid_subsets", "ref.double(), cand.double(), kid_subsets")], KIDT),
    ("cmmd-gamma", "metrics/kernel.py", [("gamma = 1.0 / (2.0 * sigma**2)", "gamma = 1.0 / sigma**2")], CMMDT),
    ("cmmd-cross-term-once", "metrics/kernel.py", [("- 2.0 * mean_kernel(x, y)", "- mean_kernel(x, y)")], CMMDT),
    ("is-half-splits", "metrics/inception_score.py", [("splits=splits, shuffle", "splits=splits // 2, shuffle")], IST),
    ("is-no-shuffle", "metrics/inception_score.py", [("shuffle=seed is not None", "shuffle=False")], IST),
    ("pr-k-4", "metrics/manifold.py", [("    k = 3\n", "    k = 4\n")], PRT),
    ("knn-radius-counts-self", "metrics/neighbours.py", [("out[rows] = best[:, k]", "out[rows] = best[:, k - 1]")], [DIS, "-k", "precision_recall or neighbourhood or density_coverage"]),
    ("pr-strict-ball", "metrics/neighbours.py", [("(d < r) if strict else (d <= r)", "(d < r) if strict else (d < r)")], PRT),
    ("pr-recall-wrong-radii", "metrics/manifold.py",
     [("recall = nb.any_within(ref, cand, r_cand)", "recall = nb.any_within(ref, cand, r_ref)")], PRT),
    ("density-wrong-denominator", "metrics/manifold.py", [("/ (self.k * cand.shape[0])", "/ (self.k * ref.shape[0])")], DCT),
    ("coverage-non-strict", "metrics/manifold.py", [("(nb.nearest_sq(ref, cand) < r_ref)", "(nb.nearest_sq(ref, cand) <= r_ref)")], DCT),
    # --- LPIPS / DreamSim input ranges
    ("lpips-input-0-1", "metrics/perceptual.py",
     [("a = ref_u8.to(self.device).float() / 127.5 - 1.0", "a = ref_u8.to(self.device).float() / 255.0"),
      ("b = cand_u8.to(self.device).float() / 127.5 - 1.0", "b = cand_u8.to(self.device).float() / 255.0")], LPIPST),
    ("dreamsim-input-minus1-1", "metrics/perceptual.py",
     [("a = resize_images(ref_u8, DREAMSIM_SIZE, \"pil\").to(self.device) / 255.0",
       "a = resize_images(ref_u8, DREAMSIM_SIZE, \"pil\").to(self.device) / 127.5 - 1.0"),
      ("b = resize_images(cand_u8, DREAMSIM_SIZE, \"pil\").to(self.device) / 255.0",
       "b = resize_images(cand_u8, DREAMSIM_SIZE, \"pil\").to(self.device) / 127.5 - 1.0")], DST),
    ("dreamsim-torch-resize", "metrics/perceptual.py",
     [("a = resize_images(ref_u8, DREAMSIM_SIZE, \"pil\")", "a = resize_images(ref_u8, DREAMSIM_SIZE, \"torch\")"),
      ("b = resize_images(cand_u8, DREAMSIM_SIZE, \"pil\")", "b = resize_images(cand_u8, DREAMSIM_SIZE, \"torch\")")], DST),
    # --- 8-bit quantisation and the ADM crop
    ("uint8-truncate", "raebench/images.py", [("        x = x + 0.5\n", "        pass\n")], U8),
    ("uint8-round-half-even", "raebench/images.py", [("        x = x + 0.5\n", "        x = x.round()\n")], U8),
    ("uint8-scale-256", "raebench/images.py", [("x = x.detach().float().clamp(0.0, 1.0) * 255.0", "x = x.detach().float().clamp(0.0, 1.0) * 256.0")], U8),
    ("adm-crop-top-left", "raebench/images.py", [("    top = (a.shape[0] - size) // 2\n    left = (a.shape[1] - size) // 2",
                                                "    top = 0\n    left = 0")], ADM),
    ("adm-crop-bilinear", "raebench/images.py", [("im = im.resize(resized, resample=Image.BICUBIC)", "im = im.resize(resized, resample=Image.BILINEAR)")], ADM),
    ("adm-crop-no-box-halving", "raebench/images.py", [("while min(im.size) >= 2 * size:", "while min(im.size) >= 2 * size and False:")], ADM),
    ("adm-crop-truncated-size", "raebench/images.py", [("resized = tuple(round(s * scale) for s in im.size)", "resized = tuple(int(s * scale) for s in im.size)")], ADM),
    # --- RAE: statistics, noise, patch order, pixel normalisation
    ("stats-eps-1e-6", "raebench/rae/stats.py", [("STATS_EPS = 1e-5", "STATS_EPS = 1e-6")], STATST),
    ("stats-eps-outside-sqrt", "raebench/rae/stats.py",
     [("return (z - self.mean.to(z.dtype)) / torch.sqrt(self.var.to(z.dtype) + self.eps)",
       "return (z - self.mean.to(z.dtype)) / (torch.sqrt(self.var.to(z.dtype)) + self.eps)"),
      ("return z * torch.sqrt(self.var.to(z.dtype) + self.eps) + self.mean.to(z.dtype)",
       "return z * (torch.sqrt(self.var.to(z.dtype)) + self.eps) + self.mean.to(z.dtype)")], STATST),
    ("stats-var-ddof1", "raebench/rae/stats.py",
     [("return (self.sumsq / self.count - m * m).clamp_min(0.0)",
       "return ((self.sumsq - self.count * m * m) / (self.count - 1)).clamp_min(0.0)")], STATST),
    ("noise-per-element-sigma", "raebench/rae/tokenizer.py", [("shape = (z.shape[0],) + (1,) * (z.dim() - 1)", "shape = tuple(z.shape)")], TOKT),
    ("noise-in-eval-mode", "raebench/rae/tokenizer.py",
     [("tau = (self.noise_tau if self.training else 0.0) if noise_tau", "tau = self.noise_tau if noise_tau")], TOKT),
    ("noise-after-normalisation", "raebench/rae/tokenizer.py",
     [("            z = add_noise(z, tau, noise_rule or self.noise_rule, generator)\n        return self.normalize(z)",
       "            return add_noise(self.normalize(z), tau, noise_rule or self.noise_rule, generator)\n        return self.normalize(z)")], TOKT),
    ("decode-pixel-denorm-order", "raebench/rae/tokenizer.py",
     [("return x * self.encoder.std.to(x.dtype) + self.encoder.mean.to(x.dtype)",
       "return (x + self.encoder.mean.to(x.dtype)) * self.encoder.std.to(x.dtype)")], DECT + [f"{TOK}::test_decoder_trains_through_decode"]),
    ("unpatchify-hw-swapped", "raebench/rae/decoder.py", [('"nhwpqc->nchpwq"', '"nwhpqc->nchpwq"')], DECT),
    ("decoder-tokens-column-major", "raebench/rae/decoder.py",
     [("tokens = z.reshape(n, c, h * w).transpose(1, 2)", "tokens = z.transpose(2, 3).reshape(n, c, h * w).transpose(1, 2)")], DECT),
    ("encoder-patches-column-major", "raebench/rae/encoders.py",
     [("return t.transpose(1, 2).reshape(n, c, g, g)", "return t.transpose(1, 2).reshape(n, c, g, g).transpose(2, 3)")],
     [ORA, "tests/test_rae_encoders.py"]),
    # --- stage 2: transport, samplers, EMA
    ("transport-t0-noise", "raebench/stage2/transport.py",
     [("return (1 - tt) * x0 + tt * noise, noise - x0", "return tt * x0 + (1 - tt) * noise, x0 - noise")], TRANS),
    ("transport-target-sign", "raebench/stage2/transport.py",
     [("return (1 - tt) * x0 + tt * noise, noise - x0", "return (1 - tt) * x0 + tt * noise, x0 - noise")], TRANS),
    ("shift-inverse", "raebench/stage2/transport.py",
     [("return shift * t / (1 + (shift - 1) * t)", "return t / (shift - (shift - 1) * t)")], TRANS),
    ("shift-no-sqrt", "raebench/stage2/transport.py", [("return math.sqrt(dim / base)", "return dim / base")], TRANS),
    ("loss-sum-not-mean", "raebench/stage2/transport.py",
     [("return (pred.float() - target.float()).pow(2).flatten(1).mean(1)", "return (pred.float() - target.float()).pow(2).flatten(1).sum(1)")], TRANS),
    ("t-max-0.99", "raebench/stage2/transport.py", [("T_MAX = 1 - 1 / 1000", "T_MAX = 1 - 1 / 100")], TRANS),
    ("grid-to-exact-zero", "raebench/stage2/samplers.py",
     [("return time_shift(1 - torch.linspace(0, T_MAX, num_steps), shift)", "return time_shift(1 - torch.linspace(0, 1.0, num_steps), shift)")], SAMP),
    ("grid-shift-not-applied", "raebench/stage2/samplers.py",
     [("return time_shift(1 - torch.linspace(0, T_MAX, num_steps), shift)", "return 1 - torch.linspace(0, T_MAX, num_steps)")], SAMP),
    ("euler-velocity-at-t1", "raebench/stage2/samplers.py",
     [("x = x + (t1 - t0) * v(x, _tvec(t0, x))", "x = x + (t1 - t0) * v(x, _tvec(t1, x))")], SAMP),
    ("heun-only-corrector", "raebench/stage2/samplers.py", [("x = x + dt * (v1 * 0.5 + v2 * 0.5)", "x = x + dt * v2")], SAMP),
    ("heun-corrector-at-t0", "raebench/stage2/samplers.py", [("_tvec(t0 - (t0 - t1), x)", "_tvec(t0, x)")], SAMP),
    ("cfg-interval-open-low", "raebench/stage2/samplers.py", [("((t >= lo) & (t <= hi))", "((t > lo) & (t <= hi))")], SAMP),
    ("cfg-interval-open-high", "raebench/stage2/samplers.py", [("((t >= lo) & (t <= hi))", "((t >= lo) & (t < hi))")], SAMP),
    ("cfg-from-conditional", "raebench/stage2/samplers.py",
     [("v_u + cfg_scale * (v_c - v_u), v_c)", "v_c + cfg_scale * (v_c - v_u), v_c)")], SAMP),
    ("sde-score-sign", "raebench/stage2/samplers.py", [("return -(x + (1 - tb) * vel)", "return -(x - (1 - tb) * vel)")], SAMP),
    ("ema-decay-inverted", "raebench/stage2/train.py", [("torch._foreach_lerp_(e, m, 1 - decay)", "torch._foreach_lerp_(e, m, decay)")],
     ["tests/test_stage2_train.py::test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model",
      "tests/test_stage2_train.py::test_resume_matches_uninterrupted", "tests/test_preempt.py"]),
    ("ema-decay-inverted-stage1", "raebench/stage1/train.py",
     [("list(model.parameters()), 1.0 - decay)", "list(model.parameters()), decay)")],
     ["tests/test_stage2_train.py::test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model", "tests/test_stage1_train.py"]),
    # --- alignment
    ("mutual-knn-self-neighbour", "raebench/analysis/alignment.py", [("        sa[rows, rows + s] = -math.inf\n", "")], ALIT),
    ("mutual-knn-k-5", "raebench/analysis/alignment.py", [("MUTUAL_K = 10", "MUTUAL_K = 5")], ALIT),
    ("cka-a-uncentred", "raebench/analysis/alignment.py", [("ac = a.double() - a.double().mean(0)", "ac = a.double()")], ALIT),
    ("cka-b-centred-wrong-axis", "raebench/analysis/alignment.py", [("bc = bc - bc.mean(0)", "bc = bc - bc.mean(1, keepdim=True)")], ALIT),
    ("hsic-denominator", "raebench/analysis/alignment.py", [("lt.sum(1)) / (m - 2)", "lt.sum(1)) / (m - 1)")], ALIT),
    # --- results provenance: a key column left out merges two different measurements into one
    *[(f"run-key-without-{c}", "raebench/results.py", [(KEY_TEXT, KEY_TEXT.replace(f' "{c}",', "", 1))], REST)
      for c in ("weights_id", "precision", "dataset", "split", "resolution", "n_images", "seed", "metric",
                "metric_version", "data_fingerprint", "candidates_fingerprint", "metric_networks")],
]


def _pytest(args: list[str], timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode == 0:
        return "passed", time.time() - t0, tail
    if p.returncode == 5:
        return "no-tests", time.time() - t0, tail
    return "failed", time.time() - t0, tail


def apply(file: str, edits: list[tuple[str, str]]) -> bytes:
    """Apply the edits to ``file``; returns the original bytes (the caller restores them)."""
    path = ROOT / file
    original = path.read_bytes()
    text = original.decode()
    for old, new in edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutant is stale: {old!r} occurs {n} times in {file} (want exactly 1); update bench/mutants.py")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run only mutants whose name contains this text")
    ap.add_argument("--list", action="store_true", help="check that every mutant still applies, print the names and exit")
    ap.add_argument("--baseline", action="store_true", help="run each test selection unmutated first")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant's test run (a timeout counts as killed)")
    args = ap.parse_args()
    todo = [m for m in MUTANTS if args.only is None or args.only in m[0]]
    if args.list:
        for name, file, edits, _ in todo:
            (ROOT / file).write_bytes(apply(file, edits))  # restores at once: only checks that the edit applies
            print(name)
        return 0
    if not todo:
        raise SystemExit(f"no mutant name contains {args.only!r}; see --list")
    if args.baseline:
        for sel in sorted({tuple(m[3]) for m in todo}):
            verdict, secs, tail = _pytest(list(sel), args.timeout)
            print(f"baseline {verdict:8s} {secs:6.1f}s {' '.join(sel)}  {tail}", flush=True)
    survived = []
    for name, file, edits, tests in todo:
        original = apply(file, edits)
        try:
            verdict, secs, tail = _pytest(tests, args.timeout)
        finally:
            (ROOT / file).write_bytes(original)
        status = {"failed": "killed", "timeout": "killed", "passed": "SURVIVED"}.get(verdict, verdict)
        if status != "killed":
            survived.append(name)
        print(f"{name:34s} {status:9s} {secs:6.1f}s  {tail}", flush=True)
    print(f"\n{len(todo) - len(survived)}/{len(todo)} killed; survived: {', '.join(survived) or 'none'}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
