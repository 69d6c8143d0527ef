#!/usr/bin/env bash
# The in-process parts of bench/throughput.py (tower, in-process batched, naive) on CUDA,
# in fp16 and bf16 at batch 64, 256 and 512, and decode + preprocess alone on every core
# (the CPU side's ceiling for in-process batched). Needs only torch, transformers, pillow and
# numpy (no Celery, Redis or pip): run from a checkout as `bash bench/gpu.sh`.
# About 3-4 minutes on one H200; the first run also builds the random-weight model and
# the test JPEGs under bench/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
common=(--device cuda --rounds 1 --images "${CLIPTAG_BENCH_IMAGES:-2048}" --tower-batches 20 --threads "$(nproc)")
python bench/throughput.py "${common[@]}" --dtype float16 --batch 64 --parts decode,naive --naive-images 64
for dtype in float16 bfloat16; do
  for batch in 64 256 512; do
    python bench/throughput.py "${common[@]}" --dtype "$dtype" --batch "$batch" --parts tower,inprocess
  done
done
