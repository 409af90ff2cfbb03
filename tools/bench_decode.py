#!/usr/bin/env python3
"""Benchmark one decode step on a GPU: every SDPA backend over the fp16 cache, dequantize-then-SDPA,
and kvpack's fused decode attention over the int8 cache, side by side with the copy bandwidth of the
same run (kvpack.study.decode_step). Prints a table; --json writes the rows with provenance.

    python tools/bench_decode.py                        # the issue's grid (T x B x heads, D = 128, + D 64/256)
    python tools/bench_decode.py --points 131072x1x32x32x128 32768x8x32x8x64 --json out.json
    python tools/bench_decode.py --splits 0 64 128      # the fused kernel at several split counts
    python tools/bench_decode.py --page-sizes 16 64 256 # also the paged kernel over a shuffled paged copy

A point is TxBxHqxHkvxD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack.pipeline import environment
from kvpack.study import bench, decode_step


def parse_point(text: str) -> dict:
    t, b, hq, hkv, d = (int(x) for x in text.split("x"))
    return {"T": t, "batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", type=parse_point, help="TxBxHqxHkvxD points (default: the issue's grid)")
    ap.add_argument("--granularity", default="token", choices=["token", "channel"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--methods", nargs="*", default=["sdpa", "dequant_sdpa", "fused", "int4"],
                    help="which of sdpa, dequant_sdpa, fused (INT8), int4 to time (default: all)")
    ap.add_argument("--int4-group", type=int, default=32, help="the INT4 cache's group size (32, 64, 128)")
    ap.add_argument("--splits", nargs="*", type=int, default=[], help="also time the fused kernel at these split counts")
    ap.add_argument("--page-sizes", nargs="*", type=int, default=[],
                    help="also time kvpack.paged_decode_attention over a paged copy of the cache at these page sizes")
    ap.add_argument("--json", help="write the record (rows, copy bandwidth, provenance) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    points = args.points or decode_step.grid_points({})
    copy = bench.copy_bandwidth("cuda")
    print(f"copy bandwidth {copy['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    hdr = (f"{'T':>7} {'B':>3} {'Hq':>3} {'Hkv':>3} {'D':>3} | {'sdpa best':>14} {'flash':>8} {'cudnn':>8} "
           f"{'effic':>8} | {'deq+sdpa':>8} | {'fused':>8} {'x sdpa':>6} {'%bound':>6} {'splits':>6} {'err':>8}")
    print(hdr, flush=True)
    for p in points:
        try:
            r = decode_step.decode_point(**p, granularity=args.granularity, warmup=args.warmup,
                                         repeats=args.repeats, copy=copy, extra_splits=args.splits,
                                         methods=tuple(args.methods), page_sizes=args.page_sizes,
                                         int4_group=args.int4_group)
        except torch.cuda.OutOfMemoryError as e:
            r = {"status": "skipped", **p, "skip_reason": str(e)[:200]}
        rows.append(r)
        torch.cuda.empty_cache()

        def ms(key, r=r):
            v = r.get(f"{key}_median_ms")
            return f"{v:8.4f}" if v is not None else f"{'-':>8}"

        best = r.get("sdpa_best", "-")
        print(f"{p['T']:>7} {p['batch']:>3} {p['q_heads']:>3} {p['kv_heads']:>3} {p['head_dim']:>3} | "
              f"{best:>5} {ms('sdpa_best')} {ms('sdpa_flash')} {ms('sdpa_cudnn')} {ms('sdpa_efficient')} | "
              f"{ms('dequant_sdpa')} | {ms('fused')} {r.get('fused_speedup_vs_sdpa', float('nan')):6.2f} "
              f"{100 * r.get('fused_fraction_of_int8_bound', float('nan')):6.1f} {r.get('fused_splits', '-'):>6} "
              f"{r.get('fused_vs_sdpa_max_abs', float('nan')):8.2e}", flush=True)
        if "int4" in args.methods:
            print(f"        int4 g{args.int4_group}: {ms('int4')} ms  {r.get('int4_speedup_vs_sdpa', float('nan')):5.2f}x sdpa  "
                  f"{r.get('int4_vs_fused', float('nan')):5.2f}x int8  "
                  f"{100 * r.get('int4_fraction_of_int4_bound', float('nan')):5.1f}% of int4 bound  "
                  f"err {r.get('int4_vs_sdpa_max_abs', float('nan')):8.2e}", flush=True)
        if args.page_sizes:
            print("        paged:", "  ".join(
                f"P={n}: {r.get(f'paged_p{n}_median_ms', float('nan')):.4f} ms "
                f"({r.get(f'paged_p{n}_vs_fused', float('nan')):.3f}x fused, "
                f"{'bit-exact' if r.get(f'paged_p{n}_equals_fused') else 'DIFFERS'})" for n in args.page_sizes), flush=True)
        if args.splits:
            print("        splits:", "  ".join(f"{n}: {r.get(f'fused_s{n}_median_ms', float('nan')):.4f}" for n in args.splits),
                  flush=True)
        if r.get("skipped"):
            print("        skipped:", json.dumps(r["skipped"])[:300], flush=True)
    workload = {"name": "decode bench", "granularity": args.granularity, "methods": list(args.methods),
                "int4_group": args.int4_group, "page_sizes": list(args.page_sizes), "splits": list(args.splits),
                "warmup": args.warmup, "repeats": args.repeats}
    record = {"kind": "decode_bench", "workload": workload, "copy": copy, "rows": rows,
              "provenance": environment.provenance("cuda")}
    if not args.no_append:
        for g in ("token", "channel"):
            a = decode_step.append_time(granularity=g)
            record.setdefault("append", []).append(a)
            print(f"append one token, B=32 Hkv=8 D=128 ({g}): median {1e3 * a['append_median_ms']:.1f} us "
                  f"(p10 {1e3 * a['append_p10_ms']:.1f}, p90 {1e3 * a['append_p90_ms']:.1f})", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
