# Sourced by the device scripts (tools/paged_device.sh, tools/int4_device.sh) after they set $L, their
# log folder: installs the carried wheels (.whl/, if any) into /tmp/site and puts it on PYTHONPATH,
# finds compute-sanitizer ($SAN, or empty), writes the machine's versions to $L/env.txt and builds the
# extension ($L/build.log, $L/build-info.json).
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
