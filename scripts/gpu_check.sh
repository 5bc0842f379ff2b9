#!/usr/bin/env bash
# Everything that needs a GPU, in one go: build the CUDA extension, run the GPU tests, the benchmarks and an
# overlap smoke run. Logs and the benchmark JSON go to $OUT (default: ./.out).
#   scripts/gpu_check.sh [build] [tests] [bench] [overlap]     (no argument: all four)
# Env: ARCH (CUDA arch, default 90a), PYTEST_ARGS (extra pytest args, e.g. "-k decode"), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests bench overlap)
status=0
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
step() {  # step NAME CMD...: run, tee to $OUT/NAME.log, remember failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc=$rc)"; status=1; }
  return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if want build; then
  step build $PY -m pip install --no-build-isolation --no-deps -e . \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="${ARCH:-90a}" -C build.verbose=false || exit 1
fi
export PYTHONUNBUFFERED=1
if want tests; then
  step gpu_tests $PY -m pytest tests -m gpu -q --timeout=600 -p no:cacheprovider ${PYTEST_ARGS:-}
fi
if want bench; then
  step bench $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" \
    --benchmark-columns=median,rounds ${BENCH_ARGS:-} \
    && $PY scripts/bench_table.py "$OUT/bench.json" | tee "$OUT/bench_table.md"
fi
if want overlap; then
  step overlap $PY -m mpskern.overlap --kernel attn --ctx 512 --json "$OUT/overlap.json"
fi
exit $status
