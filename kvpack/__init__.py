"""kvpack: INT8 KV-cache quantization (a replication of arXiv 2601.04719 and beyond).

    import kvpack
    q, scales = kvpack.quantize(x, variant="vectorized", granularity="channel")
    x_hat = kvpack.dequantize(q, scales, variant="vectorized", granularity="channel", dtype=x.dtype)

    cache = kvpack.KVCache(batch, kv_heads, head_dim, max_tokens, granularity="token", device="cuda")
    cache.append(k, v)        # quantized on write into an int8 [B, Hkv, T_max, D] cache
    out = cache.attend(q)     # fused decode attention over the int8 cache

    paged = kvpack.PagedKVCache(num_pages, page_size, kv_heads, head_dim, device="cuda")
    s = paged.add_sequence(); paged.append([s], k1, v1); out = paged.attend([s], q1)
"""

from .cache import KVCache
from .decode_attention import decode_attention
from .ops import (
    CPU_VARIANTS,
    CUDA_VARIANTS,
    GRANULARITIES,
    VARIANTS,
    available_variants,
    compute_scales,
    default_variant,
    dequantize,
    quantize,
    quantize_fused,
)
from .paged import PagedKVCache, paged_decode_attention, paged_kv_append

__version__ = "0.1.0"

__all__ = [
    "CPU_VARIANTS",
    "CUDA_VARIANTS",
    "GRANULARITIES",
    "VARIANTS",
    "KVCache",
    "PagedKVCache",
    "available_variants",
    "compute_scales",
    "decode_attention",
    "default_variant",
    "dequantize",
    "paged_decode_attention",
    "paged_kv_append",
    "quantize",
    "quantize_fused",
]
