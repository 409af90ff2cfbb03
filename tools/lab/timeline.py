#!/usr/bin/env python3
"""Where a short decode step's time goes inside the split kernel: a timeline of its blocks (issue 18).

The short steps (B = 1, GQA 32/8) cost a fixed ~10 us whatever their part count
(tools/lab/short_steps.py; tools/lab/NOTES.md). This asks the kernel itself: built with
-DKVPACK_LAB_TIMELINE (its own build folder), thread 0 of every block of the split kernel writes the
global timer (ns) and its SM's clock at
  0 start (after the programmatic-launch wait), 1 the sequence's length read, 2 warp 0's first tile
  computed, 3 warp 0's tiles done, 4 the block's partial result written, 5 its arrival counted, and in
  the last block of each group 6 the merge done.
The spread of a mark over blocks (earliest, median, latest) says whether a long step's time over its
bytes is a tail (blocks finishing late: `tiles done` latest far past its median) or spread evenly
(issue 17's INT4 at B = 8 GQA T = 32768: `--points 32768x8x32x8x128`).
For each point and format, R launches of the default call, each after an L2 flush and with the GPU
busy ahead of it (as the benchmarks time a call). Prints, relative to the first block's start, the
median over launches of each mark's median and latest over blocks; the same call's event time beside
it (what the benchmarks report: the kernel plus the launch's own overhead).

    KVPACK_BUILD_DIR=/tmp/kvpack-tl NVCC_PREPEND_FLAGS=-DKVPACK_LAB_TIMELINE \\
        python tools/lab/timeline.py [--points 4096x1x32x8x128 32768x1x32x8x128] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

import kvpack.build
from kvpack import KVCache, decode_attention
from kvpack.decode_attention import decode_splits
from kvpack.study import bench

LAB_BLOCKS = 8192  # kLabBlocks, kLabSlots in kernels/include/kvpack/decode_kernels.cuh
LAB_SLOTS = 32
MARKS = ["start", "length", "first tile", "tiles done", "partial written", "arrived", "merged"]


class Timeline:
    """The lab build's timeline of one format's translation unit (int8 or int4)."""

    def __init__(self, fmt: str):
        lib = ctypes.CDLL(kvpack.build.load()["library"])
        name = f"kvpack_lab_timeline_{fmt}"
        if not hasattr(lib, f"{name}_read"):
            raise SystemExit("timeline.py needs a build with -DKVPACK_LAB_TIMELINE "
                             "(KVPACK_BUILD_DIR=<its own folder> NVCC_PREPEND_FLAGS=-DKVPACK_LAB_TIMELINE)")
        self._read = getattr(lib, f"{name}_read")
        self._read.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._clear = getattr(lib, f"{name}_clear")
        self.buf = np.zeros((LAB_BLOCKS, LAB_SLOTS), dtype=np.uint64)

    def clear(self):
        torch.cuda.synchronize()
        if self._clear() != 0:
            raise RuntimeError("cudaMemset of the timeline failed")

    def read(self, blocks: int) -> np.ndarray:
        torch.cuda.synchronize()
        if self._read(self.buf.ctypes.data, blocks) != 0:
            raise RuntimeError("cudaMemcpyFromSymbol of the timeline failed")
        return self.buf[:blocks].copy()


def launch_stats(rows: np.ndarray) -> dict:
    """One launch's marks (ns from the first block's start): median and latest over blocks."""
    gt = rows[:, :8].astype(np.int64)
    ck = rows[:, 8:16].astype(np.int64)
    t0 = gt[:, 0].min()
    out = {"blocks": len(rows), "sms": len(set(rows[:, 24].tolist()))}
    for i, name in enumerate(MARKS):
        have = gt[:, i] != 0
        if not have.any():
            continue
        rel = gt[have, i] - t0
        out[name] = {"min_ns": float(rel.min()), "median_ns": float(np.median(rel)), "max_ns": float(rel.max()),
                     "blocks": int(have.sum())}
    # the SM clock against the timer, from blocks whose span is long enough to read it
    span_gt = gt[:, 4] - gt[:, 0]
    span_ck = ck[:, 4] - ck[:, 0]
    ok = (span_gt > 2000) & (gt[:, 4] != 0)
    out["sm_ghz"] = float(np.median(span_ck[ok] / span_gt[ok])) if ok.any() else None
    # a block's own phases, from its SM clock (no timer resolution involved), in cycles
    for a, b, name in ((0, 1, "cycles start->length"), (1, 2, "cycles length->first tile"),
                       (2, 3, "cycles first tile->tiles done"), (3, 4, "cycles tiles done->partial"),
                       (4, 5, "cycles partial->arrived")):
        have = (gt[:, a] != 0) & (gt[:, b] != 0)
        if have.any():
            out[name] = float(np.median(ck[have, b] - ck[have, a]))
    last = (rows[:, 16 + 5] == 1) & (gt[:, 6] != 0)
    if last.any():
        out["merge_cycles"] = float(np.median(ck[last, 6] - ck[last, 5]))
    diffs = np.diff(np.unique(gt[gt != 0]))
    out["timer_step_ns"] = int(diffs[diffs > 0].min()) if (diffs > 0).any() else None
    return out


def summarise(launches: list[dict]) -> dict:
    res = {"launches": len(launches)}
    for key in launches[0]:
        vals = [l[key] for l in launches if key in l]
        if isinstance(vals[0], dict):
            res[key] = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
        elif vals[0] is not None and all(v is not None for v in vals):
            res[key] = statistics.median(vals)
    return res


def run_point(spec: str, reps: int, flush, dev) -> dict:
    T, B, Hq, Hkv, D = (int(x) for x in spec.split("x"))
    gen = torch.Generator(device=dev).manual_seed(0)
    q = (torch.rand((B, Hq, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1)
    k = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    v = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    rec = {"point": spec}
    for bits in (8, 4):
        c = KVCache(B, Hkv, D, T, device=dev, dtype=torch.float16, bits=bits)
        c.append(k, v)
        tl = Timeline(f"int{bits}")
        fn = lambda c=c, bits=bits: decode_attention(q, c.k_cache, c.v_cache, c.k_scales, c.v_scales,
                                                     c.device_lengths, bits=bits)
        splits = decode_splits(q, c.k_cache, "token") if bits == 8 else None
        for _ in range(3):
            fn()
        launches = []
        for _ in range(reps):
            tl.clear()
            flush()
            torch.cuda._sleep(bench.LEAD_CYCLES)
            fn()
            rows = tl.read(LAB_BLOCKS)
            rows = rows[rows[:, 0] != 0]
            launches.append(launch_stats(rows))
        s = summarise(launches)
        s["event_median_ms"] = bench.time_cuda(fn, 5, 50, flush).summary()["median_ms"]
        s["planned_splits"] = splits
        rec[f"int{bits}"] = s
        del c
    print(f"== T={T} B={B} H={Hq}x{Hkv} D={D}")
    for fmt in ("int8", "int4"):
        s = rec[fmt]
        print(f"  {fmt}: event {s['event_median_ms'] * 1e3:.1f} us, {s['blocks']:.0f} blocks on {s['sms']:.0f} SMs, "
              f"SM clock {s.get('sm_ghz') or float('nan'):.2f} GHz, timer step {s.get('timer_step_ns')} ns")
        for name in MARKS:
            if name in s:
                m = s[name]
                print(f"    {name:16s} earliest {m['min_ns'] / 1e3:7.2f} us   median {m['median_ns'] / 1e3:7.2f} us   "
                      f"latest {m['max_ns'] / 1e3:7.2f} us   ({m['blocks']:.0f} blocks)")
        ghz = s.get("sm_ghz") or 1.0
        cyc = "  ".join(f"{k[7:]} {v / ghz / 1e3:.2f}" for k, v in s.items() if k.startswith("cycles "))
        print(f"    a block's phases (us, its SM clock): {cyc}; the last block's merge {s.get('merge_cycles', 0) / ghz / 1e3:.2f}")
    torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["4096x1x32x8x128", "32768x1x32x8x128"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    flush = bench._L2Flusher(dev)
    out = [run_point(spec, args.reps, flush, dev) for spec in args.points]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "points": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
