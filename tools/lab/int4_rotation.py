#!/usr/bin/env python3
"""Would a rotation of the keys (QuaRot's idea) lift INT4's top-1 attention agreement to issue 17's 0.95?

The decode accuracy study's measure (kvpack.study.decode_accuracy.measure: the fused kernel's output
error against float64 attention, and the top-1 agreement of the dequantized keys' scores) on its
synthetic sources, each as drawn and with q and K both multiplied by an orthonormal Hadamard matrix
(scores unchanged: (qH)(KH)^T = qK^T, so only the quantization sees the rotation: whole outlier channels
are spread over every channel of a group). CPU, a few seconds a source.

    python tools/lab/int4_rotation.py [--seeds 4] [--T 1024] [--D 128]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kvpack.study import decode_accuracy as da

FORMATS = ((8, "token"), (8, "channel"), (4, "token"), (4, "channel"))


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester-Hadamard matrix over sqrt(n) (n a power of two): orthonormal, float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args(argv)
    rot = hadamard(args.D)
    print(f"{'source':<14} {'keys':<8} {'bits':>4} {'granularity':<11} {'rel L2':>8} {'top-1':>6}")
    for dist in ("uniform", "outlier_keys"):
        for rotated in (False, True):
            parts = {f: [] for f in FORMATS}
            for seed in range(args.seeds):
                q, K, V = da.synthetic_kv(dist, 1, 8, 2, args.T, args.D, seed=seed)
                if rotated:
                    q, K = (q.double() @ rot).half(), (K.double() @ rot).half()
                for bits, gran in FORMATS:
                    parts[(bits, gran)].append(da.measure(q, K, V, gran, bits=bits))
            for (bits, gran), p in parts.items():
                c = da.combine(p)
                print(f"{dist:<14} {'rotated' if rotated else 'as drawn':<8} {bits:>4} {gran:<11} "
                      f"{c['rel_l2_error']:8.4f} {c['top1_agreement']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
