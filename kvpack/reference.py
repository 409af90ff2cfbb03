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


# --- the INT8 KV cache ----------------------------------------------------------------------------

def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        import torch

        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def dequantize_cache(cache, cache_scales, granularity: str = "token") -> np.ndarray:
    """An int8 cache [B, Hkv, T, D] times its scales ([B, Hkv, T] per token, [B, Hkv, D] per channel), in float64.

    The product of an int8 and an fp32 value is exact in float64: this is the cache's value itself.
    """
    c = _f64(cache)
    s = _f64(cache_scales)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return c * (s[..., :, None] if granularity == "token" else s[..., None, :])


def _decode_operands(q, k, v, lengths, sm_scale):
    """q, k, v in float64, the GQA group size, the softmax scale (1/sqrt(D) by default), the lengths."""
    qa, ka, va = _f64(q), _f64(k), _f64(v)
    b, hq, d = qa.shape
    t = ka.shape[2]
    scale = 1.0 / np.sqrt(d) if sm_scale is None else float(sm_scale)
    lens = np.full(b, t) if lengths is None else np.asarray(_f64(lengths), dtype=np.int64)
    return qa, ka, va, hq // ka.shape[1], scale, lens


def attention_decode(q, k, v, lengths=None, sm_scale=None) -> np.ndarray:
    """Float64 decode attention: softmax(q k^T * sm_scale) v, one query per sequence.

    q [B, Hq, D]; k, v [B, Hkv, T, D] (already real-valued: dequantized, or the unquantized cache);
    query head h attends with KV head h // (Hq / Hkv); sequence b sees its first lengths[b] tokens.
    Returns float64 [B, Hq, D].
    """
    qa, ka, va, group, scale, lens = _decode_operands(q, k, v, lengths, sm_scale)
    b, hq, d = qa.shape
    out = np.empty((b, hq, d))
    for i in range(b):
        n = int(lens[i])
        for h in range(hq):
            kh, vh = ka[i, h // group, :n], va[i, h // group, :n]
            s = kh @ qa[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vh
    return out


def decode_attention(q, k_cache, v_cache, k_scales, v_scales, lengths=None, granularity: str = "token",
                     sm_scale=None) -> np.ndarray:
    """The function kvpack.decode_attention computes, in float64: attention over the dequantized int8 cache."""
    return attention_decode(
        q,
        dequantize_cache(k_cache, k_scales, granularity),
        dequantize_cache(v_cache, v_scales, granularity),
        lengths,
        sm_scale,
    )


def int8_query_error(q, k_scales, granularity: str = "token") -> np.ndarray:
    """|q error| per element, [B, Hq, D], of the fused INT8 kernel's integer query (decode_kernels.cuh,
    KVPACK_INT8_IMMA): it holds q' = q * sm_scale * log2(e) (times the channel's K scale, per
    channel) as an integer of 14 bits, the largest element of each head in [2^13, 2^14], so each
    element is off by at most 2^-14 of that largest one (half a step; 2^-8 more covers the fp32
    rounding of q' before it). In q's units, against the dequantized cache: 2^-14 max_d |q_d| per
    token; per channel 2^-14 max_d |q_d s_d| / s_d (0 where s_d = 0: that channel's keys are 0)."""
    qa = _f64(q)
    hq = qa.shape[1]
    rel = 2.0**-14 * (1 + 2.0**-8)
    if granularity == "token":
        return np.broadcast_to(rel * np.abs(qa).max(axis=-1, keepdims=True), qa.shape).copy()
    s = _f64(k_scales)  # [B, Hkv, D]
    s = np.repeat(s, hq // s.shape[1], axis=1)
    top = rel * np.abs(qa * s).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, top / np.where(s > 0, s, 1.0), 0.0)


def decode_error_bound(q, k, v, lengths=None, sm_scale=None, *, score_rel: float, weight_rel: float,
                       k_err=None, v_err: float = 0.0, out_rel: float = 0.0, q_err=None) -> np.ndarray:
    """A closed-form bound on |out - attention_decode(q, k, v)| per output element, [B, Hq, D].

    Sources of error, each stated as what the computation may perturb:
      score_rel   each product q_d k_td may be off by this relative amount (the query's rounding:
                  2^-11 for fp16, as the fused INT4 kernel stores q' in fp16), so a score moves by at most
                  delta_t = score_rel * sm_scale * sum_d |q_d k_td|;
      k_err       [B, Hkv, T] or None: |K error| per element of token t (a quantized cache: half its
                  scale), moving the score by sm_scale * k_err_t * sum_d |q_d| more;
      q_err       [B, Hq, D] or None: |q error| per element (int8_query_error: the INT8 kernel's
                  integer query), moving the score by sm_scale * sum_d q_err_d |k_td| more;
      weight_rel  each softmax weight's own rounding in the weighted sum (2^-11: P' in fp16);
      v_err       |V error| per element (a quantized cache: half the largest V scale);
      out_rel     the output's own rounding (2^-11 fp16, 2^-8 bf16, relative to |out|).
    Softmax weights w_t = e^{s_t} / sum e^{s}: scores each moved by at most Delta change every weight
    by at most w_t (e^{2 Delta} - 1), so the output, a convex combination of V rows, moves by at most
    (e^{2 Delta} - 1) max_t |v_t|; weight rounding adds weight_rel * max|v|; V errors add v_err.
    """
    qa, ka, va, group, scale, lens = _decode_operands(q, k, v, lengths, sm_scale)
    b, hq, d = qa.shape
    ref = attention_decode(qa, ka, va, lens, scale)
    bound = np.empty((b, hq, d))
    for i in range(b):
        n = int(lens[i])
        for h in range(hq):
            kh, vh = ka[i, h // group, :n], va[i, h // group, :n]
            delta = score_rel * scale * (np.abs(kh) @ np.abs(qa[i, h]))
            if k_err is not None:
                delta = delta + scale * _f64(k_err)[i, h // group, :n] * np.abs(qa[i, h]).sum()
            if q_err is not None:
                delta = delta + scale * (np.abs(kh) @ _f64(q_err)[i, h])
            vmax = np.abs(vh).max(axis=0)
            bound[i, h] = np.expm1(2 * delta.max()) * vmax + weight_rel * vmax + v_err
    return bound + out_rel * np.abs(ref)


# --- INT4 (kvpack/torch_impl.py states the arithmetic; this is its float64 twin) --------------------

INT4_SYM_QMAX = 7
INT4_ASYM_LEVELS = 15


def _fp32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def int4_quantize(x, group: int, symmetric: bool = True, granularity: str = "token"):
    """INT4 of a [T, D] array: ``granularity="token"``: groups of ``group`` consecutive channels of each
    token (row); ``"channel"``: one group per channel over all T tokens (``group`` ignored).
    Returns (nibbles uint8 [T, D], scale, lo or None), scales [T, D / group] or [D]."""
    a = _as_float64(x)
    t, d = a.shape
    if granularity == "channel":
        g = a.T[:, None, :]                      # [D, 1, T]
    elif granularity == "token":
        if group < 1 or d % group:
            raise ValueError(f"group = {group} must divide D = {d}")
        g = a.reshape(t, d // group, group)      # [T, n, group]
    else:
        raise ValueError(f"granularity must be 'token' or 'channel', got {granularity!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            scale = _fp32(np.abs(g).max(axis=-1) / INT4_SYM_QMAX)
            r = _fp32(g / scale[..., None])
            q = np.clip(np.rint(r), -INT4_SYM_QMAX, INT4_SYM_QMAX) + 8
            q = np.where(scale[..., None] == 0, 8, q)
            lo = None
        else:
            lo = g.min(axis=-1)
            scale = _fp32(_fp32(g.max(axis=-1) - lo) / INT4_ASYM_LEVELS)
            r = _fp32(_fp32(g - lo[..., None]) / scale[..., None])
            q = np.clip(np.rint(r), 0, INT4_ASYM_LEVELS)
            q = np.where(scale[..., None] == 0, 0, q)
    nib = q.astype(np.uint8)
    if granularity == "channel":
        return nib[:, 0, :].T.copy(), scale[:, 0], None if lo is None else lo[:, 0]
    return nib.reshape(t, d), scale, lo


def int4_dequantize(nibbles, scale, lo=None, granularity: str = "token") -> np.ndarray:
    """fp32 reconstruction (as float64 holding fp32 values) of :func:`int4_quantize`'s output."""
    n = np.asarray(nibbles, dtype=np.float64)
    d = n.shape[1]
    s = np.asarray(scale, dtype=np.float64)
    if granularity == "channel":
        sb = s[None, :]
        lb = None if lo is None else np.asarray(lo, dtype=np.float64)[None, :]
    else:
        group = d // s.shape[-1]
        sb = np.repeat(s, group, axis=-1)
        lb = None if lo is None else np.repeat(np.asarray(lo, dtype=np.float64), group, axis=-1)
    if lb is None:
        return _fp32((n - 8) * sb)
    return _fp32(_fp32(n * sb) + lb)
