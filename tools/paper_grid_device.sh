#!/usr/bin/env bash
# One GPU's paper grid of record (`benchmark/`, `accuracy/`: config/config.yaml + config/paper.yaml)
# over as many device calls as it takes (its serial CPU baselines alone take minutes):
#   1. build the extension; in the first call only (no records yet), the quantize kernels' GPU
#      tests (tests/test_cuda_ops.py)                                       -> $OUT/logs: pytest_gpu.log
#   2. kvpack.pipeline.runner --stages benchmark accuracy into .device/paper/, skipping the records
#      already there and stopping before BUDGET                             -> runner.log
#   3. the whole of .device/paper/ back                                     -> $OUT/paper.tar.gz
# A later call resumes where the last stopped: unpack the last paper.tar.gz into .device/ here and
# carry `.device/paper` (gitignored). BUDGET: seconds the whole script may take (default 560).
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/paper_grid_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/paper-grid}"
BUDGET="${BUDGET:-560}"
L="$OUT/logs"
mkdir -p "$L" .device/paper
. tools/device_setup.sh  # wheels, $SAN, env.txt, the build
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) DN=h200 ;; *H100*) DN=h100 ;; *) DN=$(echo "$GPU" | tr 'A-Z ' 'a-z-') ;; esac
if [ -z "$(find .device/paper -name '*.json' | head -1)" ]; then
  t0=$SECONDS
  timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_ops.py > "$L/pytest_gpu.log" 2>&1
  echo "pytest -m gpu (quantize kernels): exit $? after $((SECONDS - t0)) s: $(tail -1 "$L/pytest_gpu.log")"
fi
before=$(find .device/paper -name '*.json' | wc -l)
t0=$SECONDS
# the runner starts no job predicted to end after its limit; the timeout is for a prediction that was
# wrong: a killed job loses only its own record, and the archive below still comes back
left=$((BUDGET - SECONDS))
timeout $((left - 10)) python3 -m kvpack.pipeline.runner --configfile config/config.yaml --configfile config/paper.yaml \
  --stages benchmark accuracy --results .device/paper --device-name "$DN" --time-limit $((left - 30)) \
  2>&1 | grep -v -E "Warning|warn" >> "$L/runner.log"
echo "runner: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s; records $before -> $(find .device/paper -name '*.json' | wc -l)"
tail -n 5 "$L/runner.log"
tar czf "$OUT/paper.tar.gz" -C .device paper
(cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
echo "done after $SECONDS s"
