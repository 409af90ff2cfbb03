"""Where the default kvpack.quantize's finiteness check costs least: five placements against the fused op
(262144x128 and 131072x1024, fp32 per channel), one process, the timer of tools/bench_kernels.py.
Run at 7ef7d75 (where ops.quantize was `side_amax`); its output is reports/reference/h200/logs/api_placement.txt,
and `side_copy` became the default (kvpack/ops.py, _queue_finite_check).

    python tools/lab/api_placement.py      # on a CUDA machine, from the checkout
"""
import math
import sys
import time
from functools import partial

import torch

sys.path.insert(0, ".")
from kvpack import ops
from kvpack.study import bench, workloads

ops.available_variants("cuda")
side = torch.cuda.Stream()
flush = bench._L2Flusher(torch.device("cuda"))


def main_stream(x):  # the old order: scales, amax + copy on the current stream, quantize, wait
    s = torch.ops.kvpack.compute_scales.default(x, "channel")
    h = torch.empty((), pin_memory=True); h.copy_(torch.amax(s), non_blocking=True)
    e = torch.cuda.Event(); e.record()
    q = torch.ops.kvpack.quantize.default(x, s, "fast", "channel")
    e.synchronize(); assert math.isfinite(h.item()); return q, s


def side_amax(x):  # ops.quantize as of 7ef7d75: amax + copy on a side stream
    return ops.quantize(x, "fast")


def side_copy(x):  # the scales themselves copied on a side stream, checked on the host (the default since)
    s = torch.ops.kvpack.compute_scales.default(x, "channel")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = torch.empty(s.shape, pin_memory=True); h.copy_(s, non_blocking=True)
        e = torch.cuda.Event(); e.record(side)
    s.record_stream(side)
    q = torch.ops.kvpack.quantize.default(x, s, "fast", "channel")
    e.synchronize(); assert bool(torch.isfinite(h).all()); return q, s


def after(x):  # check after the quantize kernel, on the current stream
    q, s = torch.ops.kvpack.quantize_fused.default(x, "fast", "channel")
    h = torch.empty((), pin_memory=True); h.copy_(torch.amax(s), non_blocking=True)
    torch.cuda.current_stream().synchronize(); assert math.isfinite(h.item()); return q, s


def event_only(x):  # no check at all, but the same wait: what the host round trip alone costs
    q, s = torch.ops.kvpack.quantize_fused.default(x, "fast", "channel")
    torch.cuda.current_stream().synchronize(); return q, s


def fused(x):
    return torch.ops.kvpack.quantize_fused.default(x, "fast", "channel")


for shape in [(262144, 128), (131072, 1024)]:
    x = workloads.uniform(*shape, seed=0, device="cuda")
    res = {}
    for name, f in [("fused", fused), ("main_stream", main_stream), ("side_amax", side_amax), ("side_copy", side_copy),
                    ("after", after), ("event_only", event_only), ("fused_again", fused)]:
        t = bench.time_cuda(partial(f, x), 5, 60, flush).summary()
        res[name] = t
        t0 = time.perf_counter(); [f(x) for _ in range(50)]; torch.cuda.synchronize(); host_us = (time.perf_counter() - t0) / 50 * 1e6
        print(f"{shape} {name:>12} {t['median_ms']*1e3:8.1f} us p10 {t['p10_ms']*1e3:7.1f} p90 {t['p90_ms']*1e3:7.1f}  "
              f"x{t['median_ms']/res['fused']['median_ms']:.3f}  back-to-back {host_us:7.1f} us/call")
