#!/usr/bin/env bash
# One GPU's decode records with today's kernels in one device call (issues 17 and 18):
#   1. build the extension                                                   -> $OUT/logs: build.log
#   2. GPU tests: INT4, INT8 decode, paged, kvpack.hf                        -> pytest_gpu.log
#   6. (STEPS with 6) compute-sanitizer memcheck and racecheck over the KV cache kernels
#      (tools/sanitize_kernels.py --decode)                                  -> sanitizer.log, racecheck.log
#   3. tools/lab/short_steps.py: where a short step's time goes (per kernel,
#      per split count) at B = 1 GQA, T = 4096 and 32768                     -> $OUT/short_steps.json
#   4. tools/decode_grid.py: the pipeline's decode grid (fp16 SDPA, INT8, INT4, paged rows,
#      the append), records as the workflow writes them                      -> $OUT/decode.tar.gz
#   5. tools/bench_e2e.py: kvpack_int4_graph beside INT8 and fp16 graphs at the
#      e2e goal points, while time is left                                   -> $OUT/e2e/*_int4.json
# then the logs in one archive ($OUT/logs.tar.gz). Every step runs even when an earlier one failed.
# BUDGET: seconds the whole script may take (default 570). STEPS: which of 2-6 to run, in the order 2 6 3 4 5
# (default 2345).
# SKIP_TAR=1 leaves the logs unpacked (tools/peers_device.sh with SKIP_SETUP=1 may follow in the same call).
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/records_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/records-device}"
BUDGET="${BUDGET:-570}"
STEPS="${STEPS:-2345}"
L="$OUT/logs"
mkdir -p "$L"
left() { echo $((BUDGET - SECONDS)); }
. tools/device_setup.sh  # wheels, $SAN, env.txt, the build
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) DN=h200 ;; *H100*) DN=h100 ;; *) DN=$(echo "$GPU" | tr 'A-Z ' 'a-z-') ;; esac
if [[ $STEPS == *2* ]]; then
  t0=$SECONDS
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_int4.py tests/test_decode_attention.py \
    tests/test_paged.py tests/test_hf.py > "$L/pytest_gpu.log" 2>&1
  echo "pytest -m gpu (int4, decode, paged, hf): exit $? after $((SECONDS - t0)) s: $(tail -1 "$L/pytest_gpu.log")"
  grep -E "^(FAILED|ERROR)" "$L/pytest_gpu.log" | head -20
fi
if [[ $STEPS == *6* ]]; then sanitize_decode 120 150; fi
if [[ $STEPS == *3* ]]; then
  t0=$SECONDS
  timeout 120 python3 tools/lab/short_steps.py --json "$OUT/short_steps.json" 2>&1 | grep -v -E "Warning|warn" \
    | tee "$L/short_steps.log"
  echo "short_steps: after $((SECONDS - t0)) s"
fi
if [[ $STEPS == *4* ]]; then
  t0=$SECONDS
  lim=$(($(left) - ${E2E_RESERVE:-110}))
  python3 tools/decode_grid.py --out "$OUT/grid" --device-name "$DN" --time-limit "$lim" ${GRID_POINTS:+--points $GRID_POINTS} \
    2>&1 | grep -v -E "Warning|^  warnings" | tee "$L/decode_grid.log"
  echo "decode_grid: after $((SECONDS - t0)) s"
  (cd "$OUT/grid" && tar czf ../decode.tar.gz decode) && rm -rf "$OUT/grid"
fi
if [[ $STEPS == *5* ]] && [ "$(left)" -gt 50 ]; then
  t0=$SECONDS
  python3 tools/bench_e2e.py --points 32768x8 4096x1 --methods kvpack_int4_graph kvpack_token_graph fp16_graph \
    --compiled-points --capacity-T --out "$OUT/e2e" --name int4 --device-name "$DN" --time-limit "$(($(left) - 30))" \
    2>&1 | grep -v -E "Warning|^  warnings" | tee "$L/bench_e2e_int4.log"
  echo "bench_e2e int4: after $((SECONDS - t0)) s"
fi
echo "done after $SECONDS s"
[ -n "${SKIP_TAR:-}" ] || (cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
