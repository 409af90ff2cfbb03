"""What "negligible overhead" means at decode time.

One decode step reads the whole KV cache once: fp16 attention of one query token over T cached
tokens (``scaled_dot_product_attention``). With an INT8 cache, the cache is first dequantized to
fp16 (our kernel) and then the same attention runs. The ratio of the two times is the overhead
the paper calls negligible. The cache of each of K and V is a [heads * T, head_dim] matrix with
per-channel scales, so that it goes through the public 2-D API unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import bench, workloads


def decode_step_times(T: int, heads: int = 32, head_dim: int = 128, batch: int = 1, variant=None,
                      device: str = "cuda", warmup: int = 3, repeats: int = 20, seed: int = 0) -> dict:
    """Median times of fp16 attention alone and of dequantize(K, V) + the same attention."""
    dev = torch.device(device)
    variant = variant or ops.default_variant(dev)
    rows = batch * heads * T
    k = workloads.uniform(rows, head_dim, seed=seed, dtype="float16", device=dev)
    v = workloads.uniform(rows, head_dim, seed=seed + 1, dtype="float16", device=dev)
    qk, sk = ops.quantize(k, variant, check_finite=False)
    qv, sv = ops.quantize(v, variant, check_finite=False)
    query = workloads.uniform(batch * heads, head_dim, seed=seed + 2, dtype="float16", device=dev)
    query = query.view(batch, heads, 1, head_dim)

    def shaped(m):
        return m.view(batch, heads, T, head_dim)

    def attend(kk, vv):
        return F.scaled_dot_product_attention(query, shaped(kk), shaped(vv))

    def attend_int8():
        kk = ops.dequantize(qk, sk, variant, dtype=torch.float16)
        vv = ops.dequantize(qv, sv, variant, dtype=torch.float16)
        return attend(kk, vv)

    # the two outputs agree to fp16 attention accuracy: dequantization error only
    err = float((attend(k, v).float() - attend_int8().float()).abs().max())
    if dev.type == "cuda":
        flush = bench._L2Flusher(dev)
        t_fp16 = bench.time_cuda(lambda: attend(k, v), warmup, repeats, flush).summary()
        t_int8 = bench.time_cuda(attend_int8, warmup, repeats, flush).summary()
    else:
        t_fp16 = bench.time_cpu(lambda: attend(k, v), 1, min(repeats, 5)).summary()
        t_int8 = bench.time_cpu(attend_int8, 1, min(repeats, 5)).summary()
    cache_fp16_bytes = 2 * rows * head_dim * 2
    return {
        "T": T, "heads": heads, "head_dim": head_dim, "batch": batch, "variant": variant, "device": dev.type,
        "cache_fp16_bytes": cache_fp16_bytes,
        "cache_int8_bytes": 2 * (rows * head_dim + 4 * head_dim),
        "attention_fp16_median_ms": t_fp16["median_ms"], "attention_fp16_p10_ms": t_fp16["p10_ms"],
        "attention_fp16_p90_ms": t_fp16["p90_ms"],
        "dequant_attention_median_ms": t_int8["median_ms"], "dequant_attention_p10_ms": t_int8["p10_ms"],
        "dequant_attention_p90_ms": t_int8["p90_ms"],
        "overhead_ratio": t_int8["median_ms"] / t_fp16["median_ms"],
        "max_abs_output_difference": err,
    }


def run_decode_job(settings: dict, device: str, provenance: dict) -> dict:
    """Decode-step overhead over a list of cache lengths; the record kind is 'decode'."""
    rows = []
    for T in settings.get("T", [131072]):
        try:
            rows.append({"status": "ok", **decode_step_times(
                int(T), int(settings.get("heads", 32)), int(settings.get("head_dim", 128)),
                int(settings.get("batch", 1)), settings.get("variant"), device,
                int(settings.get("warmup", 3)), int(settings.get("repeats", 20)))})
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"status": "skipped", "T": int(T), "skip_reason": f"out of GPU memory: {e}"[:300]})
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"kind": "decode", "workload": {"name": "decode step", **{k: v for k, v in settings.items() if k != "T"}},
            "provenance": provenance, "rows": rows}
