#!/usr/bin/env bash
# The figures only a GPU gives, in one prepared call (random weights: nothing to download).
#   bash bench/gpu_figures.sh            # from the repository root; writes the log to ${OUT:-.}/gpu_figures.log
# Needs torch with CUDA, transformers, safetensors, typer, rich, pandas on the machine (raebench is put on
# PYTHONPATH, not installed). Each part is time-boxed so that one slow part cannot eat the rest.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="${OUT:-.}/gpu_figures.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  echo "== DiT-DH-XL training step, bf16, batch 32 (eager; then torch.compile)"
  timeout 240 python bench/bench_stage2_step.py --official-src none --preset xl --device cuda --precision bf16 --batch 32 --steps 10
  timeout 240 python bench/bench_stage2_step.py --official-src none --preset xl --device cuda --precision bf16 --batch 32 --steps 10 --compile
  echo "== RAE (DINOv2-B + ViT-XL decoder, random weights) evaluation throughput and overhead, 256 px"
  timeout 180 python bench/bench_eval.py --tokenizer random-rae-base-XL --metrics psnr,ssim --n 256 --batch-size 64 --device cuda
} 2>&1 | tee "$log"
