#!/usr/bin/env python3
"""Run every CUDA variant x op x granularity x dtype on odd shapes and misaligned inputs, for
compute-sanitizer to watch. Exits 0 when everything ran (the sanitizer's own exit code reports
memory errors):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\
        compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 tools/sanitize_kernels.py --variants tiled
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize_kernels.py --decode

--decode runs the KV cache kernels instead (kernels/decode_attention.cu): appends (per token and per
channel, every input dtype and head dimension, ragged counts) and fused decode attention over them
(MHA, GQA, a group of 3, MQA with several head groups, odd T_max, lengths of 1, every split count up
to more parts than tokens hold, so that empty parts occur).

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past the end
of an output lands outside any allocation and memcheck sees it (inside a cached pool block it
would not). Build the extension first (python3 -m kvpack.build): building under the sanitizer is slow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import kvpack

SHAPES = [(1, 1), (3, 5), (1023, 67), (33, 4097), (64, 128), (100, 68), (7, 5120), (5, 8208)]  # 8208 = 8192 + 16: the fast row kernels with a partial column block
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inputs(T: int, D: int, dtype, seed: int):
    """An aligned x, and x starting 1 element into its storage (its buffer ends exactly at x's end)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.empty(T, D, dtype=dtype, device="cuda").uniform_(-1, 1, generator=g)
    buf = torch.empty(T * D + 1, dtype=dtype, device="cuda").uniform_(-1, 1, generator=g)
    return {"aligned": x, "offset1": buf[1:].view(T, D)}


def run(variants, granularities, dtypes, shapes) -> tuple[bool, int]:
    """(all variants agreed, number of op calls)."""
    calls = 0
    for si, (T, D) in enumerate(shapes):
        for name, dtype in dtypes.items():
            for kind, x in inputs(T, D, dtype, seed=si).items():
                for g in granularities:
                    s = kvpack.compute_scales(x, g)
                    calls += 1
                    n = s.numel()
                    s_buf = torch.empty(n + 1, device="cuda")
                    s_mis = s_buf[1:]
                    s_mis.copy_(s)
                    for v in variants:
                        q, _ = kvpack.quantize(x, v, g, scales=s)
                        q2, _ = kvpack.quantize(x, v, g, scales=s_mis)
                        qf, sf = kvpack.quantize_fused(x, v, g)
                        q_buf = torch.empty(T * D + 1, dtype=torch.int8, device="cuda")
                        q_mis = q_buf[1:].view(T, D)
                        q_mis.copy_(q)
                        for out in DTYPES.values():
                            kvpack.dequantize(q, s, v, g, dtype=out)
                            kvpack.dequantize(q_mis, s_mis, v, g, dtype=out)
                        calls += 3 + 2 * len(DTYPES)
                        torch.cuda.synchronize()
                        if not (torch.equal(q, q2) and torch.equal(q, qf) and torch.equal(s, sf)):
                            print(f"MISMATCH {v} {name} {g} {T}x{D} {kind}", file=sys.stderr)
                            return False, calls
            print(f"  {T}x{D} {name}: ok", flush=True)
    return True, calls


def run_decode() -> int:
    """The KV cache kernels on awkward shapes, INT8 and INT4 (its smallest and largest groups);
    returns the number of kernel calls."""
    calls = 0
    for d in (64, 128, 256):
        for bits, group_size in ((8, 32), (4, 32), (4, min(d, 128))):
            for gran in ("token", "channel"):
                for in_dtype in DTYPES.values():
                    for b, hkv, group, t_max, counts in ((1, 1, 1, 1, [1]), (3, 2, 3, 37, [37, 1, 20]), (2, 1, 32, 150, [150, 77])):
                        q_dtype = torch.bfloat16 if in_dtype == torch.bfloat16 else torch.float16
                        cache = kvpack.KVCache(b, hkv, d, t_max, granularity=gran, device="cuda", dtype=q_dtype, bits=bits,
                                               group_size=group_size)
                        g = torch.Generator(device="cuda").manual_seed(d + t_max)
                        k = torch.empty(b, hkv, t_max, d, dtype=in_dtype, device="cuda").uniform_(-1, 1, generator=g)
                        v = torch.empty_like(k).uniform_(-1, 1, generator=g)
                        first = [max(1, c - 1) for c in counts]
                        cache.append(k, v, counts=first)              # ragged prefill (calibrates per channel)
                        cache.append(k[:, :, :1] * 2, v[:, :, :1] * 2, counts=[c - f for c, f in zip(counts, first)])
                        q = torch.empty(b, hkv * group, d, dtype=q_dtype, device="cuda").uniform_(-1, 1, generator=g)
                        for splits in (0, 1, 2, 7, t_max):  # t_max 150: past kFusedMergeMaxSplits
                            cache.attend(q, splits=min(splits, t_max))
                            calls += 1 if splits <= 128 else 2
                        torch.ops.kvpack._set_fused_merge(False)  # the merge kernel of up to 128 parts
                        for splits in (0, 7):
                            cache.attend(q, splits=min(splits, t_max))
                            calls += 2
                        torch.ops.kvpack._set_fused_merge(True)
                        calls += 2
                torch.cuda.synchronize()
                print(f"  decode D={d} bits={bits} group={group_size} {gran}: ok", flush=True)
    calls += run_paged()
    return calls


def run_paged() -> int:
    """The paged kernels (torch.ops.kvpack.paged_kv_append / paged_decode_attention) on awkward
    tables: pages in a shuffled order, a slot subset through seq_ids, partial last pages, page sizes
    16 and 48, and lengths, page ids and sequence ids out of range (clamped, never read outside);
    int8 pages and INT4 pages (groups of 32 and of min(D, 128))."""
    from kvpack.paged import _load_ops, page_shapes

    _load_ops()  # loads the extension: this may run before (or without) run_decode
    calls = 0
    ops = torch.ops.kvpack
    formats = [(d, bits, group) for d in (64, 128, 256) for bits, group in ((8, 32), (4, 32), (4, min(d, 128)))]
    for d, bits, group_size in formats:
        for gran in ("token", "channel"):
            for page, slots, hkv, group, t_new in ((16, 3, 2, 3, 37), (48, 2, 1, 32, 100)):
                g = torch.Generator(device="cuda").manual_seed(d + page)
                max_pages = -(-t_new // page) + 1
                num_pages = slots * max_pages + 1
                shape, k_shape, v_shape, page_dtype = page_shapes(num_pages, hkv, page, d, slots, gran, bits,
                                                                  group_size)
                kp = torch.zeros(shape, dtype=page_dtype, device="cuda")
                vp = torch.zeros_like(kp)
                ks = torch.full(k_shape, 0.01, device="cuda")
                vs = torch.full(v_shape, 0.01, device="cuda")
                perm = torch.randperm(num_pages, device="cuda", generator=g)[: slots * max_pages]
                bt = perm.view(slots, max_pages).to(torch.int32).contiguous()
                lengths = torch.zeros(slots, dtype=torch.int32, device="cuda")
                arrivals = torch.zeros_like(lengths)
                saturated = torch.zeros((), dtype=torch.int64, device="cuda")
                rows = torch.tensor([slots - 1, 0], dtype=torch.int32, device="cuda")
                k = torch.empty(2, hkv, t_new, d, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
                ops.paged_kv_append.default(kp, vp, ks, vs, bt, lengths, arrivals, saturated, k, k, rows, gran)
                q = torch.empty(2, hkv * group, d, dtype=torch.float16, device="cuda").uniform_(-1, 1, generator=g)
                flag = torch.zeros(1, dtype=torch.int32, device="cuda")
                for splits in (0, 1, 3, t_new):
                    ops.paged_decode_attention_flagged.default(q, kp, vp, ks, vs, bt, lengths, rows, gran, 0.1, splits,
                                                               flag)
                    calls += 2
                # out of range: a length past the table, a negative one, a page id past the pages, a bad slot
                bad_len = torch.tensor([10**6] + [-5] * (slots - 1), dtype=torch.int32, device="cuda")
                bad_bt = bt.clone()
                bad_bt[0, 0] = num_pages + 7
                bad_rows = torch.tensor([slots + 3, -1], dtype=torch.int32, device="cuda")
                ops.paged_decode_attention_flagged.default(q, kp, vp, ks, vs, bad_bt, bad_len, bad_rows, gran, 0.1, 0,
                                                           flag)
                k2 = k[:, :, :2].contiguous()
                ops.paged_kv_append.default(kp, vp, ks, vs, bad_bt, bad_len, arrivals, saturated, k2, k2, bad_rows, gran)
                calls += 3
                torch.cuda.synchronize()
                assert int(flag.item()) == 1, "the clamping was not reported"
            print(f"  paged D={d} bits={bits} group={group_size} {gran}: ok", flush=True)
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(kvpack.CUDA_VARIANTS), help="comma-separated (default: all)")
    ap.add_argument("--granularities", default="channel,token")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--decode", action="store_true", help="the KV cache kernels (append, fused decode attention)")
    ap.add_argument("--paged", action="store_true", help="the paged cache kernels only (a part of --decode)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device", file=sys.stderr)
        return 2
    if args.decode or args.paged:
        t0 = time.perf_counter()
        calls = run_paged() if args.paged else run_decode()
        print(f"sanitize_kernels --{'paged' if args.paged else 'decode'}: {calls} kernel calls, {time.perf_counter() - t0:.1f} s")
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(kvpack.CUDA_VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; known: {kvpack.CUDA_VARIANTS}", file=sys.stderr)
        return 2
    dtypes = {k: DTYPES[k] for k in args.dtypes.split(",") if k}
    assert kvpack.available_variants("cuda"), "the extension has no CUDA half"
    t0 = time.perf_counter()
    ok, calls = run(variants, args.granularities.split(","), dtypes, SHAPES)
    torch.cuda.synchronize()
    if not ok:
        return 1
    print(f"sanitize_kernels: {calls} op calls on {len(SHAPES)} shapes, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
