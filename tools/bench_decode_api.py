"""What the public decode call costs beyond its kernels (issue 18): back-to-back calls of
``kvpack.decode_attention`` as a user types it (the default: no host sync), of the raw op
``torch.ops.kvpack.decode_attention`` (the kernels and nothing else of ours), and of the opt-in
checking call (``check_lengths=True``: one host sync each), each over N calls queued in a row,
timed by CUDA events around the whole run (so host time shows wherever the GPU would wait for it),
beside the kernels' own time under a CUDA graph replay of the same call (no host at all).

    python tools/bench_decode_api.py [--points TxBxHqxHkvxD ...] [--calls 2000] [--json out.json]

Prints per point: us per call of each way and the default call's excess over the graph replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvpack
from kvpack.pipeline import environment


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of (elapsed of ``calls`` back-to-back calls) / calls, in microseconds."""
    out = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(out)


def point(T: int, B: int, hq: int, hkv: int, D: int, calls: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = kvpack.KVCache(B, hkv, D, T, device="cuda")
    k = torch.empty(B, hkv, T, D, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
    cache.append(k, torch.empty_like(k).uniform_(-1, 1, generator=g))
    del k
    q = torch.empty(B, hq, D, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
    args = (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths)
    scale = D**-0.5
    raw = torch.ops.kvpack.decode_attention.default
    ways = {
        "default": lambda: kvpack.decode_attention(*args),
        "raw_op": lambda: raw(*args, "token", scale, 0),
        "check_lengths": lambda: kvpack.decode_attention(*args, check_lengths=True),
    }
    for fn in ways.values():  # load, plan, warm
        fn()
    row = {"T": T, "batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "calls": calls}
    for name, fn in ways.items():
        row[f"{name}_us"] = per_call_us(fn, calls if name != "check_lengths" else max(50, calls // 10))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        raw(*args, "token", scale, 0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            raw(*args, "token", scale, 0)
    row["graph_us"] = per_call_us(graph.replay, max(1, calls // 20)) / 20
    row["default_over_graph"] = row["default_us"] / row["graph_us"]
    row["raw_over_graph"] = row["raw_op_us"] / row["graph_us"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["4096x1x32x8x128", "32768x1x32x8x128", "32768x8x32x8x128",
                                                    "131072x1x32x32x128", "4096x32x32x8x128"])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_api: no CUDA device", file=sys.stderr)
        return 2
    rows = []
    print(f"{'point':>22} | {'default':>8} {'raw op':>8} {'checked':>8} {'graph':>8} us/call | default/graph", flush=True)
    for p in args.points:
        T, B, hq, hkv, D = (int(x) for x in p.split("x"))
        r = point(T, B, hq, hkv, D, args.calls)
        rows.append(r)
        print(f"{p:>22} | {r['default_us']:8.2f} {r['raw_op_us']:8.2f} {r['check_lengths_us']:8.2f} "
              f"{r['graph_us']:8.2f}         | {r['default_over_graph']:.3f}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "decode_api_bench", "rows": rows,
                                               "provenance": environment.provenance("cuda")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
