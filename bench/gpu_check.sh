#!/usr/bin/env bash
# One-shot check on a machine with a CUDA GPU and no internet, using the torch (and triton)
# already installed there:
#   1. builds srnn_fast._C with the CUDA kernels against that torch,
#   2. runs `python -m srnn_fast check` first (every backend against the reference on small
#      cases, seconds): the first verdict on the CUDA kernels, before anything else can fail,
#   3. logs the CUDA kernels' registers, spills and shared memory (srnn_fast.cuda_resources),
#   4. runs the GPU tests (cuda and triton backends; they must not skip),
#   5. runs bench/run.py on the task shapes on the GPU,
#   6. runs the rest of the test suite (the CUDA cases on the CPU harness cuda_sim included),
# writing logs and JSON into OUTDIR, and prints a short table last. A failing step is
# logged and the next one still runs; the exit status is non-zero if any step failed.
# The whole script keeps to a time budget (GPU_CHECK_BUDGET_S, default 460 s); steps
# past the budget are reported as skipped.
#
# Usage: bash bench/gpu_check.sh OUTDIR
#   env: PYTHON (default python), SRNN_FAST_CUDA_ARCHS (default 9.0), GPU_CHECK_BUDGET_S
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-460}
export PYTHONUNBUFFERED=1
export SRNN_FAST_REQUIRE_CUDA=1  # tests/test_cuda.py fails instead of skipping if the kernels are missing
export SRNN_FAST_REQUIRE_CPP=1  # the cpp suites fail instead of skipping if srnn_fast._C does not load
start=$SECONDS
names=() statuses=() times=()

# run_step NAME MAX_SECONDS CMD...: runs CMD with its output in OUT/NAME.log (and on screen),
# limited to MAX_SECONDS and to what is left of the budget.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc status
  if ((limit < 10)); then
    status="SKIPPED (budget spent)"
  else
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status="TIMEOUT after ${limit}s" ;;
      *) status="FAILED (exit $rc)" ;;
    esac
  fi
  names+=("$name") statuses+=("$status") times+=($((SECONDS - t0)))
}

run_step env 30 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -2"

# Objects compiled against another torch must not be reused.
rm -rf build srnn_fast/_C*.so
export SRNN_FAST_BUILD_CUDA=1 SRNN_FAST_CUDA_ARCHS="${SRNN_FAST_CUDA_ARCHS:-9.0}" MAX_JOBS="$(nproc)"
# An in-place build is the fallback where pip cannot do an editable install offline.
run_step build 200 bash -c "$PY -m pip install --no-deps --no-build-isolation --no-index -e . ||
  { echo 'pip install -e . failed; building in place instead'; $PY setup.py build_ext --inplace; }"

run_step check 60 $PY -m srnn_fast check

run_step import 60 $PY -c "
import torch, srnn_fast, srnn_fast._C
for op in ('scan_fwd', 'scan_bwd'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('srnn_fast::' + op, 'CUDA'), op + ' has no CUDA kernel'
print('backends:', srnn_fast.available_backends())"

run_step resources 60 $PY -m srnn_fast.cuda_resources

# GPU tests first, in their own step, so that nothing else can starve or stop them.
run_step gpu_tests 150 $PY -m pytest tests/test_cuda.py tests/test_triton.py -q -rs -p no:cacheprovider \
  -k "not cuda_sim"

run_step bench 150 $PY bench/run.py --device cuda --out "$OUT"

run_step tests 150 $PY -m pytest tests -q -rs -p no:cacheprovider -m "not gpu" --ignore=tests/test_triton.py

failed=0
for st in "${statuses[@]}"; do [ "$st" = ok ] || failed=1; done
last_line() { grep -E "[0-9]+ (passed|failed|skipped)" "$OUT/$1.log" 2>/dev/null | tail -1; }
{
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | ---: |"
  for i in "${!names[@]}"; do
    echo "| ${names[$i]} | ${statuses[$i]} | ${times[$i]} |"
  done
  echo
  echo "gpu_tests: $(last_line gpu_tests)"
  echo "tests:     $(last_line tests)"
  echo "total $((SECONDS - start)) s; logs and JSON in $OUT"
} | tee "$OUT/summary.md"
exit $failed
