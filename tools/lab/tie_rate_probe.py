"""Does the fast quantize's speed depend on how often elements land near a rounding tie?

bf16 uniform [-1, 1) data has absmax exactly 1.0 in every column, and 1 element in 340 near a tie
(fp16: 1 in 2700, fp32: 1 in 8500); scaling the data by 0.937 moves absmax off 1.0. Times "fast"
quantize on both (CUDA events, L2 read-flushed) and prints the flagged fraction of each.

    python tools/lab/tie_rate_probe.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kvpack import ops
from kvpack.study import bench, workloads


def flagged_fraction(x: torch.Tensor, s: torch.Tensor) -> float:
    xf = x.float()
    r = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    y = (xf * r).clamp(-127, 127)
    return float(((y - y.round()).abs() > 0.5 - 2**-14).float().mean())


def main():
    flush = bench._L2Flusher(torch.device("cuda"))
    T, D = 131072, 8192
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for factor in (1.0, 0.937):
            x = (workloads.uniform(T, D, seed=0, dtype=torch.float32, device="cuda") * factor).to(dtype)
            s = ops.compute_scales(x, check_finite=False)
            frac = flagged_fraction(x[:4096], s)
            t = bench.time_cuda(lambda x=x, s=s: ops.quantize(x, "fast", scales=s, check_finite=False), 3, 20,
                                flush).summary()
            gbps = bench.gbps(bench.op_bytes("quantize", T, D, dtype), t["median_ms"])
            print(f"{dtype!s:>15} x{factor:<6} flagged {frac:.5f}  quantize {t['median_ms']:.3f} ms  {gbps:.0f} GB/s")
            del x


if __name__ == "__main__":
    main()
