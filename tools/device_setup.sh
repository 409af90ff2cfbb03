# Sourced by the device scripts (paged_device.sh, int4_device.sh, records_device.sh, ...) once
# they set $L, their log folder: installs the carried wheels (.whl/, if any) into /tmp/site, on PYTHONPATH;
# finds compute-sanitizer ($SAN, or empty), defines sanitize_decode (below), writes the machine's
# versions to $L/env.txt and builds the extension ($L/build.log, $L/build-info.json).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$L/pip.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "compute-sanitizer: ${SAN:-none}"
} 2>&1 | tee "$L/env.txt"
t0=$SECONDS; python3 -m kvpack.build --verbose --out "$L/build-info.json" > "$L/build.log" 2>&1
echo "build: exit $? after $((SECONDS - t0)) s"

# compute-sanitizer memcheck, then racecheck, over the KV cache kernels (tools/sanitize_kernels.py
# --decode), each under its own time limit: sanitize_decode MEMCHECK_S RACECHECK_S -> $L/sanitizer.log,
# $L/racecheck.log. Says so and does nothing without compute-sanitizer.
sanitize_decode() {
  if [ -z "$SAN" ]; then echo "no compute-sanitizer: memcheck and racecheck skipped"; return 0; fi
  local t0=$SECONDS
  timeout "$1" "$SAN" --tool memcheck --error-exitcode 1 python3 tools/sanitize_kernels.py --decode > "$L/sanitizer.log" 2>&1
  echo "memcheck: exit $? after $((SECONDS - t0)) s: $(grep -E 'ERROR SUMMARY' "$L/sanitizer.log" | tail -1)"
  t0=$SECONDS
  timeout "$2" "$SAN" --tool racecheck --error-exitcode 1 python3 tools/sanitize_kernels.py --decode > "$L/racecheck.log" 2>&1
  echo "racecheck: exit $? after $((SECONDS - t0)) s: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$L/racecheck.log" | tail -1)"
}
