#!/usr/bin/env bash
# Everything frkern measures on a lent GPU, in one call (see CONTRIBUTING.md, "On a GPU").
# Expects wheels for what the GPU image lacks in .whl/ (diffusers, and optionally deepcache +
# transformers + tokenizers for the DeepCache side-by-side), carried with the call.
# Usage (device tool): bash bench/gpu/run_all.sh [quick]
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# 1. correctness on the GPU: the kernels for real (no interpreter), and the patched UNet
python3 -m pytest -q -x tests/test_kernel_group_norm.py tests/test_kernel_score_mix.py tests/test_triton_backend.py \
  2>&1 | tee "$OUT/pytest_gpu.txt" | tail -5
# 2. each kernel against its unfused sequence
python3 bench/kernel_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" | tail -3
# 3. the main benchmark, SD1.5 then SDXL (fp16, CFG batch 2)
python3 bench/latency.py --config sd15 --device cuda --dtype float16 --steps 50 --cuda-graph --channels-last \
  $([ "${1:-}" = quick ] || echo --compile) --out "$OUT" 2>&1 | tee "$OUT/latency_sd15.txt" | tail -25
[ "${1:-}" = quick ] || python3 bench/latency.py --config sdxl --device cuda --dtype float16 --steps 50 --cuda-graph \
  --channels-last --out "$OUT" 2>&1 | tee "$OUT/latency_sdxl.txt" | tail -25
