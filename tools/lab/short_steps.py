#!/usr/bin/env python3
"""Where a short decode step's time goes (issue 18: B = 1, GQA 32/8 at T = 4096 and 32768).

For each point: the fused INT8 kernel (and INT4, and the fastest fp16 SDPA backends) under
torch.profiler, with the L2 flushed and the GPU busy before every call as the benchmarks do; prints
each kernel's median device time and the median span of one call (first kernel's start to the last
one's end), then the INT8 and INT4 calls' event-timed medians at several split counts (is the planner's
choice the fastest, and how much of the time does not depend on the bytes?).

    python tools/lab/short_steps.py [--points 4096x1x32x8x128 32768x1x32x8x128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kvpack import KVCache, decode_attention
from kvpack.decode_attention import decode_splits
from kvpack.study import bench
from kvpack.study.decode_step import _sdpa_backend


def profiled(fn, flush, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush()
            torch.cuda._sleep(bench.LEAD_CYCLES)
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev = [e for e in ev if "sleep" not in e.name.lower() and "flush" not in e.name.lower()
          and "fill" not in e.name.lower() and "zero" not in e.name.lower()]
    ev.sort(key=lambda e: e.time_range.start)
    per_kernel = {}
    for e in ev:
        per_kernel.setdefault(e.name[:90], []).append(e.time_range.end - e.time_range.start)
    n_per_call = max(1, len(ev) // iters)
    spans = []
    for i in range(0, len(ev) - n_per_call + 1, n_per_call):
        grp = ev[i:i + n_per_call]
        spans.append(max(e.time_range.end for e in grp) - grp[0].time_range.start)
    return {"kernels": {k: statistics.median(v) for k, v in per_kernel.items()},
            "kernels_per_call": n_per_call, "span_us": statistics.median(spans) if spans else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["4096x1x32x8x128", "32768x1x32x8x128"])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 48, 64, 96, 128])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    flush = bench._L2Flusher(dev)
    out = [run_point(spec, args.splits, flush, dev) for spec in args.points]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "points": out}, indent=1))
    return 0


def run_point(spec: str, splits, flush, dev) -> dict:
    T, B, Hq, Hkv, D = (int(x) for x in spec.split("x"))
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.rand((B, Hq, 1, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    k = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    v = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    q3 = q.view(B, Hq, D)
    rec = {"point": spec}
    caches = {}
    for bits in (8, 4):
        c = KVCache(B, Hkv, D, T, device=dev, dtype=torch.float16, bits=bits)
        c.append(k, v)
        caches[bits] = c
    fns = {}
    for bits, c in caches.items():
        fns[f"int{bits}"] = (lambda c=c, bits=bits, **kw: decode_attention(
            q3, c.k_cache, c.v_cache, c.k_scales, c.v_scales, c.device_lengths, bits=bits, **kw))
    for backend in ("cudnn", "flash"):
        def sd(backend=backend):
            with _sdpa_backend(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
        fns[f"sdpa_{backend}"] = sd
    rec["planned_splits"] = decode_splits(q3, caches[8].k_cache, "token")
    for name, fn in fns.items():
        try:
            rec[name] = profiled(fn, flush)
            rec[name]["event_median_ms"] = bench.time_cuda(fn, 5, 50, flush).summary()["median_ms"]
        except RuntimeError as e:
            rec[name] = {"skipped": str(e).splitlines()[0][:160]}
    for fmt in ("int8", "int4"):
        rec[f"{fmt}_by_splits_ms"] = {}
        for s in splits:
            if s * 128 > T * 2:
                continue
            fn = lambda s=s, fmt=fmt: fns[fmt](splits=s)
            rec[f"{fmt}_by_splits_ms"][s] = bench.time_cuda(fn, 5, 50, flush).summary()["median_ms"]
    print(f"== T={T} B={B} H={Hq}x{Hkv} D={D}: planned splits {rec['planned_splits']}")
    for name in fns:
        r = rec[name]
        if "skipped" in r:
            print(f"  {name:12s} skipped: {r['skipped']}")
            continue
        ks = "  ".join(f"{k[:48]}={v:.1f}us" for k, v in r["kernels"].items())
        print(f"  {name:12s} event {r['event_median_ms'] * 1e3:7.1f} us  span {r['span_us']:.1f} us  "
              f"{r['kernels_per_call']} kernels: {ks}")
    for fmt in ("int8", "int4"):
        print(f"  {fmt} by splits (us): " + "  ".join(f"{s}:{ms * 1e3:.1f}" for s, ms in rec[f"{fmt}_by_splits_ms"].items()))
    torch.cuda.empty_cache()
    return rec


if __name__ == "__main__":
    sys.exit(main())
