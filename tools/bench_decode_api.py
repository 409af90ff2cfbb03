"""What the public decode call costs beyond its kernels (issue 18): back-to-back calls of
``kvpack.decode_attention`` as a user types it (the default: no host sync), of the raw op
``torch.ops.kvpack.decode_attention`` (the kernels and nothing else of ours), and of the opt-in
checking call (``check_lengths=True``: one host sync each), each over N calls queued in a row,
timed by CUDA events around the whole run (so host time shows wherever the GPU would wait for it),
beside the kernels' own time under a CUDA graph replay of the same call (no host at all). The ways
take turns, round by round, and each reports its median round.

    python tools/bench_decode_api.py [--points TxBxHqxHkvxD ...] [--calls 2000] [--json out.json]

Prints per point: us per call of each way and the default call's excess over the graph replay, and the
host's pace (a 4-element torch.add back to back) measured in the same rounds.
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


def one_round_us(fn, calls: int) -> float:
    """(elapsed of ``calls`` back-to-back calls) / calls, in microseconds."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


def per_call_us(ways: dict, calls: dict, rounds: int = 5) -> dict:
    """Median over rounds of each way's microseconds per call, the ways taking turns round by round
    (where the host sets the pace, a slow spell of the machine's host then falls on every way alike,
    not on whichever way was being timed)."""
    out = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            out[name].append(one_round_us(fn, calls[name]))
    return {name: statistics.median(v) for name, v in out.items()}


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
    tiny = torch.ones(4, device="cuda")
    ways = {
        "default": lambda: kvpack.decode_attention(*args),
        "raw_op": lambda: raw(*args, "token", scale, 0),
        "check_lengths": lambda: kvpack.decode_attention(*args, check_lengths=True),
        # The host's pace, for reading the rest: torch.add of two 4-element tensors back to back (its
        # kernel takes ~2 us; its host cost, an allocation and a launch, sets the time on any machine).
        "host_add": lambda: torch.add(tiny, tiny),
    }
    for fn in ways.values():  # load, plan, warm
        fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        raw(*args, "token", scale, 0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            raw(*args, "token", scale, 0)
    ways["graph"] = graph.replay  # 20 calls a replay
    counts = {name: calls for name in ways}
    counts["check_lengths"] = max(50, calls // 10)
    counts["graph"] = max(1, calls // 20)
    row = {"T": T, "batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "calls": calls}
    for name, us in per_call_us(ways, counts).items():
        row[f"{name}_us"] = us / 20 if name == "graph" else us
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
    print(f"{'point':>22} | {'default':>8} {'raw op':>8} {'checked':>8} {'graph':>8} us/call | default/graph"
          f" | host: add", flush=True)
    for p in args.points:
        T, B, hq, hkv, D = (int(x) for x in p.split("x"))
        r = point(T, B, hq, hkv, D, args.calls)
        rows.append(r)
        print(f"{p:>22} | {r['default_us']:8.2f} {r['raw_op_us']:8.2f} {r['check_lengths_us']:8.2f} "
              f"{r['graph_us']:8.2f}         | {r['default_over_graph']:.3f}         | {r['host_add_us']:5.2f}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "decode_api_bench", "rows": rows,
                                               "provenance": environment.provenance("cuda")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
