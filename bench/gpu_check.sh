#!/usr/bin/env bash
# One call on a lent GPU machine: build with the CUDA module (sm_90), run the CUDA tests, run
# compute-sanitizer (memcheck, then racecheck on the kernels with shared memory) over the CUDA kernel
# tests, then the GPU benchmarks (fake quant,
# calibration, AdaRound per layer-iteration, QAT step vs FP32 on MobileNetV2). Every step has a
# time limit so that one slow step cannot eat the others. Logs and results go under $OUT
# (default /tmp/pyquant-gpu). Usage: bash bench/gpu_check.sh [--quick]; TEST_PATHS, SKIP_MEMCHECK=1,
# SKIP_RACECHECK=1 and BENCHES="fake_quant qat" narrow a rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyquant-gpu}
mkdir -p "$OUT"
export PYQUANT_CUDA=ON CUDAARCHS=${CUDAARCHS:-90} PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
status=0
step() { echo "== $* ($(date +%T))"; }
# pytest-xdist spreads the CUDA tests over processes when the machine has it
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

step "build"
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import pyquant, json, torch; print(torch.__version__, json.dumps(pyquant.native_info()))" | tee "$OUT/native_info.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "CUDA tests"
timeout ${TEST_LIMIT:-240} python3 -m pytest -q -m cuda -p no:cacheprovider $XDIST ${TEST_PATHS:-tests} 2>&1 | tee "$OUT/tests_cuda.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

step "compute-sanitizer memcheck"
[[ -n ${SKIP_MEMCHECK:-} ]] && echo "skipped" || timeout ${MEMCHECK_LIMIT:-150} compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -m cuda -p no:cacheprovider \
  $(ls tests/test_fake_quant.py tests/test_stats_kernels.py tests/test_adaround_kernels.py 2>/dev/null) \
  -k "forward_matches_reference and float32 and per_ or backward_matches or fused_activation or large or minmax_and_histogram or search or entropy or adaround" \
  >"$OUT/memcheck.log" 2>&1
rc=$?; [[ -n ${SKIP_MEMCHECK:-} ]] || { grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3; [[ $rc -eq 0 ]] || { echo "memcheck failed ($rc)"; status=1; }; }

# Shared-memory hazards (block histograms, min/max and gradient reductions, the search sums): racecheck
# is slower than memcheck, so it runs the float32 cases of those kernels only.
step "compute-sanitizer racecheck"
[[ -n ${SKIP_RACECHECK:-} ]] && echo "skipped" || timeout ${RACECHECK_LIMIT:-150} compute-sanitizer --tool racecheck --error-exitcode 4 python3 -m pytest -q -m cuda -p no:cacheprovider \
  $(ls tests/test_fake_quant.py tests/test_stats_kernels.py tests/test_adaround_kernels.py 2>/dev/null) \
  -k "(backward_matches or minmax_and_histogram or search or entropy or regularizer) and not float16" \
  >"$OUT/racecheck.log" 2>&1
rc=$?; [[ -n ${SKIP_RACECHECK:-} ]] || { grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3; [[ $rc -eq 0 ]] || { echo "racecheck failed ($rc)"; status=1; }; }

step "benchmarks"
for b in ${BENCHES:-fake_quant calibration_cuda adaround_gpu qat}; do
  extra=""; [[ $b == fake_quant || $b == qat ]] && extra="--device cuda"
  [[ $b == adaround_gpu ]] && extra="--iterations 500 --layers 6"
  timeout ${BENCH_LIMIT:-120} python3 -m bench.$b $extra ${1:-} --out "$OUT" 2>&1 | tail -14
done
step "done (status $status)"
exit $status
