#!/usr/bin/env bash
# The end-to-end work of issue 16 in one device call, on a machine with a CUDA device:
#   0. wheels carried in .whl/ (transformers and what it needs, HQQ), when present  -> /tmp/site
#   1. build the extension                                                          -> $OUT/build.log
#   2. the GPU tests of kvpack.hf (generate() eager, compiled, hand-captured graph;
#      a decode step that never syncs)                                              -> $OUT/pytest_gpu_hf.log
#   3. tools/bench_e2e.py at the goal points (T=32768 B=8, T=4096 B=1) and the largest
#      batch of each graph method at T=32768, all in one job            -> $OUT/e2e/llama-3.1-8b_goals.json
#   4. tools/profile_e2e_step.py: the graphed step of kvpack and fp16 by kernel kind
#                                                                       -> $OUT/e2e/llama-3.1-8b_profile.json
#   5. tools/bench_e2e.py at the rest of the grid, while time is left   -> $OUT/e2e/llama-3.1-8b_grid.json
# then the logs in one archive ($OUT/logs.tar.gz: the device tool returns at most 8 files).
# Every step runs even when an earlier one failed. BUDGET: seconds the whole script may take
# (default 560); steps 3 and 5 start no method after it (tools/bench_e2e.py --time-limit).
#
#   OUT=/some/dir KVPACK_GIT_COMMIT=<the commit, written out> bash tools/e2e_device.sh
#   (the commit as `git rev-parse HEAD` prints it where the tree was committed: a GPU box's copy of .git
#   may be an older snapshot, and its own `git rev-parse HEAD` would name that one)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/e2e-device}"
BUDGET="${BUDGET:-560}"
mkdir -p "$OUT"
left() { echo $((BUDGET - SECONDS)); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import transformers, huggingface_hub" >> "$OUT/pip.log" 2>&1; then
    echo "the carried transformers does not import (pip.log): using the machine's" | tee -a "$OUT/pip.log"
    mkdir -p /tmp/site_hqq && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_hqq \
      .whl/hqq-*.whl .whl/termcolor-*.whl >> "$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site_hqq
  fi
fi
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python3 -c "import hqq; print('hqq', hqq.__version__)" 2>&1 | tail -1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
} 2>&1 | tee "$OUT/env.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) DN=h200 ;; *H100*) DN=h100 ;; *) DN=$(echo "$GPU" | tr 'A-Z ' 'a-z-') ;; esac

t0=$SECONDS; python3 -m kvpack.build --verbose --out "$OUT/build-info.json" > "$OUT/build.log" 2>&1
echo "build: exit $? after $((SECONDS - t0)) s"
t0=$SECONDS; timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf.py > "$OUT/pytest_gpu_hf.log" 2>&1
echo "pytest -m gpu tests/test_hf.py: exit $? after $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_gpu_hf.log")"

ALL="kvpack_token_graph fp16_graph kvpack_channel_graph static_sdpa_compiled dynamic_sdpa quantized_hqq_int8 \
quantized_fp8 kvpack_token_eager kvpack_channel_eager"
python3 tools/bench_e2e.py --points 32768x8 4096x1 --methods $ALL --compiled-points 32768x8 4096x1 \
  --capacity-T 32768 --out "$OUT/e2e" --name goals --device-name "$DN" --time-limit "$(($(left) - 200))" \
  2>&1 | tee "$OUT/bench_e2e_goals.log"
timeout $(($(left) - 100)) python3 tools/profile_e2e_step.py --points 32768x8 4096x1 --device-name "$DN" \
  --out "$OUT/e2e/llama-3.1-8b_profile.json" 2>&1 | tee "$OUT/profile_e2e.log"
if [ "$(left)" -gt 60 ]; then
  python3 tools/bench_e2e.py --points 4096x8 32768x1 4096x32 32768x32 --methods ${ALL/static_sdpa_compiled /} \
    --compiled-points --capacity-T --out "$OUT/e2e" --name grid --device-name "$DN" --time-limit "$(($(left) - 40))" \
    2>&1 | tee "$OUT/bench_e2e_grid.log"
fi
echo "done after $SECONDS s"
(cd "$OUT" && tar czf logs.tar.gz --remove-files ./*.log ./*.txt ./*.json 2>/dev/null)
