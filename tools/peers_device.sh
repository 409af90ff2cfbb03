#!/usr/bin/env bash
# Issue 18's peer in one device call: kvpack's paged INT8 decode beside FlashInfer's paged decode
# (FA2 and XQA, fp16 and fp8 pages) and torch SDPA, in one job (tools/bench_paged_peers.py).
# FlashInfer comes from the offline bundle that ../shared/peers/flashinfer.sh makes; put it in .peers/
# (gitignored) and carry it: run(..., carry=[".whl", ".peers"]).
#   1. build the extension (tools/device_setup.sh)                         -> $OUT/logs: build.log
#   2. install the bundle into /tmp/site (FlashInfer compiles its kernels on first use)
#   3. tools/bench_paged_peers.py at page size 16 (PEER_PAGE_SIZES)         -> $OUT/paged_peers_p16.json
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/peers_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/peers-device}"
BUDGET="${BUDGET:-570}"
L="$OUT/logs"
mkdir -p "$L"
left() { echo $((BUDGET - SECONDS)); }
if [ -n "${SKIP_SETUP:-}" ]; then  # after tools/records_device.sh in the same call: its wheels and build are there
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  . tools/device_setup.sh
fi
if ls .peers/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peers/apache_tvm_ffi-*.whl > "$L/peers_pip.log" 2>&1
  tar -xJf .peers/flashinfer.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1 | tee -a "$L/env.txt"
else
  echo "no FlashInfer bundle in .peers/: its rows are recorded as skipped" | tee -a "$L/env.txt"
fi
for P in ${PEER_PAGE_SIZES:-16}; do
  t0=$SECONDS
  python3 tools/bench_paged_peers.py --page-size "$P" --json "$OUT/paged_peers_p$P.json" --time-limit "$(($(left) - 60))" \
    2>&1 | grep -v -E "Warning|^  warnings" | tee "$L/bench_paged_peers_p$P.log"
  echo "bench_paged_peers P=$P: after $((SECONDS - t0)) s"
done
[ -n "${SKIP_TAR:-}" ] || (cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
