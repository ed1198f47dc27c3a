#!/usr/bin/env bash
# One call on a lent GPU machine: build with the CUDA module (sm_90), run the CUDA tests, run
# compute-sanitizer (memcheck) over the CUDA kernel tests, then the GPU benchmarks (fake quant,
# calibration). Logs and
# results go under $OUT (default /tmp/pyquant-gpu). Usage: bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyquant-gpu}
mkdir -p "$OUT"
export PYQUANT_CUDA=ON CUDAARCHS=${CUDAARCHS:-90} PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; }

step "build"
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import pyquant, json; print(json.dumps(pyquant.native_info()))" | tee "$OUT/native_info.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "CUDA tests"
python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/tests_cuda.log" | tail -5
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

step "compute-sanitizer memcheck"
compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x -m cuda -p no:cacheprovider \
  tests/test_fake_quant.py tests/test_stats_kernels.py \
  -k "forward_matches_reference and float32 and per_ or backward_matches or large or minmax_and_histogram or search or entropy" \
  >"$OUT/memcheck.log" 2>&1
rc=$?; tail -3 "$OUT/memcheck.log"; [[ $rc -eq 0 ]] || { echo "memcheck failed ($rc)"; status=1; }

step "benchmarks"
python3 -m bench.fake_quant --device cuda ${1:-} --out "$OUT" 2>&1 | tail -20
python3 -m bench.calibration_cuda ${1:-} --out "$OUT" 2>&1 | tail -12
exit $status
