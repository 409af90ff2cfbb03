"""``kvpack.KVCache``: an INT8 KV cache that quantizes on write and attends with the fused kernel.

    cache = kvpack.KVCache(batch, kv_heads, head_dim, max_tokens, granularity="token", device="cuda")
    cache.append(k, v)            # k, v [B, Hkv, t_new, D]: quantized into the int8 cache, one launch
    out = cache.attend(q)         # q [B, Hq, D] -> [B, Hq, D], fused decode attention over int8

Layout (what ``kvpack.decode_attention`` reads): ``k_cache``/``v_cache`` int8 ``[B, Hkv, T_max, D]``;
``k_scales``/``v_scales`` fp32 ``[B, Hkv, T_max]`` (token) or ``[B, Hkv, D]`` (channel); lengths int32 ``[B]``.

Granularity:

* ``"token"``: each new row of K and V gets its own scale absmax / 127, computed on the fly by the
  write kernel (bit-exact with ``kvpack.reference``). Nothing saturates.
* ``"channel"`` (the paper's): a sequence's first ``append`` with rows for it (its prefill) calibrates
  a scale per (KV head, channel) from those rows (a ragged append that gives a sequence none, a chunk
  of its padding say, leaves it to a later one); later rows are quantized with those scales, values
  beyond them saturate at +-127, and ``saturated`` counts them (a device tensor: reading it syncs).

Ragged appends: ``append(k, v, counts=[...])`` appends the first ``counts[b]`` of the ``t_new`` rows
of sequence b (0 appends nothing to it); ``counts`` is host data (a list or a CPU tensor), since the
cache checks ``max_tokens`` on the host, from its own copy of the lengths, without a device sync.
An append that would take any sequence past ``max_tokens`` raises ValueError and writes nothing.

Host synchronisation: none in ``append`` (token granularity, or channel after calibration) and none
in ``attend``; both only queue kernels, so a decode step can be captured in a CUDA graph (replaying
it appends at the device-side lengths and advances them; the host copy of the lengths is the
caller's to keep in step, or call ``sync_lengths()``). Calibration (the first channel append) reads
the scales once, to refuse non-finite input.
"""

from __future__ import annotations

import torch

from . import int4
from .decode_attention import (
    HEAD_DIMS,
    _ensure_loaded,
    _tensor,
    check_granularity,
    check_head_dim,
    check_query_dtype,
    decode_attention,
)
from .torch_impl import dequantize_torch, int4_sym_scale, scale_from_absmax

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


class KVCache:
    """Preallocated INT8 K and V for ``batch`` sequences of up to ``max_tokens`` tokens each."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_tokens: int, *, granularity: str = "token",
                 device="cuda", dtype=torch.float16, bits: int = 8, group_size: int = int4.DEFAULT_GROUP):
        self.batch = _positive_int(batch, "batch")
        self.kv_heads = _positive_int(kv_heads, "kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        check_head_dim(head_dim, "head_dim")
        check_granularity(granularity)
        if max_tokens >= 2**31:
            raise ValueError(f"max_tokens = {max_tokens} does not fit the int32 lengths; use fewer than 2^31")
        self.device = torch.device(device)
        check_query_dtype(dtype, self.device, "dtype (of the queries and outputs)")
        self.granularity = granularity
        self.dtype = dtype
        int4.check_bits(bits, group_size, head_dim)
        if bits == 4:
            int4.check_device(self.device, group_size, head_dim)
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        shape = (batch, kv_heads, max_tokens, head_dim)
        scale_shape = (batch, kv_heads, max_tokens) if granularity == "token" else (batch, kv_heads, head_dim)
        # Zeros, not empty: slots past a sequence's length are never used, but a sanitizer (and a
        # reader of the buffers) should find defined memory there.
        code = torch.int8
        v_scale_shape = scale_shape
        if bits == 4:  # two values a byte, a scale per group of channels (kvpack/int4.py)
            shape, scale_shape, v_scale_shape = int4.shapes(batch, kv_heads, head_dim, max_tokens, granularity,
                                                            group_size)
            code = torch.uint8
        self.k_cache = torch.zeros(shape, dtype=code, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=code, device=self.device)
        self.k_scales = torch.zeros(scale_shape, dtype=torch.float32, device=self.device)
        self.v_scales = torch.zeros(v_scale_shape, dtype=torch.float32, device=self.device)
        self.saturated = torch.zeros((), dtype=torch.int64, device=self.device)
        self._lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._arrivals = torch.zeros(batch, dtype=torch.int32, device=self.device)  # the write kernel's counter
        self._host_lengths = [0] * batch
        self._calibrated = [granularity == "token"] * batch  # channel: a sequence's scales are set

    # --- state ------------------------------------------------------------------------------------

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per sequence, int32 ``[B]`` on the CPU (the host's copy: no device sync)."""
        return torch.tensor(self._host_lengths, dtype=torch.int32)

    @property
    def device_lengths(self) -> torch.Tensor:
        """The lengths the kernels read and the write kernel advances (int32 ``[B]`` on the cache's device)."""
        return self._lengths

    @property
    def calibrated(self) -> bool:
        """Whether every sequence's channel scales are set (always, with per-token scales)."""
        return all(self._calibrated)

    @property
    def nbytes(self) -> int:
        """Bytes of the cache's buffers: K and V (int8, or packed int4) and their fp32 scales (the lengths not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache, self.k_scales, self.v_scales))

    def sync_lengths(self) -> torch.Tensor:
        """Copy the device lengths to the host copy (one sync), e.g. after replaying a captured append."""
        self._host_lengths = [int(x) for x in self._lengths.tolist()]
        return self.lengths

    def reset(self) -> None:
        """Forget every sequence (lengths to 0; channel granularity calibrates again on the next append)."""
        self._lengths.zero_()
        self._host_lengths = [0] * self.batch
        self.saturated.zero_()
        self._calibrated = [self.granularity == "token"] * self.batch

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"max_tokens={self.max_tokens}, granularity={self.granularity!r}, bits={self.bits}, "
                f"{'' if self.bits == 8 else f'group_size={self.group_size}, '}device={str(self.device)!r}, "
                f"lengths={self._host_lengths}, nbytes={self.nbytes})")

    # --- write --------------------------------------------------------------------------------------

    def _check_rows(self, k, v) -> int:
        for name, x in (("k", k), ("v", v)):
            _tensor(x, name, 4, "[B, Hkv, t_new, D]")
            if x.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}; move it with .to()")
            b, h, t, d = x.shape
            if (b, h, d) != (self.batch, self.kv_heads, self.head_dim) or t < 1:
                raise ValueError(
                    f"{name} must have shape [B, Hkv, t_new, D] = [{self.batch}, {self.kv_heads}, t_new >= 1, "
                    f"{self.head_dim}], got {tuple(x.shape)}"
                )
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must match in shape and dtype")
        return k.shape[2]

    def _check_counts(self, counts, t_new: int) -> list[int]:
        if counts is None:
            return [t_new] * self.batch
        if isinstance(counts, torch.Tensor):
            if counts.device.type != "cpu":
                raise ValueError("counts must be host data (a list or a CPU tensor): the cache checks max_tokens "
                                 "on the host without a device sync")
            counts = counts.tolist()
        counts = list(counts)
        if len(counts) != self.batch or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError(f"counts must hold {self.batch} ints (one per sequence), got {counts!r}")
        for b, c in enumerate(counts):
            if not 0 <= c <= t_new:
                raise ValueError(f"counts[{b}] = {c} must be in [0, t_new = {t_new}]")
        return counts

    def append(self, k: torch.Tensor, v: torch.Tensor, counts=None) -> None:
        """Quantize the new rows of K and V into the cache and advance the lengths (one launch on CUDA).

        ``counts`` (optional, host ints): sequence b appends its first ``counts[b]`` rows.
        Raises ValueError, having written nothing, when a sequence would pass ``max_tokens``.
        """
        t_new = self._check_rows(k, v)
        n = self._check_counts(counts, t_new)
        for b in range(self.batch):
            if self._host_lengths[b] + n[b] > self.max_tokens:
                raise ValueError(
                    f"sequence {b} holds {self._host_lengths[b]} tokens; appending {n[b]} would pass "
                    f"max_tokens = {self.max_tokens}. Nothing was written; make a larger cache or start a new one"
                )
        k, v = k.contiguous(), v.contiguous()
        fresh = self._uncalibrated(n)
        if fresh:  # INT8: K and V per channel, absmax / 127; INT4: the keys only (values in token groups), / 7
            self._calibrate([(k, self.k_scales, int4_sym_scale)] if self.bits == 4 else
                            [(k, self.k_scales, scale_from_absmax), (v, self.v_scales, scale_from_absmax)], n, fresh)
        counts_t = None
        if counts is not None:
            counts_t = torch.tensor(n, dtype=torch.int32).to(self.device, non_blocking=True)
        _ensure_loaded()
        torch.ops.kvpack.kv_append.default(
            self.k_cache, self.v_cache, self.k_scales, self.v_scales, self._lengths, self._arrivals,
            self.saturated, k, v, counts_t, self.granularity,
        )
        self._host_lengths = [length + c for length, c in zip(self._host_lengths, n)]

    def _uncalibrated(self, n: list[int]) -> list[int]:
        """The sequences whose channel scales this append sets: its first rows for them (n[b] > 0)."""
        return [b for b, c in enumerate(n) if c > 0 and not self._calibrated[b]]

    def _calibrate(self, pairs, n: list[int], fresh: list[int]) -> None:
        """Per-channel scales of the sequences ``fresh`` from the rows this append writes for them:
        pairs of (rows [B, Hkv, t_new, D], scales [B, Hkv, D], scale_of(absmax)); absmax over sequence
        b's first n[b] rows. Checked finite before any is stored (one host synchronisation: calibration
        only), so a refused append leaves every scale as it was."""
        t_new = pairs[0][0].shape[2]
        valid = (torch.arange(t_new)[None, :] < torch.tensor(n)[:, None])[:, None, :, None]  # [B, 1, t_new, 1]
        take = torch.zeros(self.batch, 1, 1, dtype=torch.bool)
        take[fresh] = True
        valid, take = valid.to(self.device, non_blocking=True), take.to(self.device, non_blocking=True)
        new = [scale_of(torch.where(valid, x.float().abs(), 0.0).amax(dim=2)) for x, _, scale_of in pairs]
        if not bool(torch.stack([torch.isfinite(s[fresh]).all() for s in new]).all()):  # NaN propagates
            raise ValueError("k or v holds non-finite values (inf or NaN); per-channel scales would be undefined. "
                             "Nothing was written")
        for (_, scales, _), s in zip(pairs, new):
            scales.copy_(torch.where(take, s, scales))
        for b in fresh:
            self._calibrated[b] = True

    # --- read ---------------------------------------------------------------------------------------

    def dequantize(self, tokens: int | None = None, dtype=torch.float32, *,
                   sequences: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``tokens`` slots of every sequence (T_max by default; ``sequences``, a
        slice of the batch, for fewer), dequantized: ``[B, Hkv, tokens, D]`` in ``dtype``, what the
        kernels attend over (computed in fp32, ``[B, Hkv, tokens, D]`` of it at once). Slots at or past a sequence's
        length hold whatever their bytes give (rows of an earlier use; never written, zero bytes, which an
        INT4 cache with channel keys reads as -8 times the key scale): finite values that a caller
        masks. A pass over those slots; no host synchronisation."""
        n = self.max_tokens if tokens is None else tokens
        if not (isinstance(n, int) and 0 <= n <= self.max_tokens):
            raise ValueError(f"tokens must be an int in [0, max_tokens = {self.max_tokens}], got {tokens!r}")
        if not isinstance(sequences, slice):
            raise TypeError(f"sequences must be a slice of the batch, got {type(sequences).__name__}")
        per_channel = self.granularity == "channel"
        rows = (sequences, slice(None), slice(0, n))
        ks = self.k_scales[sequences] if per_channel else self.k_scales[rows]
        if self.bits == 4:
            k = int4.dequantize(self.k_cache[rows], ks, per_channel)
            v = int4.dequantize(self.v_cache[rows], self.v_scales[rows], False)
            return k.to(dtype), v.to(dtype)
        vs = self.v_scales[sequences] if per_channel else self.v_scales[rows]
        return (dequantize_torch(self.k_cache[rows], ks, self.granularity, dtype),
                dequantize_torch(self.v_cache[rows], vs, self.granularity, dtype))

    def attend(self, q: torch.Tensor, *, sm_scale: float | None = None, splits: int = 0) -> torch.Tensor:
        """Fused decode attention of q ``[B, Hq, D]`` (Hq a multiple of Hkv) over the cache: ``[B, Hq, D]``."""
        empty = [b for b, length in enumerate(self._host_lengths) if length == 0]
        if empty:
            raise ValueError(f"sequence {empty[0]} holds no tokens; append its prefill before attending")
        if isinstance(q, torch.Tensor) and q.dtype != self.dtype:
            raise TypeError(f"q is {q.dtype} but the cache was made for {self.dtype}")
        return decode_attention(q, self.k_cache, self.v_cache, self.k_scales, self.v_scales, self._lengths,
                                granularity=self.granularity, sm_scale=sm_scale, check_lengths=False, splits=splits,
                                bits=self.bits, group_size=self.group_size or int4.DEFAULT_GROUP)


__all__ = ["HEAD_DIMS", "KVCache"]
