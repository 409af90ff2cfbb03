#!/usr/bin/env python3
"""Where the paged INT4 kernel's gap to its contiguous twin comes from: the same cache timed contiguous,
in pages in token order, and in shuffled pages (as the decode grid pages it), INT8 and INT4, in one job.

If the in-order pages run at the contiguous kernel's speed and the shuffled ones do not, the gap is the
memory system's (pages scattered over the pool); if the in-order pages lag too, it is the kernel's.

    python tools/lab/paged_order.py [--points 131072x8x32x32x128 ...] [--page-sizes 16 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kvpack
from kvpack.paged import paged_decode_attention
from kvpack.study import bench
from kvpack.study.decode_step import paged_copy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["131072x8x32x32x128", "32768x32x32x32x128", "32768x8x32x8x64",
                                                      "32768x8x32x8x128"], help="TxBxHqxHkvxD")
    ap.add_argument("--page-sizes", nargs="*", type=int, default=[16, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("paged_order: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    flush = bench._L2Flusher(dev)
    rows = []
    print(f"{'point':<22} {'bits':>4} {'contig us':>10} " + " ".join(f"{'p' + str(p) + ' order':>10} {'p' + str(p) + ' shuf':>10}"
                                                                     for p in args.page_sizes))
    for spec in args.points:
        T, B, hq, hkv, D = (int(x) for x in spec.split("x"))
        for bits in (8, 4):
            gen = torch.Generator(device=dev).manual_seed(0)
            fmt = {} if bits == 8 else {"bits": 4, "group_size": 32}
            cache = kvpack.KVCache(B, hkv, D, T, device=dev, dtype=torch.float16, **fmt)
            for s in range(0, T, 8192):  # fill in chunks: the fp16 source of a whole cache may not fit
                n = min(8192, T - s)
                k = torch.empty(B, hkv, n, D, dtype=torch.float16, device=dev).uniform_(-1, 1, generator=gen)
                cache.append(k, torch.rand_like(k) * 2 - 1)
            q = torch.empty(B, hq, D, dtype=torch.float16, device=dev).uniform_(-1, 1, generator=gen)
            contig = bench.time_cuda(partial(cache.attend, q), 5, args.repeats, flush).summary()["median_ms"]
            row = {"T": T, "batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "bits": bits,
                   "contiguous_median_ms": contig}
            for page in args.page_sizes:
                for shuffle in (False, True):
                    p = paged_copy(cache, page, gen, shuffle=shuffle)
                    a = (q, p["k_pages"], p["v_pages"], p["k_scales"], p["v_scales"], p["block_tables"], p["lengths"])
                    ms = bench.time_cuda(partial(paged_decode_attention, *a, **fmt), 5, args.repeats, flush).summary()["median_ms"]
                    row[f"p{page}_{'shuffled' if shuffle else 'ordered'}_median_ms"] = ms
            rows.append(row)
            print(f"{spec:<22} {bits:>4} {1e3 * contig:10.1f} " + " ".join(
                f"{1e3 * row[f'p{p}_ordered_median_ms']:10.1f} {1e3 * row[f'p{p}_shuffled_median_ms']:10.1f}"
                for p in args.page_sizes), flush=True)
            cache = p = a = None
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "paged_order_lab", "gpu": torch.cuda.get_device_name(),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
