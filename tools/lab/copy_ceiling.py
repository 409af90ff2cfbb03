#!/usr/bin/env python3
"""Does the copy ceiling depend on what the job before left in the caching allocator? One copy as the
benchmarks took it before 34f12ef (buffers from the cache as it is), after the memory of large jobs
like the decode grid's was freed, against kvpack.study.bench.copy_bandwidth (best of three, fresh
buffers). Prints GB/s per step.

    python tools/lab/copy_ceiling.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from kvpack.study import bench


def one_copy(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_(-1, 1)
    dst = torch.empty_like(src)
    s = bench.time_cuda(partial(dst.copy_, src), 3, 20).summary()
    return bench.gbps(2 * nbytes, s["median_ms"])


def main() -> int:
    print(torch.cuda.get_device_name())
    print(f"fresh process, one copy:            {one_copy():7.0f} GB/s")
    # what the grid's large jobs leave: fp16 K and V, an int8 cache, scales (GB each)
    for label, sizes in (("after a 4 x 8.6 GB job", [8.6, 8.6, 4.3, 4.3]),
                         ("after a 2 x 17 GB + 4 x 4 GB job", [17.2, 17.2, 4.3, 4.3, 4.3, 4.3]),
                         ("after a failed 64 GB allocation", [34.4, 34.4])):
        try:
            held = [torch.empty(int(g * 1e9), dtype=torch.uint8, device="cuda") for g in sizes]
        except torch.cuda.OutOfMemoryError:
            held = []
        del held
        old = one_copy()
        new = bench.copy_bandwidth("cuda")
        print(f"{label:34s} one copy {old:7.0f} GB/s; best of 3 fresh {new['copy_gbps']:7.0f} "
              f"(trials {', '.join(f'{x:.0f}' for x in new['copy_trials_gbps'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
