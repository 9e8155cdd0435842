#!/usr/bin/env bash
# Issue #9's accelerator check, as one prepared command: rank-32 LoRA training of a Llama-3.2-1B-shaped
# model (random weights, made locally) in bf16 at 8 x 2048 tokens; prints tokens/s and MFU against the
# measured bf16 matmul peak. Needs the accelerator's JAX plus jtinker's dependencies (no torch).
#   bash bench/gpu_train.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results}
python3 -m pip install -q --no-deps --no-build-isolation -e .
model=${JTINKER_BENCH_MODEL:-/tmp/jtinker-llama-1b}
[ -f "$model/config.json" ] || jtinker make-tiny-model "$model" --family llama --size 1b
python3 -c 'import jax; print(jax.__version__, jax.devices())'
python3 bench/train.py --model "$model" --batch 8 --seq 2048 --dtype bfloat16 --skip-torch --steps 6 \
  --out "$out/train_gpu.json"
