#!/usr/bin/env bash
# Counters of the decode split kernel, INT8 against INT4 (issue 17: what limits the INT4 kernel?),
# at one point (default B = 8, GQA 32/8, T = 32768, D = 128): Nsight Compute's speed-of-light,
# warp-state (stall reasons), scheduler, instruction and memory sections of one launch of each, as
# CSV ($OUT/ncu_int8.csv, ncu_int4.csv) and a short summary on stdout. Needs ncu and counter access.
# NCU_SOURCE=1 also samples where the warps stall, per SASS instruction ($OUT/ncu_int*_sass.csv: one more
# launch profiled with SourceCounters, exported and printed as `--page source --print-source sass`).
# NCU_BITS (default "8 4"): which caches.
#
#   OUT=/some/dir bash tools/lab/ncu_decode.sh [T B Hq Hkv D]
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-build/ncu}"
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu: skipped"; exit 0; fi
T=${1:-32768}; B=${2:-8}; HQ=${3:-32}; HKV=${4:-8}; D=${5:-128}
cat > "$OUT/ncu_prog.py" <<'PY'
import sys
import torch
import kvpack
T, B, HQ, HKV, D, BITS = (int(x) for x in sys.argv[1:])
cache = kvpack.KVCache(B, HKV, D, T, device="cuda", dtype=torch.float16, bits=BITS)
for i in range(0, T, 4096):  # fill in chunks (fp16 rows of the whole cache at once would be large)
    n = min(4096, T - i)
    cache.append(torch.randn(B, HKV, n, D, device="cuda", dtype=torch.float16),
                 torch.randn(B, HKV, n, D, device="cuda", dtype=torch.float16))
q = torch.randn(B, HQ, D, device="cuda", dtype=torch.float16)
for _ in range(4):
    cache.attend(q)
torch.cuda.synchronize()
PY
for BITS in ${NCU_BITS:-8 4}; do
  timeout 150 "$NCU" --clock-control none --target-processes all -k regex:decode_split_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --csv --page details \
    python3 "$OUT/ncu_prog.py" "$T" "$B" "$HQ" "$HKV" "$D" "$BITS" > "$OUT/ncu_int$BITS.csv" 2> "$OUT/ncu_int$BITS.err"
  echo "ncu int$BITS: exit $? ($(wc -l < "$OUT/ncu_int$BITS.csv") lines; $(tail -2 "$OUT/ncu_int$BITS.err" | tr '\n' ' '))"
  if [ -n "${NCU_SOURCE:-}" ]; then
    timeout 150 "$NCU" --clock-control none --target-processes all -k regex:decode_split_kernel --launch-skip 2 --launch-count 1 \
      --section SourceCounters --section WarpStateStats --import-source no -f -o "$OUT/ncu_int$BITS" \
      python3 "$OUT/ncu_prog.py" "$T" "$B" "$HQ" "$HKV" "$D" "$BITS" > "$OUT/ncu_int${BITS}_source.err" 2>&1
    "$NCU" --import "$OUT/ncu_int$BITS.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_int${BITS}_sass.csv" 2>> "$OUT/ncu_int${BITS}_source.err"
    echo "ncu int$BITS source: $(wc -l < "$OUT/ncu_int${BITS}_sass.csv") lines; $(tail -1 "$OUT/ncu_int${BITS}_source.err")"
  fi
done
python3 - "$OUT" <<'PY'
import csv, io, sys
from pathlib import Path
want = ("Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Executed Ipc Active",
        "Issue Slots Busy", "No Eligible", "Registers Per Thread", "Achieved Occupancy", "Warp Cycles Per Issued Instruction",
        "Executed Instructions", "L2 Hit Rate", "L1/TEX Hit Rate", "Stall Long Scoreboard", "Stall Wait",
        "Stall Math Pipe Throttle", "Stall Short Scoreboard", "Stall Barrier", "Stall Not Selected", "Stall Selected",
        "Stall MIO Throttle", "Stall LG Throttle", "Stall Dispatch Stall", "Stall No Instruction")
tables = {}
for bits in (8, 4):
    if not (Path(sys.argv[1]) / f"ncu_int{bits}.csv").exists():
        continue
    text = (Path(sys.argv[1]) / f"ncu_int{bits}.csv").read_text(errors="replace")
    start = text.find('"ID"')
    if start < 0:
        print(f"int{bits}: no ncu rows (counters not permitted?)")
        continue
    for r in csv.DictReader(io.StringIO(text[start:])):
        tables.setdefault(r["Metric Name"], {})[bits] = f"{r['Metric Value']} {r['Metric Unit']}".strip()
for name in sorted(tables, key=lambda n: (not any(n.startswith(w) for w in want), n)):
    if any(name.startswith(w) for w in want):
        row = tables[name]
        print(f"{name[:44]:44s} INT8 {row.get(8, '-'):>18s}   INT4 {row.get(4, '-'):>18s}")
PY
