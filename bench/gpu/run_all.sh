#!/usr/bin/env bash
# Everything frkern measures on a lent GPU (see CONTRIBUTING.md, "On a GPU"), in stages that each
# fit one 10-minute device call:
#   bash bench/gpu/run_all.sh tests     # kernels, patched UNet, CUDA graphs, torch.compile, on the GPU
#   bash bench/gpu/run_all.sh kernels   # each fused kernel vs its unfused sequence
#   bash bench/gpu/run_all.sh sd15      # latency.py SD1.5: eager baselines, frkern torch/triton, no graphs
#   bash bench/gpu/run_all.sh graphs    # latency.py SD1.5: frkern triton + CUDA graphs, every policy
#   bash bench/gpu/run_all.sh compile   # latency.py SD1.5: torch.compile baselines, frkern compile + graphs
#   bash bench/gpu/run_all.sh sdxl      # latency.py SDXL: frkern triton + CUDA graphs
#   bash bench/gpu/run_all.sh adaptive  # latency.py SD1.5: the Adaptive probe's host wait (below)
# Expects wheels for what the GPU image lacks in .whl/ (diffusers; optionally deepcache for the
# side-by-side), carried with the call. Results go to $OUT (the device tool brings them back).
set -uo pipefail
STAGE=${1:-tests}
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
} 2>&1 | tee "$OUT/env_$STAGE.txt"
SD15="--config sd15 --device cuda --dtype float16 --steps 50 --channels-last --out $OUT"
case "$STAGE" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernel_group_norm.py tests/test_kernel_score_mix.py \
      tests/test_kernel_geglu.py tests/test_kernel_skip_conv.py tests/test_adaptive.py tests/test_units.py tests/test_triton_backend.py tests/test_graphs.py tests/test_compile.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15 ;;
  kernels)
    python3 bench/kernel_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" | tail -30 ;;
  sd15)
    python3 bench/latency.py $SD15 --cuda-graph --graphs off 2>&1 | tee "$OUT/latency_sd15.txt" | tail -30 ;;
  graphs)
    python3 bench/latency.py $SD15 --backends triton --graphs on --tag graphs 2>&1 | tee "$OUT/latency_sd15_graphs.txt" | tail -30 ;;
  compile)
    # compiling SD1.5 takes ~1.5 min per graph (REFERENCE): baselines + NoReuse + one policy fit a call
    python3 bench/latency.py $SD15 --backends triton --graphs on --compile --tag compile \
      --policies FRDiff:interval=3 2>&1 | tee "$OUT/latency_sd15_compile.txt" | tail -30 ;;
  sdxl)
    python3 bench/latency.py --config sdxl --device cuda --dtype float16 --steps 50 --channels-last --out "$OUT" \
      --backends triton --graphs on --tag graphs --policies FRDiff:interval=3 Clockwork:clock=2 DeepCache:interval=3 \
      2>&1 | tee "$OUT/latency_sdxl.txt" | tail -30 ;;
  adaptive)
    # Adaptive with a threshold above every change and max_reuse 2 runs exactly Clockwork clock 3's
    # schedule and compute, plus one probe, one host read and one resume per reuse call: the ratio
    # of the two rows is the cost of deciding (issue 11 target: < 3% of the step time).
    python3 bench/latency.py $SD15 --backends triton --graphs both --tag adaptive \
      --policies Clockwork:clock=3 'Adaptive:threshold=1e9,reuse="clockwork",max_reuse=2' \
      'Adaptive:threshold=0.04,reuse="clockwork",max_reuse=4' 2>&1 | tee "$OUT/latency_sd15_adaptive.txt" | tail -30 ;;
  *) echo "unknown stage $STAGE (tests, kernels, sd15, graphs, compile, sdxl, adaptive)"; exit 2 ;;
esac
