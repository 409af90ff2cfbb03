#!/usr/bin/env bash
# What one GPU's folder of records of record lacks at today's kernels, in one device call:
#   REFRESH=decode (default; after a change to the decode kernels): the GPU tests, where a short step's time goes,
#         then the pipeline's decode grid with INT8, INT4 and paged rows (tools/records_device.sh
#         steps 2, 3 and 4; REFRESH_STEPS), what the public call costs beyond its kernels (tools/bench_decode_api.py),
#         then FlashInfer beside kvpack's paged decode (tools/peers_device.sh; carry .peers/)
#                                       -> $OUT/short_steps.json, decode.tar.gz, api.json, paged_peers_p16.json
#   REFRESH=kernels: the kernel benchmarks at 2^25 elements as kernels/ was made (tools/bench_kernels.py,
#         fp32 and 16-bit, vectorized and fast beside the torch peers)
#                                       -> $OUT/kernels_fp32.json, kernels_16bit.json
# then the logs in one archive ($OUT/logs.tar.gz). REFRESH_BUDGET (default 560 s): the peers run only
# with more than 120 s of it left.
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/refresh_records.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/refresh-records}"
L="$OUT/logs"
mkdir -p "$L"
case "${REFRESH:-decode}" in
  decode)
    STEPS=${REFRESH_STEPS:-234} SKIP_TAR=1 BUDGET=$((${REFRESH_BUDGET:-560} - 110)) E2E_RESERVE=0 bash tools/records_device.sh
    t0=$SECONDS
    timeout 90 env PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" python3 tools/bench_decode_api.py \
      --json "$OUT/api.json" 2>&1 | grep -v -E "Warning|warn" | tee "$L/bench_decode_api.log"
    echo "bench_decode_api: after $((SECONDS - t0)) s"
    if [ $((${REFRESH_BUDGET:-560} - SECONDS)) -gt 120 ]; then
      SKIP_SETUP=1 SKIP_TAR=1 BUDGET=$((${REFRESH_BUDGET:-560} - SECONDS)) bash tools/peers_device.sh
    else
      echo "peers: skipped ($((${REFRESH_BUDGET:-560} - SECONDS)) s of REFRESH_BUDGET left)"
    fi ;;
  kernels)
    . tools/device_setup.sh
    timeout 260 python3 tools/bench_kernels.py --shapes 131072x8192 131072x4096 131072x2048 131072x1024 131072x512 \
      131072x256 262144x128 --dtypes float32 --variants vectorized fast --json "$OUT/kernels_fp32.json" 2>&1 \
      | grep -v -E "Warning|warn" > "$L/bench_kernels_fp32.log"
    echo "bench_kernels fp32: exit $? after $SECONDS s"; tail -n 4 "$L/bench_kernels_fp32.log"
    timeout $((540 - SECONDS)) python3 tools/bench_kernels.py --shapes 131072x8192 131072x1024 131072x256 262144x128 \
      --dtypes float16 bfloat16 --variants vectorized fast --json "$OUT/kernels_16bit.json" 2>&1 \
      | grep -v -E "Warning|warn" > "$L/bench_kernels_16bit.log"
    echo "bench_kernels 16-bit: exit $? after $SECONDS s"; tail -n 4 "$L/bench_kernels_16bit.log" ;;
esac
echo "done after $SECONDS s"
(cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
