"""Quick side-by-side of the GPU kernels on a few shapes: GB/s and fraction of the copy ceiling.

Development tool (the benchmark of record is the workflow's benchmark rule):
    python tools/bench_kernels.py --shapes 131072x8192 131072x128 --dtypes float32 [--json out.json]

--api times the public API against the fused op it should cost no more than (issue 12), fp32,
per channel, 131072x1024, 131072x8192 and 262144x128 unless --shapes says otherwise:
    python tools/bench_kernels.py --api
  api_default   kvpack.quantize(x): scales, their finiteness verdict queued to the host, quantize, one wait
  fused_op      torch.ops.kvpack.quantize_fused(x, "fast", "channel"): the C++ entry point alone
  api_async     kvpack.quantize(x, check_finite=False): no check, no sync
and prints each one's median (p10-p90) and its ratio to fused_op (the target: api_default <= 1.10).

--json writes every row (median, p10, p90 ms, GB/s, fraction of the copy ceiling) with the run's
provenance (kvpack.pipeline.environment) and the method (CUDA events, kvpack.study.bench.L2_FLUSH, LEAD_CYCLES).
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvpack import ops
from kvpack.pipeline import environment
from kvpack.study import bench, records, workloads
from kvpack.torch_impl import dequantize_torch, quantize_fused_torch, quantize_torch


def write_bench_record(kind: str, rows: list, ceiling: float, repeats: int, path: str) -> None:
    """The rows with the command, provenance, timing method and the copy ceiling of this run."""
    records.write_record({
        "kind": kind, "command": " ".join(sys.argv), "provenance": environment.provenance("cuda"),
        "method": {"timer": "CUDA events", "l2_flush": bench.L2_FLUSH, "lead_cycles": bench.LEAD_CYCLES,
                   "warmup": 3, "repeats": repeats},
        "copy_gbps": ceiling, "rows": rows}, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["131072x8192", "131072x1024", "131072x128"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--variants", nargs="+", default=list(ops.CUDA_VARIANTS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows and provenance here")
    ap.add_argument("--api", action="store_true", help="time the public API against the fused op (see above)")
    a = ap.parse_args()
    rows = []
    ceiling = bench.copy_bandwidth("cuda", 1 << 31)["copy_gbps"]
    flush = bench._L2Flusher(torch.device("cuda"))
    print(f"copy ceiling {ceiling:.0f} GB/s")
    if a.api:
        shapes = a.shapes if "--shapes" in sys.argv else API_SHAPES
        rows = bench_api(shapes, a.repeats, ceiling, flush)
        if a.json:
            write_bench_record("api_bench", rows, ceiling, a.repeats, a.json)
        return
    print(f"{'shape':>13} {'dtype':>9} {'impl':>14} {'op':>15} {'ms':>8} {'GB/s':>7} {'of copy':>7}")
    for shape in a.shapes:
        T, D = map(int, shape.split("x"))
        for dt in a.dtypes:
            dtype = workloads.resolve_dtype(dt)
            x = workloads.uniform(T, D, seed=0, dtype=dtype, device="cuda")
            s = ops.compute_scales(x, check_finite=False)
            q, _ = ops.quantize(x, "fast", scales=s, check_finite=False)
            # Partials, not lambdas: each holds this shape's x, s, q and dtype, whatever the loops do next.
            fns = {}
            for v in a.variants:
                fns[(v, "quantize")] = partial(ops.quantize, x, v, scales=s, check_finite=False)
                fns[(v, "dequantize")] = partial(ops.dequantize, q, s, v, dtype=dtype)
            fns[("fast", "quantize_fused")] = partial(ops.quantize_fused, x, "fast", check_finite=False)
            fns[("fast", "scales")] = partial(ops.compute_scales, x, check_finite=False)
            if not a.no_compile:
                torch._dynamo.reset()  # each shape compiles fresh: no state inherited from the last one
                cq, cd, cf = (torch.compile(f, dynamic=False) for f in (quantize_torch, dequantize_torch, quantize_fused_torch))
                fns[("compile", "quantize")] = partial(cq, x, s)
                fns[("compile", "dequantize")] = partial(cd, q, s, "channel", dtype)
                fns[("compile", "quantize_fused")] = partial(cf, x)
            for (impl, op), fn in fns.items():
                t = bench.time_cuda(fn, 3, a.repeats, flush).summary()
                rate = bench.gbps(bench.op_bytes(op, T, D, dtype), t["median_ms"])
                rows.append({"T": T, "D": D, "dtype": dt, "impl": impl, "op": op, **t, "gbps": rate,
                             "fraction_of_copy": rate / ceiling})
                print(f"{shape:>13} {dt:>9} {impl:>14} {op:>15} {t['median_ms']:8.3f} {rate:7.0f} {rate / ceiling:7.1%}")
            del x, q, fns, fn  # the partials hold x and q: drop them too, or the memory stays taken
            torch.cuda.empty_cache()
    if a.json:
        write_bench_record("kernel_bench", rows, ceiling, a.repeats, a.json)


API_SHAPES = ["131072x1024", "131072x8192", "262144x128"]


def _api_calls(x: torch.Tensor) -> dict:
    return {
        "api_default": lambda: ops.quantize(x),
        "fused_op": lambda: torch.ops.kvpack.quantize_fused(x, "fast", "channel"),
        "api_async": lambda: ops.quantize(x, check_finite=False),
    }


def bench_api(shapes, repeats: int, ceiling: float, flush) -> list[dict]:
    """kvpack.quantize with defaults and with check_finite=False against the fused op, fp32, per channel.

    Timed like every kernel here (bench.time_cuda: warm-up, CUDA events, L2 flushed by a read, a GPU
    busy-wait queued first so that Python dispatch overlaps GPU work). The default call's host sync
    is inside its timed region: the end event is recorded after the call returns, as a caller sees it.
    """
    rows = []
    assert ops.available_variants("cuda"), "the kvpack extension has no CUDA variants here"  # loads torch.ops.kvpack
    print(f"{'shape':>13} {'impl':>12} {'ms':>8} {'p10-p90 ms':>17} {'GB/s':>7} {'of copy':>7} {'/ fused':>7}")
    for shape in shapes:
        T, D = map(int, shape.split("x"))
        x = workloads.uniform(T, D, seed=0, dtype=torch.float32, device="cuda")
        fns = _api_calls(x)
        q_ref, s_ref = fns["fused_op"]()
        for fn in fns.values():  # the three give the same bits
            q, s = fn()
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        nbytes = bench.op_bytes("quantize_fused", T, D, torch.float32)
        timings = {name: bench.time_cuda(fn, 3, repeats, flush).summary() for name, fn in fns.items()}
        for name, t in timings.items():
            rate = bench.gbps(nbytes, t["median_ms"])
            ratio = t["median_ms"] / timings["fused_op"]["median_ms"]
            rows.append({"T": T, "D": D, "dtype": "float32", "impl": name, "op": "quantize_fused", **t,
                         "gbps": rate, "fraction_of_copy": rate / ceiling, "ratio_to_fused_op": ratio})
            spread = f"{t['p10_ms']:.3f}-{t['p90_ms']:.3f}"
            print(f"{shape:>13} {name:>12} {t['median_ms']:8.3f} {spread:>17} {rate:7.0f} {rate / ceiling:7.1%} {ratio:7.3f}")
        del x, fns, q, s, q_ref, s_ref
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
