#!/usr/bin/env python3
"""kvpack's paged INT8 (and INT4) decode beside FlashInfer's paged decode (issue 18's peer), in one job.

At each point (one query token per sequence, D = 128, page size P): the fastest torch SDPA backend
over the contiguous fp16 cache (the baseline), kvpack's fused INT8 kernel (contiguous and paged,
per-token scales; and the paged INT4 kernel, groups of 32), and FlashInfer 0.7 over the same tokens in the same shuffled pages (HND, the
layout kvpack's pages have): its FA2 decode (CUDA cores and tensor cores) and TensorRT-LLM's XQA, each
over fp16 pages and over fp8 e4m3 pages (one scale per tensor, absmax / 448, vLLM's default). Every
method's output is compared with fp16 SDPA's (relative L2 error). The copy bandwidth of the same
job bounds them all. L2 flushed before every call, CUDA events, median of --repeats.

FlashInfer comes from the offline bundle of ../shared/peers/flashinfer.sh (tools/peers_device.sh
installs it); without it the FlashInfer rows are recorded as skipped, with the reason.

    python tools/bench_paged_peers.py [--points 1x32x8x4096 ...] [--page-size 16] [--json out.json]

A point is BxHqxHkvxT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpack import KVCache, decode_attention
from kvpack.paged import paged_decode_attention
from kvpack.pipeline import environment
from kvpack.study import bench
from kvpack.study.decode_step import SDPA_BACKENDS, _sdpa_backend, decode_bytes, paged_copy

POINTS = ["1x32x8x4096", "1x32x32x32768", "1x32x8x32768", "8x32x8x32768", "8x32x32x32768",
          "32x32x8x32768", "1x32x32x131072", "8x32x8x131072"]
FP8_MAX = 448.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def flashinfer_methods(q3, k_pages16, v_pages16, block_tables, lengths, T, page_size, sm_scale):
    """FlashInfer's decode paths over the given HND pages: {name: (callable, bytes read)}, or raises ImportError."""
    import flashinfer
    from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper, xqa_batch_decode_with_kv_cache

    dev = q3.device
    B, Hq, D = q3.shape
    Hkv = k_pages16.shape[1]
    n_pages = block_tables.shape[1]
    indptr = torch.arange(0, (B + 1) * n_pages, n_pages, dtype=torch.int32, device=dev)
    indices = block_tables.reshape(-1).contiguous()
    last = torch.full((B,), page_size, dtype=torch.int32, device=dev)
    amax_k = float(k_pages16.abs().max())
    amax_v = float(v_pages16.abs().max())
    ks, vs = amax_k / FP8_MAX, amax_v / FP8_MAX
    k8 = (k_pages16.float() / ks).to(torch.float8_e4m3fn)
    v8 = (v_pages16.float() / vs).to(torch.float8_e4m3fn)
    methods = {}
    for kv_name, pages, scales in (("fp16", (k_pages16, v_pages16), (None, None)), ("fp8", (k8, v8), (ks, vs))):
        for tc in (False, True):
            ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
            w = BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=tc)
            w.plan(indptr, indices, last, Hq, Hkv, D, page_size, q_data_type=torch.float16,
                   kv_data_type=pages[0].dtype, sm_scale=sm_scale)
            kw = {} if scales[0] is None else {"k_scale": scales[0], "v_scale": scales[1]}
            methods[f"fi_fa2{'tc' if tc else ''}_{kv_name}"] = (
                lambda w=w, pages=pages, kw=kw: w.run(q3, pages, **kw))
        xws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)  # XQA's own, zeroed (its semaphores)
        seq = lengths.to(torch.int32)
        k_s = 1.0 if scales[0] is None else scales[0]
        v_s = 1.0 if scales[1] is None else scales[1]
        methods[f"fi_xqa_{kv_name}"] = (
            lambda pages=pages, xws=xws, seq=seq, k_s=k_s, v_s=v_s: xqa_batch_decode_with_kv_cache(
                q3, pages, xws, block_tables, seq, T, bmm1_scale=k_s * sm_scale, bmm2_scale=v_s, kv_layout="HND"))
    return methods, flashinfer.__version__


def run_point(spec: str, page_size: int, warmup: int, repeats: int, copy: dict, flush, gen) -> dict:
    B, Hq, Hkv, T = (int(x) for x in spec.split("x"))
    D = 128
    dev = torch.device("cuda")
    row = {"batch": B, "q_heads": Hq, "kv_heads": Hkv, "T": T, "head_dim": D, "page_size": page_size,
           **decode_bytes(B, Hkv, T, D, "token")}
    row["fp8_bytes"] = 2 * B * Hkv * T * D
    timings, skipped, outputs = {}, {}, {}

    def timed(name, fn):
        try:
            outputs[name] = fn()
            torch.cuda.synchronize()
            timings[name] = bench.time_cuda(fn, warmup, repeats, flush).summary()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is recorded, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]

    q = torch.rand((B, Hq, 1, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    k = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    v = torch.rand((B, Hkv, T, D), generator=gen, device=dev, dtype=torch.float16) * 2 - 1
    q3 = q.view(B, Hq, D)
    sm_scale = 1.0 / math.sqrt(D)
    gqa = {"enable_gqa": True} if Hq != Hkv else {}
    for backend in SDPA_BACKENDS:
        def sd(backend=backend):
            with _sdpa_backend(backend):
                return F.scaled_dot_product_attention(q, k, v, **gqa).view(B, Hq, D)
        timed(f"sdpa_{backend}", sd)
    ran = [n for n in timings if n.startswith("sdpa_")]
    best = min(ran, key=lambda n: timings[n]["median_ms"])
    ref = outputs[best]

    cache = KVCache(B, Hkv, D, T, device=dev, dtype=torch.float16)
    cache.append(k, v)
    timed("kvpack_int8", lambda: decode_attention(q3, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales,
                                                  cache.device_lengths))
    p = paged_copy(cache, page_size, gen)
    args = (q3, p["k_pages"], p["v_pages"], p["k_scales"], p["v_scales"], p["block_tables"], p["lengths"])
    timed("kvpack_int8_paged", lambda: paged_decode_attention(*args))
    # the INT4 cache (groups of 32, kvpack's default) in the same pages' layout
    c4 = KVCache(B, Hkv, D, T, device=dev, dtype=torch.float16, bits=4)
    c4.append(k, v)
    p4 = paged_copy(c4, page_size, gen)
    c4 = None
    args4 = (q3, p4["k_pages"], p4["v_pages"], p4["k_scales"], p4["v_scales"], p4["block_tables"], p4["lengths"])
    timed("kvpack_int4_paged", lambda: paged_decode_attention(*args4, bits=4))
    # fp16 pages with the same block tables (HND): page perm[i] holds page i of the sequences in order
    n = T // page_size
    perm = p["block_tables"].reshape(-1).long()
    fp16_pages = []
    for x in (k, v):
        xs = x.view(B, Hkv, n, page_size, D).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page_size, D)
        pages = torch.empty_like(xs)
        pages[perm] = xs
        fp16_pages.append(pages)
    k = v = cache = p4 = args4 = None  # the fp16 cache and the int8 and INT4 ones: room for the peers' pages
    try:
        methods, version = flashinfer_methods(q3, fp16_pages[0], fp16_pages[1], p["block_tables"], p["lengths"], T,
                                              page_size, sm_scale)
        row["flashinfer_version"] = version
        for name, fn in methods.items():
            timed(name, fn)
    except Exception as e:  # noqa: BLE001 - no bundle, or its JIT failed: say so in the record
        skipped["flashinfer"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]

    for name, s in timings.items():
        row[f"{name}_median_ms"] = s["median_ms"]
        row[f"{name}_p10_ms"] = s["p10_ms"]
        row[f"{name}_p90_ms"] = s["p90_ms"]
        row[f"{name}_speedup_vs_sdpa"] = timings[best]["median_ms"] / s["median_ms"]
        row[f"{name}_rel_err_vs_sdpa"] = rel_err(outputs[name].view(B, Hq, D), ref)
    row["sdpa_best"] = best
    row["copy_gbps"] = copy["copy_gbps"]
    if skipped:
        row["skipped"] = skipped
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=POINTS)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds after which no further point starts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    flush = bench._L2Flusher(torch.device("cuda"))
    copy = bench.copy_bandwidth("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: copy {copy['copy_gbps']:.0f} GB/s; page size {args.page_size}; "
          "speed-up over the fastest fp16 SDPA (relative L2 error against it)", flush=True)
    rows, left = [], []
    t0 = time.perf_counter()
    for spec in args.points:
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            left.append(spec)
            continue
        try:
            r = run_point(spec, args.page_size, args.warmup, args.repeats, copy, flush, gen)
        except torch.cuda.OutOfMemoryError as e:
            r = {"point": spec, "status": "skipped", "reason": f"out of GPU memory: {str(e).splitlines()[0]}"[:200]}
        rows.append(r)
        torch.cuda.empty_cache()
        if "sdpa_best" not in r:
            print(f"{spec}: skipped ({r.get('reason')})", flush=True)
            continue
        names = [k[:-len("_median_ms")] for k in r if k.endswith("_median_ms") and not k.startswith("sdpa_")]
        print(f"B={r['batch']:>2} H={r['q_heads']}/{r['kv_heads']:<2} T={r['T']:>6}  {r['sdpa_best']} "
              f"{r[r['sdpa_best'] + '_median_ms']:.4f} ms  " + "  ".join(
                  f"{n} {r[n + '_speedup_vs_sdpa']:.2f}x ({r[n + '_rel_err_vs_sdpa']:.1e})" for n in names), flush=True)
        if r.get("skipped"):
            print("    skipped:", json.dumps(r["skipped"])[:400], flush=True)
    if left:
        print(f"not started (time limit): {left}")
    record = {"kind": "paged_peers", "workload": {"name": "paged decode peers", "points": args.points,
                                                   "page_size": args.page_size, "warmup": args.warmup,
                                                   "repeats": args.repeats, "not_started": left},
              "copy": copy, "rows": rows, "provenance": environment.provenance("cuda")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
