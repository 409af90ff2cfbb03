#!/usr/bin/env bash
# Issue 18's GPU half in one device call, on a machine with a CUDA device:
#   1. build the extension                                                   -> $OUT/logs: build.log
#   2. GPU tests: decode attention (no-sync default, clamping flag), the paged
#      cache (paged == contiguous, graph capture), kvpack.hf (compiled generate) -> pytest_gpu.log
#   3. compute-sanitizer memcheck and racecheck over the KV cache kernels,
#      the paged ones included (tools/sanitize_kernels.py --decode)           -> sanitizer.log, racecheck.log
#   4. tools/bench_decode.py at the issue's points with the paged kernel at page
#      sizes 16, 64 and 256 beside the contiguous kernel and every SDPA backend -> $OUT/decode_paged.json
# then the logs in one archive ($OUT/logs.tar.gz). Every step runs even when an earlier one failed.
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/paged_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/paged-device}"
L="$OUT/logs"
mkdir -p "$L"
. tools/device_setup.sh  # wheels, $SAN, env.txt, the build
t0=$SECONDS
timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_decode_attention.py tests/test_paged.py \
  tests/test_hf.py > "$L/pytest_gpu.log" 2>&1
echo "pytest -m gpu (decode, paged, hf): exit $? after $((SECONDS - t0)) s: $(tail -1 "$L/pytest_gpu.log")"
grep -E "^(FAILED|ERROR)" "$L/pytest_gpu.log" | head -20
sanitize_decode 150 120
t0=$SECONDS
timeout 200 python3 tools/bench_decode.py --no-append --page-sizes 16 64 256 --json "$OUT/decode_paged.json" \
  --points 4096x1x32x8x128 32768x1x32x8x128 32768x8x32x8x128 32768x8x32x32x128 32768x32x32x8x128 \
  131072x1x32x32x128 4096x8x32x8x128 2>&1 | grep -v -E "Warning|^  warnings" | tee "$L/bench_decode_paged.log"
echo "bench_decode: after $((SECONDS - t0)) s"
echo "done after $SECONDS s"
(cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
