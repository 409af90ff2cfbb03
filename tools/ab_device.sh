#!/usr/bin/env bash
# Kernel variants against the default in one device call: the same benchmark, the same points, the
# same GPU, each build in its own process (kvpack.build's KVPACK_BUILD_DIR; nvcc reads
# NVCC_PREPEND_FLAGS), run default, each variant, then default again so that drift shows.
#   AB_VARIANTS  "name=flags;name=flags", e.g. "old=-DKVPACK_FUSED_MERGE=0;two=-DKVPACK_INT4_BUFFERS=2"
#                (or AB_FLAGS: one variant, named variant; prepended, so "-I dir" puts a header first); the variants build in parallel
#   AB_POINTS    tools/bench_decode.py points (TxBxHqxHkvxD)
#   AB_METHODS   tools/bench_decode.py --methods (default: sdpa fused int4)
#   AB_EXTRA     more tools/bench_decode.py arguments, e.g. "--page-sizes 16" (a paged column too)
#   AB_API_POINTS  if set, tools/bench_decode_api.py too (the default call, the raw op, a graph replay)
#                at these points under each build ($OUT/ab/api_<name>.json, $L/api_<name>.log)
# Logs under $OUT/logs (build_<name>.log, bench_<name>.log), one json per run under $OUT/ab.
# Expects tools/device_setup.sh to have run in this call (wheels, the default build).
#
#   OUT=/some/dir AB_VARIANTS="two=-DKVPACK_INT4_BUFFERS=2" AB_POINTS="32768x8x32x8x128" bash tools/ab_device.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/ab-device}"
L="$OUT/logs"
mkdir -p "$L" "$OUT/ab"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
VARIANTS="${AB_VARIANTS:-variant=${AB_FLAGS:-}}"
IFS=';' read -r -a SPECS <<< "$VARIANTS"
NAMES=()
t0=$SECONDS
for spec in "${SPECS[@]}"; do
  name="${spec%%=*}"
  flags="${spec#*=}"
  NAMES+=("$name")
  (KVPACK_BUILD_DIR="/tmp/kvpack-ab-$name" NVCC_PREPEND_FLAGS="$flags" python3 -m kvpack.build --verbose \
    --out "$L/build-info_$name.json" > "$L/build_$name.log" 2>&1
   echo "build $name ($flags): exit $? after $((SECONDS - t0)) s") &
done
wait
bench() {  # $1: label, $2: build dir (or empty: the default)
  local t1=$SECONDS
  ${2:+env KVPACK_BUILD_DIR=$2} python3 tools/bench_decode.py --no-append --methods ${AB_METHODS:-sdpa fused int4} \
    --json "$OUT/ab/$1.json" --points $AB_POINTS ${AB_EXTRA:-} 2>&1 | grep -v -E "Warning|^  warnings" > "$L/bench_$1.log"
  echo "bench $1: after $((SECONDS - t1)) s"
  if [ -n "${AB_API_POINTS:-}" ]; then
    t1=$SECONDS
    ${2:+env KVPACK_BUILD_DIR=$2} python3 tools/bench_decode_api.py --points $AB_API_POINTS \
      --json "$OUT/ab/api_$1.json" > "$L/api_$1.log" 2>&1
    echo "api $1: after $((SECONDS - t1)) s"
  fi
}
bench default ""
for name in "${NAMES[@]}"; do bench "$name" "/tmp/kvpack-ab-$name"; done
bench default2 ""
python3 - "$OUT/ab" default "${NAMES[@]}" default2 <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
runs = {n: json.loads((d / f"{n}.json").read_text()) for n in sys.argv[2:] if (d / f"{n}.json").exists()}
rows0 = [r for run in runs.values() for r in run["rows"]]
paged = sorted({k for r in rows0 for k in r if k.startswith(("paged_p", "int4_paged_p")) and k.endswith("_median_ms")})
keys = [k for k in ("sdpa_best_median_ms", "fused_median_ms", "int4_median_ms", *paged) if any(k in r for r in rows0)]
col = {"sdpa_best_median_ms": "sdpa", "fused_median_ms": "int8", "int4_median_ms": "int4"}
print("point".ljust(24) + "".join(f"{n[:8] + ':' + col.get(k, k.replace('_median_ms', '').replace('paged_p', 'pg')):>19}"
                                  for k in keys for n in runs))
for i, r in enumerate(next(iter(runs.values()))["rows"]):
    name = f"T{r['T']} B{r['batch']} {r['q_heads']}/{r['kv_heads']} D{r['head_dim']}"
    print(name.ljust(24) + "".join(f"{1e3 * runs[n]['rows'][i].get(k, float('nan')):19.1f}" for k in keys for n in runs))
print("(us, median of each run; default2 repeats default after the variants)")
api = {n: json.loads((d / f"api_{n}.json").read_text()) for n in sys.argv[2:] if (d / f"api_{n}.json").exists()}
if api:
    cols = (("default", "default_us"), ("raw", "raw_op_us"), ("graph", "graph_us"))  # (label, record key)
    print("api".ljust(24) + "".join(f"{n[:8] + ':' + label:>19}" for label, _ in cols for n in api))
    for i, r in enumerate(next(iter(api.values()))["rows"]):
        name = f"T{r['T']} B{r['batch']} {r['q_heads']}/{r['kv_heads']} D{r['head_dim']}"
        print(name.ljust(24) + "".join(f"{api[n]['rows'][i][key]:19.2f}" for _, key in cols for n in api))
    print("(us a call: back-to-back calls, tools/bench_decode_api.py)")
PY
