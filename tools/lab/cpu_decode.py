#!/usr/bin/env python3
"""What the CPU ops cost (kernels/decode_cpu.cpp): attention and appends on the CPU, contiguous and paged,
INT8 and INT4, beside fp32 SDPA over the same tokens (repeated for GQA, as a plain fp32 cache would be).

Medians of host wall time over repeated calls (the CPU path has no device events). B sequences, GQA 32/8,
D = 128, fp32, the cache filled to T tokens; pages of 16 for the paged rows (bit-equal to the contiguous
ones, checked first).

    python tools/lab/cpu_decode.py [--points 4096x1 32768x1 4096x4] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F

import kvpack

HQ, HKV, D, PAGE = 32, 8, 128, 16


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(t: int, b: int, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, HKV, t, D, generator=gen) for _ in range(2))
    q = torch.randn(b, HQ, D, generator=gen)
    kr, vr = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], kr, vr), reps)
    print(f"T = {t}, B = {b} (GQA {HQ}/{HKV}, D = {D}, fp32): fp32 SDPA {sdpa:.2f} ms")
    for bits in (8, 4):
        for granularity in ("token", "channel"):
            cache = kvpack.KVCache(b, HKV, D, t + 64, device="cpu", dtype=torch.float32, bits=bits,
                                   granularity=granularity)
            cache.append(k, v)
            attend = median_ms(lambda c=cache: c.attend(q), reps)
            one = torch.randn(b, HKV, 1, D, generator=gen)
            step = kvpack.KVCache(b, HKV, D, reps * 8 + 64, device="cpu", dtype=torch.float32, bits=bits,
                                  granularity=granularity)
            step.append(one, one)
            append_us = median_ms(lambda c=step, x=one: c.append(x, x), reps * 4) * 1e3
            line = f"  INT{bits} {granularity:7s} attend {attend:7.2f} ms   one-token append {append_us:6.0f} us"
            if granularity == "token":
                pages = -(-(t + reps * 8 + 64) // PAGE) * b
                paged = kvpack.PagedKVCache(pages, PAGE, HKV, D, device="cpu", dtype=torch.float32, bits=bits,
                                            max_seqs=b)
                ids = [paged.add_sequence() for _ in range(b)]
                paged.append(ids, k, v)
                assert torch.equal(paged.attend(ids, q), cache.attend(q)), "paged != contiguous"
                p_attend = median_ms(lambda c=paged, i=ids: c.attend(i, q), reps)
                p_append = median_ms(lambda c=paged, i=ids, x=one: c.append(i, x, x), reps * 4) * 1e3
                line += f"   paged: attend {p_attend:7.2f} ms, one-token append {p_append:6.0f} us"
            print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["4096x1", "32768x1", "4096x4"], help="TxB")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for spec in args.points:
        t, b = (int(x) for x in spec.split("x"))
        run(t, b, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
