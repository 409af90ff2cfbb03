#!/usr/bin/env bash
# Issue 17's GPU half in one device call, on a machine with a CUDA device:
#   1. build the extension                                                   -> $OUT/logs: build.log
#   2. GPU tests: the INT4 cache (kernel against float64, append bit-exact with the
#      CPU, CUDA graph, no sync, clamping, opcheck), the INT8 decode and paged
#      tests (the kernels share their header), kvpack.hf with bits=4         -> pytest_gpu.log
#   3. tools/bench_decode.py: INT4 beside INT8 and every SDPA backend at the
#      issue's points, the copy bandwidth of the same job                    -> $OUT/decode_int4.json
#   4. compute-sanitizer memcheck and racecheck over the KV cache kernels,
#      INT4 included (tools/sanitize_kernels.py --decode)                    -> sanitizer.log, racecheck.log
# then the logs in one archive ($OUT/logs.tar.gz). Every step runs even when an earlier one failed.
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/int4_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/int4-device}"
L="$OUT/logs"
mkdir -p "$L"
. tools/device_setup.sh  # wheels, $SAN, env.txt, the build
t0=$SECONDS
timeout "${TEST_BUDGET:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_int4.py \
  tests/test_decode_attention.py tests/test_paged.py tests/test_hf.py > "$L/pytest_gpu.log" 2>&1
echo "pytest -m gpu (int4, decode, paged, hf): exit $? after $((SECONDS - t0)) s: $(tail -1 "$L/pytest_gpu.log")"
grep -E "^(FAILED|ERROR)" "$L/pytest_gpu.log" | head -20
t0=$SECONDS
timeout "${BENCH_BUDGET:-200}" python3 tools/bench_decode.py --no-append --json "$OUT/decode_int4.json" \
  --points ${POINTS:-4096x1x32x8x128 32768x1x32x8x128 32768x8x32x8x128 32768x8x32x32x128 32768x32x32x8x128 \
  32768x32x32x32x128 131072x1x32x32x128 4096x8x32x8x128} 2>&1 | grep -v -E "Warning|^  warnings" \
  | tee "$L/bench_decode_int4.log"
echo "bench_decode: after $((SECONDS - t0)) s"
[ "${SANITIZE:-1}" = 1 ] && sanitize_decode 200 150
echo "done after $SECONDS s"
(cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
