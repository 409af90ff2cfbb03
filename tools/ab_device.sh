#!/usr/bin/env bash
# A kernel variant against the default in one device call: the same benchmark, the same points, the
# same GPU, each build in its own process (kvpack.build's KVPACK_BUILD_DIR; nvcc reads
# NVCC_APPEND_FLAGS), run default, variant, default again so that drift shows.
#   AB_FLAGS   the variant's nvcc flags, e.g. "-DKVPACK_INT4_BUFFERS=2"
#   AB_POINTS  tools/bench_decode.py points (TxBxHqxHkvxD)
#   AB_METHODS tools/bench_decode.py --methods (default: fused int4)
# Logs under $OUT/logs (build_default.log, build_variant.log, bench_*.log, json per run).
# Expects tools/device_setup.sh to have run in this call (wheels, the default build).
#
#   OUT=/some/dir AB_FLAGS=-DKVPACK_INT4_BUFFERS=2 bash tools/ab_device.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/ab-device}"
L="$OUT/logs"
mkdir -p "$L" "$OUT/ab"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
t0=$SECONDS
KVPACK_BUILD_DIR=/tmp/kvpack-ab NVCC_APPEND_FLAGS="${AB_FLAGS}" python3 -m kvpack.build --verbose \
  --out "$L/build-info_variant.json" > "$L/build_variant.log" 2>&1
echo "variant build ($AB_FLAGS): exit $? after $((SECONDS - t0)) s"
bench() {  # $1: label, $2: build dir (or empty: the default)
  t0=$SECONDS
  ${2:+env KVPACK_BUILD_DIR=$2} python3 tools/bench_decode.py --no-append --methods ${AB_METHODS:-sdpa fused int4} \
    --json "$OUT/ab/$1.json" --points $AB_POINTS 2>&1 | grep -v -E "Warning|^  warnings" > "$L/bench_$1.log"
  echo "bench $1: after $((SECONDS - t0)) s"
}
bench default ""
bench variant /tmp/kvpack-ab
bench default2 ""
python3 - "$OUT/ab" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
runs = {n: json.loads((d / f"{n}.json").read_text()) for n in ("default", "variant", "default2") if (d / f"{n}.json").exists()}
keys = [k for k in ("fused_median_ms", "int4_median_ms") if any(k in r for run in runs.values() for r in run["rows"])]
print("point".ljust(24) + "".join(f"{n + ':' + k.split('_')[0]:>18}" for k in keys for n in runs))
for i, r in enumerate(next(iter(runs.values()))["rows"]):
    name = f"T{r['T']} B{r['batch']} {r['q_heads']}/{r['kv_heads']} D{r['head_dim']}"
    print(name.ljust(24) + "".join(f"{1e3 * runs[n]['rows'][i].get(k, float('nan')):18.1f}" for k in keys for n in runs))
print("(us, median of each run; default2 repeats default after the variant)")
PY
