"""Error metrics (float64 accumulation), their closed-form predictions, and memory footprints.

Names follow the paper (arXiv 2601.04719): reconstruction error (L2 and max-abs) and the
attention-score error, its surrogate for attention quality: the mean over rows t of
|q . K[t] - q . K_hat[t]| for one query q drawn uniformly from [-1, 1].

Closed forms, for rounding errors uniform in [-s/2, s/2] (variance s^2 / 12):
  max-abs   = max s / 2                         (= 1/254 = 0.003937 for data in [-1, 1])
  L2        = sqrt(sum over elements of s^2 / 12)  (= sqrt(N) s / sqrt(12) with one scale s)
  attention = sqrt(2/pi) sqrt(sum_d q_d^2 s_d^2 / 12)  (the mean of a half-normal), which for
              q uniform in [-1, 1] (E q^2 = 1/3) is sqrt(2/pi) sqrt(D/3) s / sqrt(12).
"""

from __future__ import annotations

import math

import numpy as np
import torch

FP32_BYTES = 4
INT8_BYTES = 1
SCALE_BYTES = 4  # scales are fp32

_CHUNK_ELEMENTS = 1 << 24  # float64 work buffers of at most 128 MiB, on the tensors' device


def _row_chunks(x: torch.Tensor, x_hat: torch.Tensor):
    """Yield (x, x_hat) row blocks widened to float64, on the tensors' own device."""
    if x.shape != x_hat.shape or x.dim() != 2:
        raise ValueError(f"x and x_hat must be 2-D of one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    for i in range(0, x.shape[0], rows):
        yield x[i : i + rows].double(), x_hat[i : i + rows].to(x.device).double()


def _tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def l2_error(x, x_hat) -> float:
    """||x - x_hat||_2, accumulated in float64."""
    total = 0.0
    for a, b in _row_chunks(_tensor(x), _tensor(x_hat)):
        total += float(torch.sum(torch.square(a - b)))
    return math.sqrt(total)


def max_abs_error(x, x_hat) -> float:
    return max(float(torch.max(torch.abs(a - b))) for a, b in _row_chunks(_tensor(x), _tensor(x_hat)))


def attention_score_error(x, x_hat, query) -> float:
    """The paper's surrogate: mean over rows of |q . x[t] - q . x_hat[t]|, in float64."""
    x, x_hat = _tensor(x), _tensor(x_hat)
    q = _tensor(query).to(x.device, torch.float64)
    if q.shape != (x.shape[1],):
        raise ValueError(f"query must have shape ({x.shape[1]},), got {tuple(q.shape)}")
    total = 0.0
    for a, b in _row_chunks(x, x_hat):
        total += float(torch.sum(torch.abs((a - b) @ q)))
    return total / x.shape[0]


def _f64(a) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)


def predicted_max_abs_error(scales) -> float:
    return float(np.max(_f64(scales))) / 2.0


def predicted_l2_error(scales, shape: tuple[int, int], granularity: str = "channel") -> float:
    s = _f64(scales)
    T, D = shape
    per_scale = T if granularity == "channel" else D  # elements sharing each scale
    return math.sqrt(per_scale * float(np.sum(s * s)) / 12.0)


def predicted_attention_score_error(scales, query=None, granularity: str = "channel") -> float:
    """Expected surrogate error. Per-channel: exact for the given query (or E q^2 = 1/3 if None).

    Per-token scales: the average over rows of the per-row prediction.
    """
    s = _f64(scales)
    if granularity == "channel":
        q2 = np.full_like(s, 1.0 / 3.0) if query is None else np.square(_f64(query))
        return math.sqrt(2.0 / math.pi) * math.sqrt(float(np.sum(q2 * s * s)) / 12.0)
    if query is None:
        raise ValueError("per-token prediction needs the query")
    q2sum = float(np.sum(np.square(_f64(query))))
    return float(np.mean(math.sqrt(2.0 / math.pi) * np.sqrt(q2sum * s * s / 12.0)))


def paper_predictions(T: int, D: int, absmax: float = 1.0) -> dict[str, float]:
    """The closed forms with one scale s = absmax / 127, as the paper's data (uniform [-1, 1]) has."""
    s = absmax / 127.0
    return {
        "predicted_max_abs_error": s / 2.0,
        "predicted_l2_error": math.sqrt(T * D) * s / math.sqrt(12.0),
        "predicted_attention_score_error": math.sqrt(2.0 / math.pi) * math.sqrt(D / 3.0) * s / math.sqrt(12.0),
    }


def memory_footprint(T: int, D: int, granularity: str = "channel", source_bytes: int = FP32_BYTES) -> dict:
    """Bytes of the original cache, of INT8 + fp32 scales, and the compression ratio."""
    n_scales = D if granularity == "channel" else T
    original = T * D * source_bytes
    quantized = T * D * INT8_BYTES
    scales_b = n_scales * SCALE_BYTES
    return {
        "original_bytes": original,
        "int8_bytes": quantized,
        "scales_bytes": scales_b,
        "compressed_bytes": quantized + scales_b,
        "compression_ratio": original / (quantized + scales_b),
    }


__all__ = [
    "attention_score_error",
    "l2_error",
    "max_abs_error",
    "memory_footprint",
    "paper_predictions",
    "predicted_attention_score_error",
    "predicted_l2_error",
    "predicted_max_abs_error",
]
