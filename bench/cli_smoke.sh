#!/usr/bin/env bash
# The training command lines end to end on one device, in seconds, with random weights:
#   stage 1: a tiny random DINOv2 -> train stage1 (fp32, stopped and resumed, past the discriminator and GAN
#            starts; then bf16) -> export-decoder;
#   stage 2: synthetic images -> cache-latents -> train stage2 (fp32 from the cache, stopped and resumed;
#            bf16 encoding on the fly) -> sample (SDE with CFG, Heun);
#   ddp:     the same commands under torchrun with $NPROC processes (default 2 on the CPU: gloo; on CUDA
#            the visible GPUs, at most 2: NCCL) -> train stage1, train stage2 and resume, sample, eval. With one
#            process (one GPU) torchrun creates no process group: no NCCL, DDP or gathering runs then.
#   preempt: train stage2 stopped by SIGTERM mid-run (exit 143, checkpoint at the step in progress), resumed
#            by the same command, against one uninterrupted run (weights compared: equal on the CPU, within
#            the device's nondeterministic reductions on a GPU).
#   bash bench/cli_smoke.sh [cuda|cpu] [stage1|stage2|ddp|preempt ...]   # stage1 stage2 by default; exits at the first failure
set -euo pipefail
dev="${1:-cuda}"
stages=("${@:2}")
[ ${#stages[@]} -gt 0 ] || stages=(stage1 stage2)
PY="${PYTHON:-python3}"
w="$(mktemp -d)"
"$PY" - "$w/images" <<'PYEOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for i in range(16):
    d = Path(sys.argv[1]) / f"class_{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
PYEOF
rb() { echo "+ raebench $*"; "$PY" -m raebench "$@"; }

encoder() {
  [ -d "$w/encoder" ] && return
  "$PY" - "$w/encoder" <<'PYEOF'
import json, sys, torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
torch.manual_seed(0)
Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=32,
    num_register_tokens=4)).save_pretrained(sys.argv[1])
with open(f"{sys.argv[1]}/preprocessor_config.json", "w") as f:
    json.dump({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, f)
PYEOF
}

stage1() {
  encoder
  # 16 images, global batch 4: 4 steps an epoch; discriminator from step 2, GAN from step 4
  local s1=(train stage1 -p tiny --data "$w/images" --encoder "$w/encoder" --results "$w/res" --device "$dev"
            --set disc_start_epoch=0.5 --set gan_start_epoch=1 --set sample_every=0)
  rb "${s1[@]}" --name fp32 --precision fp32 --max-steps 3
  rb "${s1[@]}" --name fp32 --precision fp32 --max-steps 6     # resumes at step 3
  rb "${s1[@]}" --name bf16 --precision bf16 --max-steps 6
  rb export-decoder "$w/res/stage1/fp32"
  "$PY" - "$w/res/stage1" <<'PYEOF'
import csv, math, sys
for run in ("fp32", "bf16"):
    rows = list(csv.DictReader(open(f"{sys.argv[1]}/{run}/log.csv")))
    last = rows[-1]
    bad = [k for k, v in last.items() if v not in ("", None) and k not in ("step", "time") and not math.isfinite(float(v))]
    assert len(rows) == 6 and last["gan"] != "" and not bad, (run, len(rows), last)
    print(run, "steps", len(rows), "last l1", last["l1"], "gan", last["gan"], "disc", last["disc_loss"])
PYEOF
}

stage2() {
  rb cache-latents -t pixels --data "$w/images" -o "$w/cache" -r 8 -b 8 --device "$dev"
  common=(train stage2 -p tiny --num-classes 2 -b 8 --device "$dev" --log-every 2)
  rb "${common[@]}" --latents "$w/cache" -o "$w/run32" --precision fp32 --max-steps 4
  rb "${common[@]}" --latents "$w/cache" -o "$w/run32" --precision fp32 --max-steps 8    # resumes at step 4
  rb "${common[@]}" -t pixels --data "$w/images" -r 8 -o "$w/run16" --precision bf16 --max-steps 4
  rb sample -c "$w/run32/checkpoints/last.pt" -n 8 --steps 5 --method sde --cfg-scale 2 -b 4 -o "$w/sde.npz" --device "$dev"
  rb sample -c "$w/run16/checkpoints/last.pt" -n 8 --steps 5 --method heun -b 8 -o "$w/heun.npz" --device "$dev"
  "$PY" -c "import numpy as np, sys; [print(f, np.load(f)['arr_0'].shape, np.load(f)['arr_1'].tolist()) for f in sys.argv[1:]]" "$w/sde.npz" "$w/heun.npz"
}

preempt() {
  [ -d "$w/cache" ] || rb cache-latents -t pixels --data "$w/images" -o "$w/cache" -r 8 -b 8 --device "$dev"
  local c=(train stage2 -p tiny --num-classes 2 -b 8 --device "$dev" --log-every 1 --latents "$w/cache"
           --precision fp32 --epochs 150 --ckpt-every 1000)
  rb "${c[@]}" -o "$w/whole" >/dev/null
  echo "+ raebench ${c[*]} -o $w/stopped   (SIGTERM after 20 logged steps)"
  "$PY" -m raebench "${c[@]}" -o "$w/stopped" >"$w/stopped.out" 2>&1 &
  local pid=$! rc=0 t=0
  until [ "$(cat "$w/stopped/log.csv" 2>/dev/null | wc -l)" -gt 20 ] || ! kill -0 "$pid" 2>/dev/null; do
    sleep 0.05; t=$((t + 1)); [ "$t" -lt 4000 ] || { kill -KILL "$pid"; echo "no 20 steps in 200 s"; return 1; }
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || rc=$?
  tail -n 2 "$w/stopped.out"
  [ "$rc" -eq 143 ] || { echo "exit $rc, expected 143 (stopped by SIGTERM; did it finish before the signal?)"; return 1; }
  grep -q "stopped by SIGTERM at step" "$w/stopped.out"
  rb "${c[@]}" -o "$w/stopped" >/dev/null
  "$PY" - "$w" <<'PYEOF'
import csv, sys, torch
w = sys.argv[1]
steps = [int(r["step"]) for r in csv.DictReader(open(f"{w}/stopped/log.csv"))]
assert steps == list(range(1, 301)), (steps[:3], steps[-3:], len(steps))
a, b = (torch.load(f"{w}/{r}/checkpoints/last.pt", map_location="cpu", weights_only=True) for r in ("whole", "stopped"))
assert a["step"] == b["step"] == 300, (a["step"], b["step"])
worst = max(((a[k][n].float() - b[k][n].float()).abs().max() / a[k][n].float().abs().max().clamp_min(1e-12)).item()
            for k in ("model", "ema") for n in a[k])
print(f"stopped and resumed vs uninterrupted, 300 steps: worst relative weight difference {worst:.2e}")
assert worst < 1e-3, worst
PYEOF
}

ddp() {
  encoder
  local np="${NPROC:-}"
  if [ -z "$np" ]; then
    if [ "$dev" = cpu ]; then np=2; else np="$("$PY" -c 'import torch; print(min(2, torch.cuda.device_count()))')"; fi
  fi
  [ "$np" -gt 1 ] || echo "ddp with $np process: no process group (NCCL, DDP and gathers need 2 devices)"
  tr() { echo "+ torchrun --nproc_per_node $np -m raebench $*"
         "$PY" -m torch.distributed.run --standalone --nproc_per_node "$np" -m raebench "$@"; }
  tr train stage1 -p tiny --data "$w/images" --encoder "$w/encoder" --results "$w/res" --device "$dev" \
     --set disc_start_epoch=0.5 --set gan_start_epoch=1 --set sample_every=0 --name ddp --precision bf16 --max-steps 5
  local s2=(train stage2 -p tiny --num-classes 2 -b 8 --device "$dev" -t pixels --data "$w/images" -r 8 -o "$w/ddp"
            --precision bf16)
  tr "${s2[@]}" --max-steps 3
  tr "${s2[@]}" --max-steps 6    # resumes at step 3
  tr sample -c "$w/ddp/checkpoints/last.pt" -n 10 --steps 5 --cfg-scale 1.5 -b 4 -o "$w/ddp.npz" --device "$dev"
  tr eval -t bicubic-f8 --data "$w/images" -r 32 -m psnr,ssim -b 4 \
     --results "$w/eval" --device "$dev"
  "$PY" -c "import numpy as np, sys; d = np.load(sys.argv[1]); print(sys.argv[1], d['arr_0'].shape, d['arr_1'].tolist())" "$w/ddp.npz"
}

for st in "${stages[@]}"; do "$st"; done
echo "cli smoke (${stages[*]}) on $dev: ok"
