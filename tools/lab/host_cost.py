"""What a decode call costs the host: microseconds of CPU per call, for each way of making it, while the
GPU is held busy by a long sleep kernel (so no launch waits for the GPU and the queue never fills).
Where a step's kernels take less than the host's cost, back-to-back calls run at the host's pace
(tools/bench_decode_api.py's default call at T = 4096, B = 1).

    python tools/lab/host_cost.py [--points 4096x1x32x8x128 ...] [--calls 300] [--json out.json]

Ways: kvpack.decode_attention as typed (the default call), the op's overload
(torch.ops.kvpack.decode_attention.default), the op packet (torch.ops.kvpack.decode_attention), and,
for scale, torch.ops.kvpack.decode_splits (a custom op of three arguments that queues nothing), torch.add of two small tensors and fp16 SDPA over the same cache (one dispatcher op each).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kvpack


def host_us(fn, calls: int, rounds: int = 7) -> tuple[float, float]:
    """(median, min) over rounds of host microseconds per call, the GPU asleep throughout each round."""
    per = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU cycles: longer than any round's host time
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) * 1e6 / calls)
    torch.cuda.synchronize()
    return statistics.median(per), min(per)


def point(T: int, B: int, hq: int, hkv: int, D: int, calls: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = kvpack.KVCache(B, hkv, D, T, device="cuda")
    k = torch.empty(B, hkv, T, D, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
    v = torch.empty_like(k).uniform_(-1, 1, generator=g)
    cache.append(k, v)
    q = torch.empty(B, hq, D, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
    args = (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths)
    scale = D**-0.5
    overload = torch.ops.kvpack.decode_attention.default
    packet = torch.ops.kvpack.decode_attention
    splits_op = torch.ops.kvpack.decode_splits.default  # a custom op of 3 arguments that queues nothing
    a, b = torch.ones(4, device="cuda"), torch.ones(4, device="cuda")
    q4 = q.unsqueeze(2)
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    ways = {
        "default": lambda: kvpack.decode_attention(*args),
        "overload": lambda: overload(*args, "token", scale, 0),
        "packet": lambda: packet(*args, "token", scale, 0),
        "splits_op": lambda: splits_op(q, cache.k_cache, "token"),
        "torch_add": lambda: torch.add(a, b),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, kk, vv, scale=scale),
    }
    for fn in ways.values():
        fn()
    row = {"T": T, "batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "calls": calls}
    for name, fn in ways.items():
        med, lo = host_us(fn, calls)
        row[f"{name}_host_us"] = med
        row[f"{name}_host_us_min"] = lo
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["4096x1x32x8x128", "32768x1x32x8x128"])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_cost: no CUDA device", file=sys.stderr)
        return 2
    rows = []
    names = ("default", "overload", "packet", "splits_op", "torch_add", "sdpa")
    print(f"{'point':>20} | " + " ".join(f"{n:>10}" for n in names) + "   (host us a call, median of 7)")
    for p in args.points:
        r = point(*(int(x) for x in p.split("x")), args.calls)
        rows.append(r)
        print(f"{p:>20} | " + " ".join(f"{r[n + '_host_us']:10.2f}" for n in names), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "decode_host_cost", "rows": rows,
                                               "device": torch.cuda.get_device_name()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
