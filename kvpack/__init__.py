"""kvpack: INT8 KV-cache quantization (a replication of arXiv 2601.04719 and beyond).

    import kvpack
    q, scales = kvpack.quantize(x, variant="vectorized", granularity="channel")
    x_hat = kvpack.dequantize(q, scales, variant="vectorized", granularity="channel", dtype=x.dtype)
"""

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

__version__ = "0.1.0"

__all__ = [
    "CPU_VARIANTS",
    "CUDA_VARIANTS",
    "GRANULARITIES",
    "VARIANTS",
    "available_variants",
    "compute_scales",
    "default_variant",
    "dequantize",
    "quantize",
    "quantize_fused",
]
