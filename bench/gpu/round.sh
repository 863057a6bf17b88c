#!/usr/bin/env bash
# frkern's GPU round: everything it measures on a lent GPU, in ONE device command of under 10 minutes.
#
#   bash bench/gpu/round.sh          # on the GPU machine: results in $OUT (8 files)
#   bash bench/gpu/round.sh --cpu    # dry run on a CPU, same stages on tiny workloads (tests/test_gpu_round.py)
#
# Stages, in order, each with a time budget that is its timeout; one deadline for the round (560 s
# after this script starts on the GPU, ROUND_DEADLINE_S to change it). A stage that would start
# with less than its budget left is skipped and recorded as skipped.
#   setup      here: the carried wheels in .whl/ (diffusers 0.42.1, deepcache 0.1.1: what the GPU
#              image lacks) and frkern itself, installed with pip --target into a temp dir, which
#              is all that goes on PYTHONPATH. The source tree never does: its kernels/ (installed
#              as frkern.kernels) would be importable as a top-level `kernels` module, a name
#              diffusers probes for. Every Python command runs with -P (no script dir or cwd on sys.path).
#   preflight  bench/gpu/preflight.py, ~20-30 s: custom ops on Triton, the ops in one CUDA graph, a
#              patched UNet under cuda_graphs=True. A failure stops the round (exit 1).
#   tests      pytest on the GPU: kernel, CUDA-graph and compile tests
#   kernels    bench/kernel_bench.py at SD1.5 shapes (fused kernels vs unfused, the cache codec, the
#              compressed cache's consumers: norm2 decoding int8 / fp8, x + int8 branch, the keyframe's
#              norm2 encoding int8), with --time-budget 100 (20 s inside the stage's 120 s): past it
#              nothing more is timed and the rows measured are kept (Skip-Convolution's, timed last,
#              are cut first)
#   latency    bench/latency.py, SD1.5 fp16 batch 2 (CFG), 50 steps: eager, eager in one CUDA graph,
#              the deepcache package, frkern NoReuse / FRDiff M=3 + score mixing / Clockwork /
#              DeepCache / Adaptive / SkipConv with kernels + CUDA graphs, each checked against its eager run
#   compile    bench/latency.py: torch.compile + CUDA graph (reduce-overhead) against eager
# then summary.md (bench/gpu/summarize.py): every stage, each issue-3 target met / missed / not measured.
# The stages after setup are run by bench/gpu/round.py, which holds their command lines and budgets.
#
# Files in $OUT: env.txt (environment, setup log, one line per stage), preflight.log, tests.log,
# bench.log (kernels, latency, compile output), kernels.csv, latency.json, compile.json, summary.md.
# Exit status: 0 every stage ok; 1 setup or preflight failed (round stopped early); 2 usage;
# 3 a later stage failed, timed out or was skipped for time.
#
# Wheels (here, once; .whl/ is git-ignored, so the device call must carry it):
#   python3 -m pip download diffusers==0.42.1 deepcache==0.1.1 --no-deps -d .whl
# Device call: command `bash bench/gpu/round.sh`, carry [".whl"], timeout_s 600 (CONTRIBUTING.md).
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu/round.sh [--cpu]" >&2; exit 2 ;;
esac
START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/bench/results/local/round}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/frkern_round.XXXXXX") || exit 2
SITE=$WORK/site
SETUP_BUDGET=90
[[ $MODE == cpu ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PIP=(timeout "$SETUP_BUDGET" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
     --disable-pip-version-check --target "$SITE")

setup() {
  if [[ $MODE == cpu ]]; then
    echo "dry run: no wheels installed (this environment has diffusers and deepcache)"
  elif compgen -G ".whl/*.whl" >/dev/null; then
    echo "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    "${PIP[@]}" .whl/*.whl || { echo "pip could not install the carried wheels"; return 1; }
  else
    echo "no wheels in .whl/ (carry them: bench/gpu/round.sh's header)"
  fi
  # frkern as a wheel (setuptools maps kernels/ to frkern.kernels), built from a copy of the tree
  mkdir -p "$WORK/src" && cp -r pyproject.toml README.md frkern kernels "$WORK/src/" || return 1
  if ! "${PIP[@]}" --no-build-isolation "$WORK/src"; then
    # no usable setuptools there: lay the package out as pyproject.toml's package-dir does
    echo "pip could not build frkern: copying frkern/ and kernels/ (as frkern/kernels) instead"
    rm -rf "$SITE/frkern" && cp -r frkern "$SITE/frkern" && cp -r kernels "$SITE/frkern/kernels" || return 1
  fi
  PYTHONPATH=$SITE "$PY" -P -c '
import importlib.util as u, sys
missing = [m for m in ("torch", "triton", "diffusers", "frkern") if u.find_spec(m) is None]
print("importable:", ", ".join(m for m in ("torch", "triton", "diffusers", "DeepCache", "frkern") if u.find_spec(m)))
sys.exit("missing: " + ", ".join(missing) if missing else 0)'
}

echo "[round] $MODE round, results in $OUT"
setup >"$WORK/setup.log" 2>&1
SETUP_RC=$?
SETUP_STATUS=ok
[[ $SETUP_RC == 0 ]] || SETUP_STATUS=failed
echo "[round] setup: $SETUP_STATUS ($(( $(date +%s) - START )) s)"
[[ $SETUP_RC == 0 ]] || cat "$WORK/setup.log"

export PYTHONPATH=$SITE
export PYTHONSAFEPATH=1  # -P for every Python process, the ones tools start too (pytest-xdist workers run `python -c`)
"$PY" -P bench/gpu/round.py --mode "$MODE" --out "$OUT" --work "$WORK" --start "$START" \
  --setup "$SETUP_STATUS:$(( $(date +%s) - START )):$SETUP_BUDGET"
RC=$?
if [[ ! -s $OUT/summary.md ]]; then  # the driver itself failed before its first summary
  echo "# GPU round summary" >"$OUT/summary.md"
  echo "Result: STOPPED EARLY: bench/gpu/round.py exited $RC before writing a summary (see the command's output)" >>"$OUT/summary.md"
  RC=1
fi
rm -rf "$WORK"
echo "[round] exit $RC"
exit $RC
