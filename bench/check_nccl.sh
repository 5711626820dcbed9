#!/usr/bin/env bash
# Every data-parallel command under `torchrun --nproc_per_node 2` against one process, on tiny random models:
# with NCCL on 2 GPUs (what 8-GPU runs use; the test suite runs these paths with gloo on the CPU only), or
# with gloo on the CPU (`cpu`, how this script itself was checked).
#   bash bench/check_nccl.sh [cuda|cpu] [PART ...]    # from the repository root; log in ${OUT:-.}/check_nccl.log
# PARTs (default: all, in this order): eval compare reconstruct score analyze stats cache stage2 sample stage1
# Each part runs the command with 1 process and with 2 (torchrun), compares what they wrote (numbers within
# float tolerance, files equal), and searches the 2-process stderr for what NCCL misuse prints (a barrier
# guessing its GPU, CPU tensors given to NCCL, two ranks on one GPU, a collective timing out, a process
# group left to the interpreter's exit) and for tracebacks. Collectives time out after 120 s
# (RAEBENCH_DIST_TIMEOUT_S), each command after 300 s: a hang fails the part instead of the session.
# Needs the packages of bench/cli_smoke.sh's ddp part; torch-fidelity adds FID/KID/precision to `score`.
# About 20 commands of ~10 s each on GPUs; exits 1 if any check failed, after running every part.
set -uo pipefail
dev="${1:-cuda}"
parts=("${@:2}")
[ ${#parts[@]} -gt 0 ] || parts=(eval compare reconstruct score analyze stats cache stage2 sample stage1)
PY="${PYTHON:-python3}"
log="${OUT:-.}/check_nccl.log"
w="$(mktemp -d)"
site="$(mktemp -d)"
if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . >/dev/null 2>&1; then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 RAEBENCH_DIST_TIMEOUT_S="${RAEBENCH_DIST_TIMEOUT_S:-120}"
export RAEBENCH_CACHE="$w/cache-home"
if [ "$dev" = cuda ]; then
  ngpu="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  if [ "$ngpu" -lt 2 ]; then echo "check_nccl: $ngpu GPU(s) visible; NCCL between processes needs 2" | tee "$log"; exit 2; fi
fi
failed=()

"$PY" - "$w" <<'PYEOF'
# 16 labelled images, a tiny random DINOv2 with registers (stats, stage 1), random Inception weights (score)
import json, sys, numpy as np, torch
from pathlib import Path
from PIL import Image
w = Path(sys.argv[1])
rng = np.random.default_rng(0)
for i in range(16):
    d = w / "images" / f"class_{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
torch.manual_seed(0)
Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32,
    num_register_tokens=4)).save_pretrained(w / "encoder")
(w / "encoder" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                                    "image_std": [0.229, 0.224, 0.225]}))
try:
    from unittest import mock
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
except ImportError:
    print("torch-fidelity missing: score checks psnr and ssim only")
else:
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}):
        net = FeatureExtractorInceptionV3("init", ["2048"], feature_extractor_weights_path="unused")
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)  # PyTorch's default init makes the features vanish
    torch.save(net.state_dict(), w / "inception.pt")
PYEOF
[ -f "$w/inception.pt" ] && export RAEBENCH_INCEPTION_WEIGHTS="$w/inception.pt"

# one NAME ARGS...: one process; two NAME ARGS...: torchrun with 2; stderr in $w/NAME.err, checked for NCCL misuse
one() { local n="$1"; shift; echo "+ raebench $*"
        timeout 300 "$PY" -m raebench "$@" >"$w/$n.out" 2>"$w/$n.err" || { tail -20 "$w/$n.err"; failed+=("$n"); return 1; }; }
two() { local n="$1"; shift; echo "+ torchrun --nproc_per_node 2 -m raebench $*"
        timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m raebench "$@" >"$w/$n.out" 2>"$w/$n.err"
        local rc=$?
        local bad; bad="$(grep -E -o "barrier\(\): using the device|devices used by this process are currently unknown|Guessing device ID|No backend type associated|Duplicate GPU detected|destroy_process_group\(\) was not called|Watchdog caught collective operation timeout|Traceback \(most recent call last\)" "$w/$n.err" | sort | uniq -c)"
        if [ "$rc" -ne 0 ] || [ -n "$bad" ]; then tail -30 "$w/$n.err"; echo "!! $n: exit $rc; ${bad:-no NCCL message}"; failed+=("$n"); return 1; fi; }
# same NAME PYTHON: a comparison of the files the two runs wrote ($w/1, $w/2), printing its numbers
same() { local n="$1"; shift
        "$PY" - "$w" <<<"$*" || { echo "!! $n: outputs differ"; failed+=("$n-compare"); }; }
rows='
import sys, pandas as pd
from pathlib import Path
from raebench.results import load
w = Path(sys.argv[1])
def values(d):
    df = load(d)
    return {(t, m): v for t, m, v in zip(df["tokenizer"], df["metric"], df["value"])}
def same_rows(a, b, rel):
    va, vb = values(a), values(b)
    assert va.keys() == vb.keys() and va, (sorted(va), sorted(vb))
    worst = max(abs(vb[k] - va[k]) / max(abs(va[k]), 1e-12) for k in va)
    print(f"   {len(va)} rows; worst relative difference {worst:.2e} (allowed {rel:g})")
    assert worst <= rel, {k: (va[k], vb[k]) for k in va if abs(vb[k] - va[k]) > rel * max(abs(va[k]), 1e-12)}
    assert len(load(b, latest=False)) == len(va), "rows written more than once"
    assert load(b)["device"].str.endswith("x2").all()
'
d="--device $dev"
img="$w/images"

part_eval() {
  one eval-1 eval -t bicubic-f8 --data "$img" -r 32 -m psnr,ssim -b 3 --results "$w/eval-1" $d &&
  two eval-2 eval -t bicubic-f8 --data "$img" -r 32 -m psnr,ssim -b 3 --results "$w/eval-2" $d &&
  same eval "$rows"'same_rows(w / "eval-1", w / "eval-2", 1e-5)'
}
part_compare() {
  local c=(compare -t bicubic-f8 -t pixels --data "$img" -r 32 -b 3 --reported none $d)
  one compare-1 "${c[@]}" --results "$w/compare-1" && two compare-2 "${c[@]}" --results "$w/compare-2" &&
  same compare "$rows"'same_rows(w / "compare-1", w / "compare-2", 1e-5)' &&
  two compare-2-again "${c[@]}" --results "$w/compare-2" &&  # every row reused (rank 0 decides, from_rank0)
  grep -q "computed now: nothing" "$w/compare-2-again.out" || { echo "!! compare: rows not reused"; failed+=(compare-reuse); }
}
part_reconstruct() {
  local c=(reconstruct -t bicubic-f8 --data "$img" -r 32 -b 3 --references $d)
  one reconstruct-1 "${c[@]}" -o "$w/rec-1" && two reconstruct-2 "${c[@]}" -o "$w/rec-2" &&
  same reconstruct '
import sys, numpy as np
from pathlib import Path
w = Path(sys.argv[1])
for f in ("reconstructions.npz", "references.npz"):
    a, b = np.load(w / "rec-1" / f)["arr_0"], np.load(w / "rec-2" / f)["arr_0"]
    diff = int(np.abs(a.astype(int) - b.astype(int)).max())
    print(f"   {f}: {a.shape}, largest difference {diff} (uint8 levels, allowed 1)")
    assert a.shape == b.shape and diff <= 1
assert (w / "rec-1/files.csv").read_text() == (w / "rec-2/files.csv").read_text()
assert sorted(p.name for p in (w / "rec-1/images").iterdir()) == sorted(p.name for p in (w / "rec-2/images").iterdir())
assert not list((w / "rec-2").glob(".part-*")), "shard files left"
'
}
part_score() {
  [ -f "$w/rec-1/reconstructions.npz" ] || part_reconstruct || return
  local m=psnr,ssim; [ -f "$w/inception.pt" ] && m=psnr,ssim,fid,kid,precision
  local c=(score --references "$w/rec-1/references.npz" --candidates "$w/rec-1/reconstructions.npz" -m "$m" -b 3 $d)
  one score-1 "${c[@]}" --results "$w/score-1" && two score-2 "${c[@]}" --results "$w/score-2" &&
  same score "$rows"'same_rows(w / "score-1", w / "score-2", 1e-4)'
}
part_analyze() {
  local c=(analyze -t pixels -t bicubic-f8 --data "$img" -r 32 -b 3 --reference random-proj --perceptual rmse
           --mutual-k 3 --knn-k 3 --n-diag 4 --interp-pairs 2 --interp-steps 3 --sigmas 0.25,1 $d
           --diffusability --probe-preset ditdh-tiny --probe-steps 2 --probe-batch-size 2 --probe-samples 4
           --probe-sample-steps 3 --no-plots)
  one analyze-1 "${c[@]}" --results "$w/analyze-1" && two analyze-2 "${c[@]}" --results "$w/analyze-2" &&
  same analyze "$rows"'
va, vb = values(w / "analyze-1"), values(w / "analyze-2")
assert va.keys() == vb.keys() and va
# float32 encoders see other batch compositions; the probe trains 2 steps: report, bound loosely
worst = sorted(((abs(vb[k] - va[k]) / max(abs(va[k]), 1e-9), k) for k in va), reverse=True)[:3]
print("   %d rows; largest relative differences %s" % (len(va), [("%.1e" % r, k[1]) for r, k in worst]))
assert worst[0][0] <= 1e-3, worst
assert len(load(w / "analyze-2", latest=False)) == len(va)
'
}
part_stats() {
  local c=(stats --encoder "$w/encoder" --encoder-input-size 32 --data "$img" -r 32 -b 3 --hflip $d)
  one stats-1 "${c[@]}" -o "$w/stat-1.pt" && two stats-2 "${c[@]}" -o "$w/stat-2.pt" &&
  same stats '
import sys, torch
from pathlib import Path
w = Path(sys.argv[1])
a, b = (torch.load(w / f"stat-{k}.pt", weights_only=True) for k in (1, 2))
for k in ("mean", "var"):
    rel = float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-6)).max())
    print(f"   {k} {tuple(a[k].shape)}: largest relative difference {rel:.2e} (allowed 1e-4)")
    assert rel <= 1e-4
'
}
part_cache() {
  local c=(cache-latents -t pixels --data "$img" -r 8 -b 3 --dtype float32 $d)
  one cache-1 "${c[@]}" -o "$w/cache-1" && two cache-2 "${c[@]}" -o "$w/cache-2" &&
  same cache '
import json, sys, numpy as np
from pathlib import Path
w = Path(sys.argv[1])
a, b = np.load(w / "cache-1/latents.npy"), np.load(w / "cache-2/latents.npy")
print(f"   latents {a.shape}: largest difference {float(np.abs(a - b).max()):.2e}")
assert a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-6)
assert np.array_equal(np.load(w / "cache-1/labels.npy"), np.load(w / "cache-2/labels.npy"))
m1, m2 = (json.loads((w / f"cache-{k}/meta.json").read_text()) for k in (1, 2))
assert m2["complete"] and m2["world"] == 2 and {k: v for k, v in m1.items() if k not in ("world", "id")} == \
       {k: v for k, v in m2.items() if k not in ("world", "id")}
assert not list((w / "cache-2").glob("progress-*")), "progress files left"
'
}
part_stage2() {
  [ -f "$w/cache-1/meta.json" ] || part_cache || return
  local c=(train stage2 -p tiny --num-classes 2 -b 8 --latents "$w/cache-1" --precision fp32 --log-every 1 $d)
  one stage2-1 "${c[@]}" -o "$w/s2-1" --max-steps 6 &&
  two stage2-2 "${c[@]}" -o "$w/s2-2" --max-steps 3 &&
  two stage2-2-resume "${c[@]}" -o "$w/s2-2" --max-steps 6 &&   # rank 0 saved, every rank resumes
  same stage2 '
import sys, torch
from pathlib import Path
w = Path(sys.argv[1])
a, b = (torch.load(w / f"s2-{k}/checkpoints/last.pt", weights_only=True, map_location="cpu") for k in (1, 2))
assert a["step"] == b["step"] == 6
for k in ("model", "ema"):
    worst = max(float((a[k][n] - b[k][n]).abs().max()) for n in a[k])
    print(f"   {k}: largest weight difference after 6 steps (3 + 3 resumed on 2 ranks) {worst:.2e} (allowed 1e-3)")
    assert worst <= 1e-3
'
}
part_sample() {
  [ -f "$w/s2-1/checkpoints/last.pt" ] || part_stage2 || return
  local c=(sample -c "$w/s2-1/checkpoints/last.pt" -n 10 --steps 5 --cfg-scale 1.5 -b 4 $d)
  one sample-1 "${c[@]}" -o "$w/sample-1.npz" && two sample-2 "${c[@]}" -o "$w/sample-2.npz" &&
  same sample '
import sys, numpy as np
from pathlib import Path
w = Path(sys.argv[1])
a, b = np.load(w / "sample-1.npz"), np.load(w / "sample-2.npz")
diff = int(np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max())
print("   samples %s: largest difference %d (uint8 levels; each batch is the same on any rank)" % (a["arr_0"].shape, diff))
assert diff <= 1 and np.array_equal(a["arr_1"], b["arr_1"])
'
}
part_stage1() {
  # tiny preset: global batch 4, 16 images = 4 steps an epoch; discriminator from step 2 (its gradients
  # all-reduced by hand), GAN from step 5 (its adaptive weight comes from each rank's own batch, as in the
  # official trainer, so 2 ranks equal 1 only before it): compared at step 4, then resumed past it on 2 ranks
  local c=(train stage1 -p tiny --data "$img" --encoder "$w/encoder" --device "$dev" --set disc_start_epoch=0.5
           --set gan_start_epoch=1 --set sample_every=0 --precision fp32)
  one stage1-1 "${c[@]}" --results "$w/s1-1" --name run --max-steps 4 &&
  two stage1-2 "${c[@]}" --results "$w/s1-2" --name run --max-steps 4 &&
  same stage1 '
import csv, sys, torch
from pathlib import Path
w = Path(sys.argv[1])
a, b = (torch.load(w / f"s1-{k}/stage1/run/checkpoints/last.pt", weights_only=True, map_location="cpu") for k in (1, 2))
# a discriminator conv bias feeds a per-sample normalisation, so its true gradient is 0: Adam scales the
# rounding left in it up to about lr (2e-3) a step, on 1 rank and on 2 alike; those are bounded apart
noise = lambda n: n.endswith(".0.bias")  # noqa: E731
for k in ("model", "ema", "disc"):
    for label, names in (("", [n for n in a[k] if k != "disc" or not noise(n)]), (" (conv biases before a norm)",
                                                                                  [n for n in a[k] if k == "disc" and noise(n)])):
        if names:
            worst = max(float((a[k][n].float() - b[k][n].float()).abs().max()) for n in names)
            bound = 1e-2 if label else 1e-3
            print(f"   {k}{label}: largest weight difference after 4 steps {worst:.2e} (allowed {bound:g})")
            assert worst <= bound
la, lb = (list(csv.DictReader(open(w / f"s1-{k}/stage1/run/log.csv"))) for k in (1, 2))
for col in ("l1", "lpips", "disc_loss"):
    worst = max(abs(float(x[col]) - float(y[col])) / max(abs(float(x[col])), 1e-9) for x, y in zip(la, lb) if x[col])
    print(f"   log {col}: largest relative difference {worst:.2e} (allowed 1e-3)")
    assert worst <= 1e-3
' &&
  two stage1-2-resume "${c[@]}" --results "$w/s1-2" --name run --max-steps 6   # GAN on, rng states gathered
}

{
  "$PY" -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else '-', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  for p in "${parts[@]}"; do
    echo "-- part $p at ${SECONDS} s"
    if declare -F "part_$p" >/dev/null; then "part_$p" || true; else echo "unknown part $p"; failed+=("$p"); fi
  done
  if [ ${#failed[@]} -eq 0 ]; then echo "check_nccl ($dev, ${parts[*]}): ok at ${SECONDS} s"
  else echo "check_nccl ($dev): FAILED ${failed[*]} at ${SECONDS} s (outputs in $w)"; fi
  [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
