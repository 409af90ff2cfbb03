#!/usr/bin/env bash
# The GPU check of the CUDA kernels in one command, on a machine with a CUDA device, from anywhere:
#   1. build the extension (python3 -m kvpack.build --verbose)              -> $OUT/build.log
#   2. ptxas registers/spills + SASS vector accesses of the fast kernels    -> $OUT/ptxas_fast.log
#   3. the GPU tests (pytest -m gpu tests/test_cuda_ops.py)                 -> $OUT/pytest_gpu.log
#      if pytest crashes (killed by a signal: exit >= 128), the crashing test again under cuda-gdb
#      (gdb if no cuda-gdb) for a backtrace                                 -> $OUT/crash_backtrace.log
#   4. compute-sanitizer memcheck over tools/sanitize_kernels.py            -> $OUT/sanitizer.log
#   5. compute-sanitizer racecheck over the shared-memory kernels (tiled, per-channel scales)
#                                                                           -> $OUT/racecheck.log
# then a summary. Every step runs even when an earlier one failed; the exit status is non-zero if
# any failed. OUT defaults to build/gpu-check; PYTHON to python3.
#
#   OUT=/some/dir bash tools/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

declare -a STEPS=()
declare -A RC=()

# step NAME LOG CMD...: run CMD, tee its output to $OUT/LOG, record its exit status.
step() {
  local name=$1 log=$2
  shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  STEPS+=("$name")
  RC[$name]=$rc
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

missing() { echo "$1"; return 1; }

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("no CUDA device visible to torch")
EOF
ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)

step build build.log "$PY" -m kvpack.build --verbose --out "$OUT/build-info.json"
step ptxas ptxas_fast.log "$PY" tools/check_cuda_compile.py --arch "$ARCH" --sass --jobs 1 \
  --log-dir "$OUT/cuda-compile" kernels/quantize_fast.cu
step pytest pytest_gpu.log "$PY" -m pytest -m gpu tests/test_cuda_ops.py tests/test_api_cuda.py \
  tests/test_decode_attention.py tests/test_hf.py -q -x --no-header -p no:cacheprovider --durations=8
# A crash (segfault, abort: exit 128 + signal) gives no Python traceback worth having: rerun the
# test that crashed (named by faulthandler's dump, most recent frame first) under the debugger.
if [ "${RC[pytest]}" -ge 128 ] || grep -q "Fatal Python error" "$OUT/pytest_gpu.log"; then
  CRASHED=$(sed -n '/Fatal Python error/,$p' "$OUT/pytest_gpu.log" | grep -oE 'test_cuda_ops\.py", line [0-9]+ in test_[A-Za-z0-9_]+' \
            | head -1 | grep -oE 'test_[A-Za-z0-9_]+$')
  DBG=$(command -v cuda-gdb || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb" ] && echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb"; } \
        || { [ -x /usr/local/cuda/bin/cuda-gdb ] && echo /usr/local/cuda/bin/cuda-gdb; } || command -v gdb || true)
  echo "=== crash: test ${CRASHED:-?}; debugger ${DBG:-none}"
  if [ -n "$DBG" ]; then
    step crash_backtrace crash_backtrace.log timeout 1800 "$DBG" -batch -ex "set pagination off" \
      -ex run -ex bt -ex "info sharedlibrary kvpack" -ex "thread apply all bt 12" \
      --args "$PY" -X faulthandler -m pytest -m gpu tests/test_cuda_ops.py -q -x --no-header \
      -p no:cacheprovider ${CRASHED:+-k "$CRASHED"}
  else
    echo "=== crash: no cuda-gdb or gdb found; see the faulthandler dump in $OUT/pytest_gpu.log"
  fi
fi
if SAN=$(find_sanitizer); then
  # No caching allocator: every tensor is its own allocation, so overruns fall outside any of them.
  step memcheck sanitizer.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" tools/sanitize_kernels.py
  step racecheck racecheck.log "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" tools/sanitize_kernels.py --variants tiled --dtypes fp32,fp16
  # The KV cache kernels: decode attention (shared-memory merges), the write path (cross-block counter).
  step memcheck_decode sanitizer_decode.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" tools/sanitize_kernels.py --decode
  step racecheck_decode racecheck_decode.log "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" tools/sanitize_kernels.py --decode
else
  step memcheck sanitizer.log missing "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
fi

echo
echo "=== summary ($OUT)"
status=0
for s in "${STEPS[@]}"; do
  printf '  %-18s %s\n' "$s" "$([ "${RC[$s]}" -eq 0 ] && echo ok || echo "FAILED (exit ${RC[$s]})")"
  [ "${RC[$s]}" -eq 0 ] || status=1
done
for log in pytest_gpu.log; do
  echo "  $log: $(grep -E '[0-9]+ (passed|failed|error|skipped)' "$OUT/$log" | tail -1)"
done
[ -f "$OUT/crash_backtrace.log" ] && echo "  crash_backtrace.log: $(grep -m1 -E '^#0 ' "$OUT/crash_backtrace.log")"
for log in sanitizer.log racecheck.log sanitizer_decode.log racecheck_decode.log; do
  [ -f "$OUT/$log" ] && echo "  $log: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|not found' "$OUT/$log" | tail -1)"
done
echo "  ptxas:     $(grep -E '^(OK|FAIL) +kernels/quantize_fast.cu' "$OUT/ptxas_fast.log" | tail -1)"
exit $status
