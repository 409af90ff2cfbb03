"""Fused decode attention over an INT8 KV cache: the Python face of ``torch.ops.kvpack.decode_attention``.

One query token per sequence attends over its int8 cache. On CUDA the kernel
(``kernels/include/kvpack/decode_kernels.cuh``, launched from ``kernels/decode_attention.cu``)
reads int8 K and V and their scales once, straight into registers, and never writes a dequantized
copy; the CPU implementation is fp32 torch ops over chunks of the dequantized cache, each sequence over
its own length.

The cache layout (``kvpack.KVCache`` builds it):

* ``k_cache``, ``v_cache``: int8 ``[B, Hkv, T_max, D]``, contiguous (each sequence's tokens of one
  KV head are one contiguous block), D in {64, 128, 256};
* ``k_scales``, ``v_scales``: fp32, ``[B, Hkv, T_max]`` for ``granularity="token"`` (a scale per
  token row) or ``[B, Hkv, D]`` for ``granularity="channel"`` (the paper's per-channel scales);
* ``lengths``: int32 ``[B]``, tokens held per sequence (1 <= lengths[b] <= T_max), or None (all T_max).

No host synchronisation by default: lengths live on the device and the kernel clamps them to
[0, T_max] (a sequence of length 0 gets a zero row); pass ``clamped`` (int32 ``[1]``) to learn, on
the device, that it happened, or ``check_lengths=True`` to have the call check them on the host.

Grouped-query attention: Hq must be a multiple of Hkv; query head h reads KV head h // (Hq / Hkv).
"""

from __future__ import annotations

import math

import torch

GRANULARITIES = ("token", "channel")
HEAD_DIMS = (64, 128, 256)
QUERY_DTYPES = (torch.float16, torch.bfloat16)

_fakes_registered = False


def _ensure_loaded() -> None:
    global _fakes_registered
    if _fakes_registered:  # the extension is loaded too: once per process, not once per call
        return
    from . import ops

    ops._ensure_loaded()

    @torch.library.register_fake("kvpack::decode_attention")
    def _(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits):
        return torch.empty_like(q)

    @torch.library.register_fake("kvpack::decode_attention_flagged")
    def _(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits, clamped):
        return torch.empty_like(q)

    @torch.library.register_fake("kvpack::paged_decode_attention")
    def _(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale, splits):
        return torch.empty_like(q)

    @torch.library.register_fake("kvpack::paged_decode_attention_flagged")
    def _(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale, splits,
          clamped):
        return torch.empty_like(q)

    @torch.library.register_fake("kvpack::paged_kv_append")
    def _(k_pages, v_pages, k_scales, v_scales, block_tables, lengths, arrivals, saturated, k, v, seq_ids,
          granularity):
        return None

    @torch.library.register_fake("kvpack::kv_append")
    def _(k_cache, v_cache, k_scales, v_scales, lengths, arrivals, saturated, k, v, counts, granularity):
        return None

    _fakes_registered = True


# --- checks ---------------------------------------------------------------------------------------

def _tensor(x, name: str, ndim: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {what}, got shape {tuple(x.shape)}")
    return x


def _same_device(x: torch.Tensor, name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; move it with .to({str(device)!r})")


def _contiguous(x: torch.Tensor, name: str) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel reads it row-major); pass {name}.contiguous()")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def check_query_dtype(dtype: torch.dtype, device, name: str = "q") -> None:
    """fp16 or bf16 queries (what the CUDA kernel reads); the CPU implementation, which computes in
    fp32 anyway, takes fp32 too (a float32 model on the CPU, e.g. a test's exact reference)."""
    allowed = QUERY_DTYPES + ((torch.float32,) if torch.device(device).type == "cpu" else ())
    if dtype not in allowed:
        also = " (or float32 on the CPU)" if torch.device(device).type == "cpu" else ""
        raise TypeError(f"{name} must be float16 or bfloat16{also}, got {dtype}; convert it with .half() or .bfloat16()")


def check_head_dim(d: int, name: str = "D") -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"head dimension {name} = {d} is not supported; the kernels take D in {HEAD_DIMS}")


def check_decode_inputs(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity: str) -> tuple[int, int, int, int, int]:
    """Shapes, dtypes, devices and layouts of a decode_attention call; returns (B, Hq, Hkv, T_max, D)."""
    check_granularity(granularity)
    q = _tensor(q, "q", 3, "[B, Hq, D] (one query token per sequence)")
    check_query_dtype(q.dtype, q.device, "q")
    b, hq, d = q.shape
    check_head_dim(d, "D (q.shape[2])")
    dev = q.device
    _contiguous(q, "q")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(c, name, 4, "[B, Hkv, T_max, D] int8")
        if c.dtype != torch.int8:
            raise TypeError(f"{name} must be int8 (quantize it with kvpack.KVCache.append), got {c.dtype}")
        _same_device(c, name, dev)
        _contiguous(c, name)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    cb, hkv, t_max, cd = k_cache.shape
    if cb != b:
        raise ValueError(f"q holds B = {b} sequences but k_cache holds {cb}")
    if cd != d:
        raise ValueError(f"q has head dimension D = {d} but k_cache has {cd}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq = {hq} query heads must be a multiple of Hkv = {hkv} KV heads (grouped-query attention)")
    if t_max < 1:
        raise ValueError("the cache holds no token slots (T_max = 0)")
    last = t_max if granularity == "token" else d
    kind = "[B, Hkv, T_max] (a scale per token)" if granularity == "token" else "[B, Hkv, D] (a scale per channel)"
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        _tensor(s, name, 3, kind)
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {s.dtype}")
        if tuple(s.shape) != (b, hkv, last):
            raise ValueError(
                f"{name} must have shape {(b, hkv, last)} for granularity={granularity!r} {kind}, got {tuple(s.shape)}"
            )
        _same_device(s, name, dev)
        _contiguous(s, name)
    if lengths is not None:
        _tensor(lengths, "lengths", 1, "[B] int32")
        if lengths.dtype != torch.int32:
            raise TypeError(f"lengths must be int32, got {lengths.dtype}; pass lengths.int()")
        if lengths.shape[0] != b:
            raise ValueError(f"lengths must have one entry per sequence ({b}), got {lengths.shape[0]}")
        _same_device(lengths, "lengths", dev)
        _contiguous(lengths, "lengths")
    return b, hq, hkv, t_max, d


def resolve_sm_scale(sm_scale, d: int) -> float:
    """The softmax scale of a call: 1/sqrt(D) by default, else a positive finite number."""
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
    return float(sm_scale)


def check_flag(clamped, device) -> None:
    """``clamped``: None or an int32 ``[1]`` tensor on the call's device (the kernel sets it to 1)."""
    if clamped is None:
        return
    _tensor(clamped, "clamped", 1, "[1] int32 (set to 1 where a length was clamped)")
    if clamped.dtype != torch.int32:
        raise TypeError(f"clamped must be an int32 tensor of shape [1], got {clamped.dtype}")
    if clamped.shape[0] != 1:
        raise ValueError(f"clamped must be an int32 tensor of shape [1], got shape {tuple(clamped.shape)}")
    if clamped.device != torch.device(device):
        raise ValueError(f"clamped is on {clamped.device} but q is on {device}")


def check_length_values(lengths: torch.Tensor, t_max: int) -> None:
    """1 <= lengths[b] <= T_max. Reads the values: one host synchronisation for a CUDA tensor."""
    lo, hi = (int(v) for v in torch.aminmax(lengths))
    if lo < 1 or hi > t_max:
        bad = int(((lengths < 1) | (lengths > t_max)).nonzero()[0, 0])
        raise ValueError(
            f"lengths[{bad}] = {int(lengths[bad])} is outside [1, T_max = {t_max}]: every sequence must hold at "
            "least one token and no more than the cache's T_max"
        )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --- public API -----------------------------------------------------------------------------------

def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    granularity: str = "token",
    sm_scale: float | None = None,
    check_lengths: bool = False,
    splits: int = 0,
    clamped: torch.Tensor | None = None,
    bits: int = 8,
    group_size: int = 32,
) -> torch.Tensor:
    """softmax(q K^T * sm_scale) V over the int8 cache, one query token per sequence: ``[B, Hq, D]`` in q's dtype.

    ``sm_scale`` defaults to 1/sqrt(D). ``lengths`` (int32 ``[B]``) gives each sequence's token
    count; positions past it are never read into the result.

    Host synchronisation: none by default. The call only queues kernels (no allocation that depends
    on data, so it can be captured in a CUDA graph); out-of-range lengths are clamped to [0, T_max] by
    the kernel rather than read outside the cache, and ``clamped`` (an int32 ``[1]`` tensor on q's
    device, or None) is set to 1 when that happened: read it when convenient (reading it syncs).
    ``check_lengths=True`` opts into a host-side check that raises ValueError (1 <= lengths[b] <=
    T_max), at the cost of one host synchronisation per call on CUDA; skipped while a CUDA graph is
    being captured.

    ``splits`` (CUDA) overrides how many parts each sequence is cut into; 0 plans it from the device
    (its multiprocessor count and the kernel's occupancy) and the shapes.

    ``bits=4``: the cache is packed INT4 (``kvpack/int4.py``'s layout: uint8 ``[B, Hkv, T_max, D / 2]``,
    scales per ``group_size`` channels of a token, keys per channel with ``granularity="channel"``).
    On CUDA the fused kernel reads the nibbles (group sizes 32, 64, 128); everything above holds for it.
    """
    if not check_lengths and type(splits) is int and splits >= 0 and granularity in GRANULARITIES:
        # The fast path (CUDA and CPU; a meta q would meet the op's shape-only fake kernel, which checks no
        # devices): the op checks every tensor itself (in C++); only when it refuses do the
        # checks below run, to name the argument and the fix. Kept short: at B = 1 a step's kernel
        # takes about 10 us, and every microsecond of Python here is one the GPU may wait for.
        try:
            if not q.is_meta and ((bits == 8 and k_cache.dtype == torch.int8) or (
                    bits == 4 and k_cache.dtype == torch.uint8 and group_size * v_scales.shape[-1] == q.shape[2])):
                plain, flagged = _OPS or _load_ops()
                scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else resolve_sm_scale(sm_scale, q.shape[2])
                if clamped is None:
                    return plain(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, scale, splits)
                return flagged(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, scale, splits, clamped)
        except Exception as e:  # noqa: BLE001 (diagnosed below, else raised as it is)
            _diagnose(e, q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, clamped, bits,
                      group_size, splits)
    if bits != 8:
        return _decode_attention_int4(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale,
                                      check_lengths, clamped, bits, group_size, splits)
    _b, _hq, _hkv, t_max, d = check_decode_inputs(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity)
    if lengths is not None and check_lengths and not _capturing(q.device):
        check_length_values(lengths, t_max)
    sm_scale = resolve_sm_scale(sm_scale, d)
    if not isinstance(splits, int) or splits < 0:
        raise ValueError(f"splits must be a non-negative int (0: planned), got {splits!r}")
    check_flag(clamped, q.device)
    return _decode_op(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, float(sm_scale), splits, clamped)


def op_pair(name: str) -> tuple:
    """(op, op_flagged): the overloads of ``torch.ops.kvpack.<name>`` and of its flagged twin, loading
    the extension first; the Python entry points keep them, so that a call looks nothing up."""
    _ensure_loaded()
    ns = torch.ops.kvpack
    return getattr(ns, name).default, getattr(ns, f"{name}_flagged").default


_OPS: tuple | None = None  # op_pair("decode_attention") once loaded


def _load_ops() -> tuple:
    global _OPS
    _OPS = op_pair("decode_attention")
    return _OPS


def _decode_op(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits, clamped):
    """The op (INT8, or INT4 for a uint8 cache), which checks its tensors itself."""
    plain, flagged = _OPS or _load_ops()
    if clamped is not None:
        return flagged(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits, clamped)
    return plain(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits)


def _diagnose(error, q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, clamped, bits,
              group_size, splits):
    """After the op refused a call: the full checks, which raise naming the argument and the fix; if
    they find nothing (an error of the device, say), the op's own error."""
    if bits != 8:
        _check_int4_call(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, False, clamped,
                         bits, group_size, splits)
    else:
        d = check_decode_inputs(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity)[4]
        resolve_sm_scale(sm_scale, d)
        check_flag(clamped, q.device)
    raise error


def _decode_attention_int4(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, check_lengths,
                           clamped, bits, group_size, splits) -> torch.Tensor:
    sm_scale = _check_int4_call(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale,
                                check_lengths, clamped, bits, group_size, splits)
    # the same ops as INT8 (CPU and CUDA): a uint8 cache is INT4, its group D / v_scales.shape[-1]
    return _decode_op(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, splits, clamped)


def _check_int4_call(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity, sm_scale, check_lengths,
                     clamped, bits, group_size, splits) -> float:
    """The checks of an INT4 call (and the lengths' values with check_lengths); returns sm_scale."""
    from . import int4

    check_granularity(granularity)
    q = _tensor(q, "q", 3, "[B, Hq, D] (one query token per sequence)")
    check_query_dtype(q.dtype, q.device, "q")
    d = q.shape[2]
    check_head_dim(d, "D (q.shape[2])")
    int4.check_bits(bits, group_size, d)
    int4.check_device(q.device, group_size, d)
    int4.check_inputs(q, k_cache, v_cache, k_scales, v_scales, granularity, group_size)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_scales", k_scales), ("v_scales", v_scales)):
        _same_device(x, name, q.device)
        _contiguous(x, name)
    _contiguous(q, "q")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"Hq = {q.shape[1]} query heads must be a multiple of Hkv = {k_cache.shape[1]} KV heads "
                         "(grouped-query attention)")
    if lengths is not None:
        _tensor(lengths, "lengths", 1, "[B] int32")
        if lengths.dtype != torch.int32 or lengths.shape[0] != q.shape[0]:
            raise ValueError(f"lengths must be int32 [B = {q.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}")
        _same_device(lengths, "lengths", q.device)
        _contiguous(lengths, "lengths")
        if check_lengths and not _capturing(q.device):
            check_length_values(lengths, k_cache.shape[2])
    check_flag(clamped, q.device)
    if q.device.type != "cpu" and (not isinstance(splits, int) or splits < 0):
        raise ValueError(f"splits must be a non-negative int (0: planned), got {splits!r}")
    return resolve_sm_scale(sm_scale, d)


def decode_splits(q: torch.Tensor, k_cache: torch.Tensor, granularity: str = "token") -> int:
    """How many parts a CUDA decode step cuts each sequence into (planned from the device and the shapes)."""
    _ensure_loaded()
    return int(torch.ops.kvpack.decode_splits.default(q, k_cache, granularity))
