"""Timing harness and the benchmark job.

Method (see STYLE.md, triton.testing.do_bench): warm up, then time each repetition on its own
(CUDA events around the launch on the GPU, perf_counter on the CPU), and report the median with
p10/p90. Inputs are seeded, non-zero, and on the GPU the L2 is flushed between repetitions,
outside the timed region, by *reading* a buffer four times the L2 (L2_FLUSH). Reading, not writing:
a write flush leaves up to an L2 of dirty lines that the timed op then has to write back, which is
not its own traffic. On the H100 (tools/lab/quant_lab.cu) a 160 MB device copy measured 2,758 GB/s
after a 200 MB memset and 3,084 GB/s after a 200 MB read; at 10 GB the two agree. Bytes moved over
the median time gives GB/s, reported beside the device-to-device copy bandwidth measured in the
same job. Records made before this change (git history of reports/reference/) used the write flush.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .. import ops
from ..torch_impl import dequantize_torch, quantize_fused_torch, quantize_torch, scales_torch
from . import cpu_threads, workloads

log = logging.getLogger("kvpack.study.bench")

PEERS = ("torch_eager", "torch_compile", "torch_quantize_per_channel")
PAPER_VARIANTS = ("naive", "tiled", "coarsened", "vectorized")
DEFAULTS = {
    "warmup": 3,
    "repeats": 20,
    "cpu_repeats": 5,
    "cpu_time_budget_s": 20.0,
    "cpu_serial_max_elements": 1 << 25,
    "cpu_dtypes": ["float32"],
    "peers": list(PEERS),
    "end_to_end": True,
    "flush_l2": True,
    "variants": "all",
    "granularities": ["channel"],
    "copy_bytes": 1 << 30,
}


# --- statistics -------------------------------------------------------------------------------

@dataclass
class Timing:
    samples_ms: list[float]

    def summary(self) -> dict:
        a = np.asarray(self.samples_ms, dtype=np.float64)
        return {
            "median_ms": float(np.median(a)),
            "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()),
            "mean_ms": float(a.mean()),
            "repeats": int(a.size),
        }


def gbps(nbytes: int, ms: float) -> float:
    """Bytes over milliseconds as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else math.nan


def op_bytes(op: str, T: int, D: int, dtype: torch.dtype, granularity: str = "channel") -> int:
    """Fewest bytes an op must move through memory: each input read once, each output written once."""
    n = T * D
    esize = torch.empty((), dtype=dtype).element_size()
    scales = 4 * (D if granularity == "channel" else T)
    return {
        "scales": n * esize + scales,
        "quantize": n * esize + scales + n,
        "dequantize": n + scales + n * esize,
        "quantize_fused": 2 * n * esize + scales + n,  # x is read twice: once for scales, once to quantize
        "end_to_end": n * esize + scales + n + n * esize,  # the device part; transfers dominate anyway
    }[op]


# --- timers -----------------------------------------------------------------------------------

L2_FLUSH = "read of 4x L2 before each repetition"


class _L2Flusher:
    """Reads a buffer of four L2s so that no repetition finds its data, or dirty lines, in the L2."""

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0)) or (50 << 20)
        self.buf = torch.full((l2,), 0x5A5A5A5A, dtype=torch.int32, device=device)  # 4 * l2 bytes

    def __call__(self):
        self.buf.amax()  # one read of the whole buffer; the scalar result is discarded


# GPU cycles of busy-wait queued after the flush, before each timed region (~0.1 ms at 1.7 GHz):
# the host's Python dispatch of `fn` (argument checks, the custom op, the output allocation: tens
# of microseconds) then overlaps GPU work instead of showing up as idle time between the start
# event and the kernel. Without it, ops of ~50 us measured up to 10% slow, and noisily.
LEAD_CYCLES = 200_000


def time_cuda(fn: Callable, warmup: int, repeats: int, flush: Callable | None = None) -> Timing:
    """CUDA events around each call of ``fn``, after an optional L2 flush and a GPU busy-wait."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush()
        torch.cuda._sleep(LEAD_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable, warmup: int, repeats: int, budget_s: float = math.inf) -> Timing:
    """perf_counter around each call; stops early once ``budget_s`` is spent (at least one sample).

    The warm-up is skipped when one call alone takes longer than the budget allows for it.
    """
    samples: list[float] = []
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if warmup == 0 or first * (repeats + 1) > budget_s:
        samples.append(first * 1e3)  # too slow to throw away: the first call counts
    for _ in range(max(0, warmup - 1)):
        if first * (repeats + 1) > budget_s:
            break
        fn()
    spent = first
    while len(samples) < repeats and (not samples or spent + first <= budget_s):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        samples.append(dt * 1e3)
        spent += dt
    return Timing(samples)


def copy_bandwidth(device: str, nbytes: int = 1 << 30, warmup: int = 3, repeats: int = 20,
                   trials: int | None = None) -> dict:
    """Device-to-device copy of ``nbytes`` (read + write counted): the ceiling for a streaming op.

    On CUDA the ceiling is the best of ``trials`` (default 3) copies, each between fresh buffers
    allocated after the caching allocator's free blocks were released. With one copy, the decode
    grid measured 14% less at the same four points on an H100 and an H200 (2,586 against 3,008 GB/s,
    3,810 against 4,228: reports/reference/*/decode/), each the job right after one of the grid's
    largest in the same process, with a tight spread: a property of where the buffers landed, not
    noise. It read as more than 100% of the byte bound. Every trial's rate is kept
    (``copy_trials_gbps``)."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    trials = (3 if on_gpu else 1) if trials is None else max(1, int(trials))
    best, rates = None, []
    for _ in range(trials):
        if on_gpu:
            torch.cuda.empty_cache()  # fresh segments, not the remains of the job before
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_(-1, 1)
        dst = torch.empty_like(src)
        if on_gpu:
            t = time_cuda(partial(dst.copy_, src), warmup, repeats)
        else:
            t = time_cpu(partial(dst.copy_, src), warmup, min(repeats, 5))
        s = t.summary()
        rates.append(gbps(2 * nbytes, s["median_ms"]))
        if best is None or s["median_ms"] < best["median_ms"]:
            best = s
        del src, dst
    return {"device": dev.type, "copy_bytes": 2 * nbytes, "copy_gbps": gbps(2 * nbytes, best["median_ms"]),
            "copy_median_ms": best["median_ms"], "copy_p10_ms": best["p10_ms"], "copy_p90_ms": best["p90_ms"],
            "copy_trials_gbps": rates}


# --- the job ----------------------------------------------------------------------------------

def _row(impl, family, device, op, granularity, **extra) -> dict:
    row = {"impl": impl, "family": family, "device": device, "op": op, "granularity": granularity,
           "status": "ok", "skip_reason": "", "median_ms": None, "p10_ms": None, "p90_ms": None,
           "min_ms": None, "mean_ms": None, "repeats": 0, "bytes": None, "gbps": None,
           "fraction_of_copy": None, "peak_memory_bytes": None, "bit_exact": None}
    row.update(extra)
    return row


def _skipped(impl, family, device, op, granularity, reason) -> dict:
    return _row(impl, family, device, op, granularity, status="skipped", skip_reason=reason)


def cuda_bytes_needed(T: int, D: int, dtype: torch.dtype) -> int:
    """Peak device memory of a benchmark job: x, q, x_hat, and the eager peer's fp32 temporaries."""
    n = T * D
    esize = torch.empty((), dtype=dtype).element_size()
    return n * esize + n + n * esize + 3 * 4 * n + (256 << 20)


class _Job:
    def __init__(self, workload: dict, device: str, settings: dict):
        self.w = workload
        self.device = device
        self.s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
        self.T, self.D = int(workload["T"]), int(workload["D"])
        self.dtype = workloads.resolve_dtype(workload.get("dtype", "float32"))
        self.rows: list[dict] = []
        self.copy_gbps = None
        self.cpu_limits: dict | None = None  # kvpack.study.cpu_threads.cpu_limits(), read once per job

    def add(self, impl, family, device, op, granularity, timing: Timing, bit_exact=None, **extra):
        s = timing.summary()
        nbytes = op_bytes(op, self.T, self.D, self.dtype, granularity)
        rate = gbps(nbytes, s["median_ms"])
        frac = rate / self.copy_gbps if (self.copy_gbps and device == "cuda") else None
        peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
        self.rows.append(_row(impl, family, device, op, granularity, bytes=nbytes, gbps=rate,
                              fraction_of_copy=frac, peak_memory_bytes=peak, bit_exact=bit_exact, **s, **extra))
        log.info("%-28s %-15s %-8s median %.4f ms  %.1f GB/s", impl, op, granularity, s["median_ms"], rate)

    # CPU baselines: the paper's serial loops and multi-threaded torch, on a CPU copy of x.
    def run_cpu(self, x_cpu: torch.Tensor, granularities, ref_q: dict):
        w, r, budget = 1, int(self.s["cpu_repeats"]), float(self.s["cpu_time_budget_s"])
        n = self.T * self.D
        dname = str(self.dtype).replace("torch.", "")
        for variant in ops.CPU_VARIANTS:
            for g in granularities:
                if dname not in self.s["cpu_dtypes"]:
                    for op in ("scales", "quantize", "dequantize"):
                        self.rows.append(_skipped(variant, "cpu_baseline", "cpu", op, g,
                                                  f"CPU baselines run for {self.s['cpu_dtypes']} only"))
                    continue
                if variant == "cpu_serial" and n > int(self.s["cpu_serial_max_elements"]):
                    for op in ("scales", "quantize", "dequantize"):
                        self.rows.append(_skipped(variant, "cpu_baseline", "cpu", op, g,
                                                  f"{n} elements > cpu_serial_max_elements={self.s['cpu_serial_max_elements']}"))
                    continue
                s = ops.compute_scales(x_cpu, g, variant=variant, check_finite=False)
                q, _ = ops.quantize(x_cpu, variant, g, scales=s, check_finite=False)
                exact = None
                if g in ref_q:
                    exact = bool(torch.equal(q, ref_q[g]))
                else:
                    ref_q[g] = q
                # Each timed call is a partial: it holds this iteration's variant, g, s and q, not the loop's.
                calls = {
                    "scales": partial(ops.compute_scales, x_cpu, g, variant=variant, check_finite=False),
                    "quantize": partial(ops.quantize, x_cpu, variant, g, scales=s, check_finite=False),
                    "dequantize": partial(ops.dequantize, q, s, variant, g, dtype=self.dtype),
                }
                for op, fn in calls.items():
                    bit = exact if op == "quantize" else None
                    if variant != "cpu_torch":  # the serial loops: one thread by construction
                        self.add(variant, "cpu_baseline", "cpu", op, g, time_cpu(fn, w, r, budget), bit, threads=1)
                        continue
                    timing, threads = self.time_cpu_torch(fn, w, r, budget)
                    self.add(variant, "cpu_baseline", "cpu", op, g, timing, bit, **threads)
                del q, calls

    def time_cpu_torch(self, fn, w, r, budget) -> tuple[Timing, dict]:
        """Time one cpu_torch op at the usable thread count (what the process may really use) and at one
        thread, and report the faster (kvpack.study.cpu_threads.choose_threads; torch's thread count is
        restored). The choice, both medians and the machine's limits go in the row."""
        if self.cpu_limits is None:
            self.cpu_limits = cpu_threads.cpu_limits()

        def timer(f):
            t = time_cpu(f, w, r, budget)
            return t.summary()["median_ms"], t

        choice, timing = cpu_threads.choose_threads(fn, self.cpu_limits, timer=timer)
        lim = self.cpu_limits
        return timing, {**choice, "cpu_affinity": lim["affinity"], "cgroup_cpu_quota": lim["cgroup_quota_cpus"],
                        "torch_default_threads": lim["torch_default"]}

    def run_cuda(self, x: torch.Tensor, granularities):
        w, r = int(self.s["warmup"]), int(self.s["repeats"])
        flush = _L2Flusher(x.device) if self.s["flush_l2"] else None
        variants = ops.CUDA_VARIANTS if self.s["variants"] == "all" else [
            v for v in self.s["variants"] if v in ops.CUDA_VARIANTS]
        for g in granularities:
            s = ops.compute_scales(x, g, check_finite=False)
            # The eager peer's result for the same scales: the same function, written in torch ops.
            ref_q = quantize_torch(x, s, g)
            self.add("fast", "kvpack", "cuda", "scales", g, time_cuda(
                partial(ops.compute_scales, x, g, check_finite=False), w, r, flush),
                bool(torch.equal(s.cpu(), ops.compute_scales(x.cpu(), g, variant="cpu_torch", check_finite=False))))
            for v in variants:
                torch.cuda.reset_peak_memory_stats()
                q, _ = ops.quantize(x, v, g, scales=s, check_finite=False)
                exact = bool(torch.equal(q, ref_q))
                self.add(v, "kvpack", "cuda", "quantize", g, time_cuda(
                    partial(ops.quantize, x, v, g, scales=s, check_finite=False), w, r, flush), exact)
                self.add(v, "kvpack", "cuda", "dequantize", g, time_cuda(
                    partial(ops.dequantize, q, s, v, g, dtype=self.dtype), w, r, flush))
                del q
            if "fast" in variants:
                qf, sf = ops.quantize_fused(x, "fast", g, check_finite=False)
                exact = bool(torch.equal(qf, ref_q) and torch.equal(sf, s))
                self.add("fast", "kvpack", "cuda", "quantize_fused", g, time_cuda(
                    partial(ops.quantize_fused, x, "fast", g, check_finite=False), w, r, flush), exact)
                del qf
            self.run_peers(x, s, g, ref_q, w, r, flush)
            del ref_q
            if self.s["end_to_end"]:
                self.run_end_to_end(x, g, [v for v in ("fast", "vectorized") if v in variants])

    def run_peers(self, x, s, g, ref_q, w, r, flush):
        peers = self.s["peers"] or []
        q = ref_q
        if "torch_eager" in peers:
            exact_s = bool(torch.equal(scales_torch(x, g), s))
            self.add("torch_eager", "peer", "cuda", "scales", g, time_cuda(lambda: scales_torch(x, g), w, r, flush),
                     exact_s)
            self.add("torch_eager", "peer", "cuda", "quantize", g, time_cuda(
                lambda: quantize_torch(x, s, g), w, r, flush), True)
            self.add("torch_eager", "peer", "cuda", "dequantize", g, time_cuda(
                lambda: dequantize_torch(q, s, g, self.dtype), w, r, flush))
        if "torch_compile" in peers:
            try:
                # A fresh compile per job: dynamo's caches keyed on the function would otherwise carry
                # guards from earlier shapes of this process (seen on the H100: 131072x128 compiled after
                # 262144x128 ran 4x slower than in a fresh process).
                torch._dynamo.reset()
                cq = torch.compile(quantize_torch, dynamic=False)
                cd = torch.compile(dequantize_torch, dynamic=False)
                cf = torch.compile(quantize_fused_torch, dynamic=False)
                t0 = time.perf_counter()
                exact_q = bool(torch.equal(cq(x, s, g), ref_q))
                cd(q, s, g, self.dtype)
                qf, sf = cf(x, g)
                exact_f = bool(torch.equal(qf, ref_q) and torch.equal(sf, s))
                del qf, sf
                log.info("torch.compile: %.1f s to compile", time.perf_counter() - t0)
                self.add("torch_compile", "peer", "cuda", "quantize", g, time_cuda(partial(cq, x, s, g), w, r, flush), exact_q)
                self.add("torch_compile", "peer", "cuda", "dequantize", g, time_cuda(
                    partial(cd, q, s, g, self.dtype), w, r, flush))
                self.add("torch_compile", "peer", "cuda", "quantize_fused", g, time_cuda(
                    partial(cf, x, g), w, r, flush), exact_f)
            except Exception as e:  # noqa: BLE001  a compiler failure is a finding, not a crash of the whole job
                log.warning("torch.compile peer failed: %s", e)
                for op in ("quantize", "dequantize", "quantize_fused"):
                    self.rows.append(_row("torch_compile", "peer", "cuda", op, g, status="failed",
                                          skip_reason=f"{type(e).__name__}: {e}"[:300]))
        if "torch_quantize_per_channel" in peers:
            axis = 1 if g == "channel" else 0
            zp = torch.zeros_like(s, dtype=torch.int64)
            xf = x.float()
            try:
                safe = torch.where(s == 0, torch.ones_like(s), s)
                qt = torch.quantize_per_channel(xf, safe, zp, axis, torch.qint8)
                exact = bool(torch.equal(qt.int_repr(), ref_q))
                self.add("torch_quantize_per_channel", "peer", "cuda", "quantize", g, time_cuda(
                    lambda: torch.quantize_per_channel(xf if self.dtype == torch.float32 else x.float(), safe, zp, axis,
                                                       torch.qint8), w, r, flush), exact)
                self.add("torch_quantize_per_channel", "peer", "cuda", "dequantize", g, time_cuda(
                    lambda: qt.dequantize() if self.dtype == torch.float32 else qt.dequantize().to(self.dtype),
                    w, r, flush))
                del qt
            except Exception as e:  # noqa: BLE001  as for torch.compile: a failing peer is a row, not a crash
                log.warning("torch.quantize_per_channel peer failed: %s", e)
                for op in ("quantize", "dequantize"):
                    self.rows.append(_row("torch_quantize_per_channel", "peer", "cuda", op, g, status="failed",
                                          skip_reason=f"{type(e).__name__}: {e}"[:300]))
            del xf

    def run_end_to_end(self, x, g, variants):
        """Host -> device copy, scales + quantize + dequantize, device -> host: what the paper leaves out."""
        host = x.to("cpu").pin_memory()
        out = torch.empty_like(host).pin_memory()
        w, r = max(1, int(self.s["warmup"])), max(3, int(self.s["repeats"]) // 4)

        def e2e(v, host, out):
            xd = host.to(x.device, non_blocking=True)
            q, s = ops.quantize_fused(xd, v, g, check_finite=False)
            out.copy_(ops.dequantize(q, s, v, g, dtype=self.dtype), non_blocking=True)

        for v in variants:
            self.add(v, "kvpack", "cuda", "end_to_end", g, time_cuda(partial(e2e, v, host, out), w, r))
        del host, out


def run_benchmark_job(workload: dict, device: str, settings: dict, provenance: dict) -> dict:
    """Time every variant available on ``device`` (and the CPU baselines and peers) on one workload.

    Returns the benchmark record of docs/records.md. A workload that does not fit in GPU memory is
    recorded as skipped with the bytes it needed.
    """
    job = _Job(workload, device, settings)
    T, D, dtype = job.T, job.D, job.dtype
    seed = int(workload.get("seed", settings.get("seed", 0)))
    grans = list(job.s["granularities"])
    record = {
        "kind": "benchmark",
        "workload": {"name": workload.get("name", f"{T}x{D}"), "T": T, "D": D, "elements": T * D,
                     "dtype": str(dtype).replace("torch.", ""), "seed": seed},
        "provenance": provenance,
        "settings": job.s,
        "ceiling": None,
        "rows": job.rows,
    }
    if device == "cuda":
        ops._ensure_loaded()
        free, _total = torch.cuda.mem_get_info()
        need = cuda_bytes_needed(T, D, dtype)
        if need > free:
            reason = f"needs about {need} bytes of GPU memory, {free} free"
            for v in ops.CUDA_VARIANTS:
                for op in ("quantize", "dequantize"):
                    job.rows.append(_skipped(v, "kvpack", "cuda", op, grans[0], reason))
            return record
        record["ceiling"] = copy_bandwidth("cuda", int(job.s["copy_bytes"]))
        record["ceiling"]["l2_flush"] = L2_FLUSH if job.s["flush_l2"] else "none"
        job.copy_gbps = record["ceiling"]["copy_gbps"]
        x = workloads.uniform(T, D, seed=seed, dtype=dtype, device="cuda")
        try:
            job.run_cuda(x, grans)
        except torch.cuda.OutOfMemoryError as e:
            job.rows.append(_skipped("*", "kvpack", "cuda", "*", grans[0], f"out of GPU memory: {e}"[:300]))
        x_cpu = x.cpu()
        del x
        torch.cuda.empty_cache()
    else:
        record["ceiling"] = copy_bandwidth("cpu", min(int(job.s["copy_bytes"]), 1 << 28))
        x_cpu = workloads.uniform(T, D, seed=seed, dtype=dtype, device="cpu")
        for v in ops.CUDA_VARIANTS:
            job.rows.append(_skipped(v, "kvpack", "cuda", "quantize", grans[0], "no CUDA device on this machine"))
    job.run_cpu(x_cpu, grans, {})
    return record
