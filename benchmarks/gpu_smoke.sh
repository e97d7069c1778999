#!/usr/bin/env bash
# GPU smoke test of the paper recipe (conf/coco.yaml), at most 5 minutes on one GPU: 20 denoiser
# steps at batch 32 in fp16 + GradScaler and in bf16 (peak memory, steps/s, finite gradients), one AE
# step, one checkpoint save, sampling with and without autocast. See benchmarks/gpu_smoke.py and
# docs/training.md ("GPU smoke test"). Extra arguments go to the script, e.g.
#   bash benchmarks/gpu_smoke.sh --batch 16 denoiser.gradient_checkpointing=false
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec timeout 300 "$PY" benchmarks/gpu_smoke.py --config conf/coco.yaml --steps 20 --batch 32 \
  --out "${GPU_SMOKE_OUT:-runs/gpu_smoke.json}" "$@"
