#!/usr/bin/env bash
# The figures only a GPU gives, in one prepared call (random weights: nothing to download).
#   bash bench/gpu_figures.sh [PART ...]   # from the repository root; log in ${OUT:-.}/gpu_figures.log
# PARTs, in this order by default: check metrics knn cli ddp nccl stage1 xl eval small xl-fp32 compile; also preempt,
# eval-large, xl-profile.
# Needs torch with CUDA, transformers, safetensors, typer, rich, pandas, timm, einops, torchdiffeq,
# setuptools and, for stage 1 (cli, ddp, stage1) and metrics, lpips (and torch-fidelity for metrics) on the
# machine (pure-Python wheels to carry where absent); raebench is installed (no dependencies, no index) into a
# temporary folder. The official RAE sources for the comparison are read from $RAE_OFFICIAL_SRC (a checkout, a bare mirror, or a folder holding
# src/stage2/... and src/utils/train_utils.py); without them raebench is timed alone. Each part is
# time-boxed so that one slow part cannot eat the rest; the slowest (torch.compile of two XL models) is last.
set -uo pipefail
PY="${PYTHON:-python3}"
site="$(mktemp -d)"
if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . >/dev/null; then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "could not install raebench; raebench.metrics will be missing" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
off="${RAE_OFFICIAL_SRC:-.official}"
[ -e "$off" ] || off=none
log="${OUT:-.}/gpu_figures.log"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(check metrics knn cli ddp nccl stage1 xl eval small xl-fp32 compile)
# both XL models with their AdamW states and EMAs peak at 91 GiB at batch 64 (H200): 32 on an 80 GB card
gpu_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)"
xlb=64; [ "${gpu_mib:-0}" -lt 100000 ] && xlb=32
xl=(--preset xl --device cuda --batch "$xlb" --steps 10 --threads 16)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
  for part in "${parts[@]}"; do
    echo "-- part $part at ${SECONDS} s"
    case "$part" in
      check) echo "== the fused stage-2 paths on the GPU (gradcheck, fused vs plain, bf16)"
        timeout 60 "$PY" bench/check_stage2_device.py --device cuda ;;
      metrics) echo "== every metric on the GPU vs the CPU, random-weight metric networks (bench/check_metrics_device.py)"
        timeout 300 "$PY" bench/check_metrics_device.py --device cuda ;;
      knn) echo "== precision/recall, density/coverage, CMMD final computation at 4k/10k/50k per side on the GPU vs 4k on the CPU"
        timeout 150 "$PY" bench/bench_knn_device.py --device cuda --features 4000 10000 50000 --cpu-features 4000 ;;
      cli) echo "== the stage-2 command line end to end on the GPU (bench/cli_smoke.sh)"
        timeout 240 bash bench/cli_smoke.sh cuda ;;
      preempt) echo "== train stage2 stopped by SIGTERM and resumed on the GPU vs one uninterrupted run (bench/cli_smoke.sh)"
        timeout 120 bash bench/cli_smoke.sh cuda preempt ;;
      ddp) echo "== the same commands under torchrun (2 processes, NCCL, where 2 GPUs are visible): stage 1, stage 2 and resume, sample, eval"
        timeout 150 bash bench/cli_smoke.sh cuda ddp ;;
      nccl) echo "== every data-parallel command, 2 processes (NCCL) against 1, tiny models (bench/check_nccl.sh; needs 2 GPUs)"
        OUT="${OUT:-.}" timeout 480 bash bench/check_nccl.sh cuda ;;
      stage1) echo "== stage 1 recipe (DINOv2-B with registers + ViT-XL decoder, random weights), bf16, batch 64, all losses on"
        timeout 150 "$PY" bench/bench_stage1_step.py --device cuda --precision bf16 --batch 64 --steps 12 ;;
      xl) echo "== DiT-DH-XL training step, bf16 autocast, batch $xlb, eager: raebench vs official ($off)"
        timeout 150 "$PY" bench/bench_stage2_step.py --official-src "$off" "${xl[@]}" --precision bf16 ;;
      small) echo "== the CPU bench's small config, fp32, batch 16, on the GPU (launch-bound)"
        timeout 45 "$PY" bench/bench_stage2_step.py --official-src "$off" --device cuda --steps 20 --threads 16 ;;
      eval) echo "== RAE (DINOv2-B + ViT-XL decoder, random weights) evaluation throughput and overhead, 256 px"
        timeout 120 "$PY" bench/bench_eval.py --tokenizer random-rae-base-XL --metrics psnr,ssim --n 512 --batch-size 64 --device cuda ;;
      eval-large) echo "== as eval, 2048 images (the fixed start-up cost amortised)"
        timeout 150 "$PY" bench/bench_eval.py --tokenizer random-rae-base-XL --metrics psnr,ssim --n 2048 --batch-size 64 --device cuda ;;
      xl-profile) echo "== as xl, with the top CUDA kernels of each training step (torch.profiler)"
        timeout 150 "$PY" bench/bench_stage2_step.py --official-src "$off" --preset xl --device cuda --batch "$xlb" --steps 3 --threads 16 --precision bf16 --profile ;;
      xl-fp32) echo "== DiT-DH-XL training step, fp32 (the fused paths), batch $((xlb / 2)), eager: raebench vs official ($off)"
        timeout 150 "$PY" bench/bench_stage2_step.py --official-src "$off" --preset xl --device cuda --batch $((xlb / 2)) --steps 5 --threads 16 ;;
      compile) echo "== DiT-DH-XL as in xl, both models torch.compile'd"
        timeout 420 "$PY" bench/bench_stage2_step.py --official-src "$off" "${xl[@]}" --precision bf16 --compile ;;
      *) echo "unknown part $part" ;;
    esac
  done
  echo "== done at ${SECONDS} s"
} 2>&1 | tee "$log"
