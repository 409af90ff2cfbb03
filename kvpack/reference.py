"""The float64 reference quantizer: the ground truth every variant is tested against.

Written in NumPy float64, independently of the extension and of torch's kernels. It computes
the function defined in ``kernels/include/kvpack/quant_math.h`` (the paper's method, arXiv
2601.04719, Sec. 3): per-channel (or per-token) symmetric INT8,

    scale_d = fp32(max_t |K[t, d]| / 127)
    q[t, d] = clamp(round_half_even(fp32(K[t, d] / scale_d)), -127, 127)
    K_hat[t, d] = fp32(q[t, d] * scale_d)

A float64 quotient (or product) of two fp32 values, rounded once to fp32, equals the IEEE fp32
result, so this reference is bit-exact with correct fp32 kernels. A zero scale gives q = 0 and
K_hat = 0 (also where absmax / 127 underflows to 0, for subnormal data).

Subnormal scales (absmax < 127 * 2^-126) are kept, not flushed, as IEEE gradual underflow gives
them: rounded to the 2^-149 grid, so 127 * scale may fall short of absmax by up to 127 * 2^-150
(the largest elements saturate at +-127 with that much more error than scale / 2) or the absmax may
map below 127. quant_math.h states the rule and its bound; tests/test_reference.py checks it.
A NaN (inf) in a channel gives it a NaN (inf) scale (NumPy's max propagates NaN, as the kernels do).
"""

from __future__ import annotations

import numpy as np

QMAX = 127
GRANULARITIES = ("channel", "token")


def _as_float64(x) -> np.ndarray:
    """Any [T, D] array-like (NumPy or torch, fp32/fp16/bf16) as float64 NumPy, exactly."""
    if hasattr(x, "detach"):  # torch tensor: bf16 has no NumPy dtype, widen in torch (exact)
        import torch

        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"reference expects a 2-D [T, D] array, got shape {a.shape}")
    return a


def _axis(granularity: str) -> int:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return 0 if granularity == "channel" else 1  # reduce over tokens (rows) or over channels


def _broadcast(scales: np.ndarray, granularity: str) -> np.ndarray:
    return scales[None, :] if granularity == "channel" else scales[:, None]


def scales(x, granularity: str = "channel") -> np.ndarray:
    """fp32 scales (returned as float64 holding fp32 values): absmax / 127, one per channel or token."""
    a = _as_float64(x)
    absmax = np.abs(a).max(axis=_axis(granularity))
    return (absmax / QMAX).astype(np.float32).astype(np.float64)


def quantize(x, scale=None, granularity: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """Return (q int8, scales float64-holding-fp32). ``scale`` defaults to :func:`scales`."""
    a = _as_float64(x)
    s = scales(a, granularity) if scale is None else _as_float64(np.asarray(scale)[None, :])[0]
    sb = _broadcast(s, granularity)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a / sb).astype(np.float32).astype(np.float64)  # the IEEE fp32 quotient
    q = np.clip(np.rint(r), -QMAX, QMAX)  # np.rint rounds half to even
    q = np.where(sb == 0, 0.0, q)
    return q.astype(np.int8), s


def dequantize(q, scale, granularity: str = "channel") -> np.ndarray:
    """fp32 reconstruction (as float64 holding fp32 values): fp32(q * scale)."""
    qa = np.asarray(q, dtype=np.float64)
    sb = _broadcast(np.asarray(scale, dtype=np.float64), granularity)
    return (qa * sb).astype(np.float32).astype(np.float64)
