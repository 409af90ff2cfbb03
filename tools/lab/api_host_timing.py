"""Why kvpack.quantize(x) measured 1.4x the fused op at 262144x128 in tools/bench_kernels.py --api while the
same steps written out measured 1.00-1.05x: the same timer, both orders, with host timestamps (to the quantize
launch, to the return). Logs: reports/reference/h200/logs/api_lab2_621a176.txt (a pinned buffer and an event
made per call) and api_lab2_f0faf48.txt (reused per thread and device: 0.99x).

    python tools/lab/api_host_timing.py    # on a CUDA machine, from the checkout
"""
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
marks = {}


def direct(x):
    t0 = time.perf_counter()
    s = torch.ops.kvpack.compute_scales.default(x, "channel")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = torch.empty(s.shape, pin_memory=True); h.copy_(s, non_blocking=True)
        e = torch.cuda.Event(); e.record(side)
    s.record_stream(side)
    t1 = time.perf_counter()
    q = torch.ops.kvpack.quantize.default(x, s, "fast", "channel")
    t2 = time.perf_counter()
    e.synchronize()
    t3 = time.perf_counter()
    marks.setdefault("direct", []).append((t1 - t0, t2 - t0, t3 - t0))
    assert bool(torch.isfinite(h).all()); return q, s


orig_q = ops._quantize_op
def timed_q(*a):
    marks.setdefault("_q", []).append(time.perf_counter())
    return orig_q(*a)
ops._quantize_op = timed_q


def api(x):
    t0 = time.perf_counter(); r = ops.quantize(x); t3 = time.perf_counter()
    marks.setdefault("api", []).append((marks["_q"][-1] - t0, t3 - t0)); return r


def fused(x):
    return torch.ops.kvpack.quantize_fused.default(x, "fast", "channel")


for shape in [(262144, 128)]:
    x = workloads.uniform(*shape, seed=0, device="cuda")
    fused_ms = bench.time_cuda(partial(fused, x), 3, 30, flush).summary()["median_ms"]
    for rnd in range(2):
        for name, f in [("api", api), ("direct", direct), ("fused", fused)]:
            for reps in (30, 60):
                marks.clear()
                t = bench.time_cuda(partial(f, x), 3, reps, flush).summary()
                extra = ""
                if name in marks:
                    m = list(zip(*marks[name]))
                    extra = "host us (median): " + " ".join(f"{sorted(v)[len(v)//2]*1e6:6.1f}" for v in m)
                print(f"round {rnd} {name:>7} reps {reps}: {t['median_ms']*1e3:6.1f} us p10 {t['p10_ms']*1e3:6.1f} p90 {t['p90_ms']*1e3:6.1f} x{t['median_ms']/fused_ms:.3f}  {extra}")
