#!/usr/bin/env bash
# One prepared GPU session for the kernels (issue 15): the CUDA tests at the shipped settings and the kernel
# benchmark, in one command that fits the device machine's 10-minute command limit with room to spare.
#
# Run from the repository root on the GPU machine (the `device` tool's `run`), carrying the FBGEMM peer and, for a
# machine without pytest, its wheels:
#
#   python benchmarks/kernels.py --stage-fbgemm                      # here, once: benchmarks/.peers/fbgemm_sll
#   pip download pytest -d .gpu-wheels                              # here, once (the GPU machine has no network)
#   run(command="bash benchmarks/gpu_session.sh", carry=["benchmarks/.peers", ".gpu-wheels"], timeout_s=600)
#
# Stages, each under its own time limit (seconds, overridable by environment; $PYTHON: the interpreter, default
# `python`), logs and results under $OUT:
#   A  the quick CUDA tests (QUICK_TESTS): autotuned launches, CUDA-graph capture, D = 64 at every Q, K = 64 GSU,
#      DIN D = 64, search_attend D = 64 -- a compile error, a wrong result or a register spill shows here first;
#   B  the benchmark (`benchmarks/kernels.py --max-seconds`): the goal shapes first, the JSON written after every case;
#   C  the rest of tests/kernels/test_cuda.py, until its time runs out (junit XML says which ran).
# A stage that fails or runs out of time does not stop the next one; the script exits with the first failure.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
STAGE_A_S=${STAGE_A_S:-150}
STAGE_B_S=${STAGE_B_S:-300}
STAGE_C_S=${STAGE_C_S:-110}
PY=${PYTHON:-python}  # the interpreter with torch and triton
QUICK_TESTS="autotuned or graph or (one_head and 64-) or (gsu_topk and 64-64) or (din_attention and 64-True)"
QUICK_TESTS="$QUICK_TESTS or (search_attend and 64-64)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels pytest > "$OUT/pip.log" 2>&1 \
    || echo "pytest could not be installed from .gpu-wheels (see pip.log): stages A and C will fail"
fi

status=0
run_stage() {  # name, seconds, command...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS rc
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "stage $name: rc=$rc in $((SECONDS - start)) s (limit $seconds s)"
  tail -n 15 "$OUT/$name.log"
  if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
}

run_stage A_quick_tests "$STAGE_A_S" "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py \
  -k "$QUICK_TESTS" --junitxml="$OUT/A_quick_tests.xml"
run_stage B_benchmark "$STAGE_B_S" "$PY" benchmarks/kernels.py --max-seconds $((STAGE_B_S - 30))
cp benchmarks/results/kernels-*.json "$OUT/" 2>/dev/null
run_stage C_cuda_tests "$STAGE_C_S" "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py \
  -k "not ($QUICK_TESTS)" --junitxml="$OUT/C_cuda_tests.xml"
exit "$status"
