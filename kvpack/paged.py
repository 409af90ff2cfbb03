"""``kvpack.paged``: a paged INT8 (or INT4) KV cache: fixed-size pages from one pool, a block table per sequence.

    cache = PagedKVCache(num_pages, page_size, kv_heads, head_dim, granularity="token", device="cuda")
    a, b = cache.add_sequence(), cache.add_sequence()   # slot ids (host ints)
    cache.append([a, b], k, v)    # k, v [2, Hkv, t_new, D]: pages taken from the pool, quantized on write
    out = cache.attend([b, a], q) # q [2, Hq, D] -> [2, Hq, D]: row 0 attends over b, row 1 over a
    cache.free(a)                 # a's pages go back to the pool, its slot to the free slots

Layout (what ``paged_decode_attention`` reads; HND pages, as FlashInfer's HND layout):

* ``k_pages``, ``v_pages``: int8 ``[num_pages, Hkv, page_size, D]``, page_size a multiple of 16 in
  [16, 256] (a tile of 16 tokens never crosses a page), D in {64, 128, 256};
* ``k_scales``, ``v_scales``: fp32 ``[num_pages, Hkv, page_size]`` for ``granularity="token"`` (a
  scale per token row, in its page's layout) or ``[S, Hkv, D]`` for ``"channel"`` (per sequence
  slot and channel);
* ``block_tables``: int32 ``[S, max_pages_per_seq]`` (S sequence slots): token i of slot s lives in
  page ``block_tables[s, i // page_size]``, row ``i % page_size``;
* ``lengths``: int32 ``[S]``, tokens held per slot;
* ``seq_ids``: int32 ``[B]`` or None: query (append) row b uses slot ``seq_ids[b]``; None means slot b
  (then S == B).

``bits=4`` (``kvpack/int4.py``'s format, in the same page layout): uint8 pages ``[num_pages, Hkv,
page_size, D / 2]`` (two values a byte), value scales (and key scales, ``"token"``) fp32 ``[num_pages,
Hkv, page_size, D / group_size]``, one per group of ``group_size`` channels of a token row; with
``"channel"`` the keys are scaled per channel, ``[S, Hkv, D]``, calibrated by a sequence's first
append (absmax / 7), and the values stay in token groups. On CUDA, groups of 32, 64 or 128.

Arithmetic: the same as ``kvpack.KVCache``. A token row's scale is absmax / 127 and its values are
quantized by quant_math.h's ``quantize_value`` (INT4: absmax / 7 a group, ``quantize_int4_nibble``),
row by row in the same code as the contiguous cache's write (``kernels/decode_cpu.cpp``), so the two
are bit-exact; the per-channel calibration is ``torch_impl.scale_from_absmax`` of the prefill's
absmax, as ``KVCache._calibrate`` computes it. Both functions call the ``torch.ops.kvpack.paged_*``
ops (the format from the pages' dtype: int8, or uint8 for INT4) on CUDA and on the CPU; on the CPU,
attention gathers each chunk's rows from their pages and computes as the contiguous CPU op does:
paged and contiguous results are bit-identical there.

Host synchronisation: the functional API checks shapes, dtypes and devices, never device values;
``PagedKVCache`` keeps the truth on the host (free pages, each sequence's pages and length), so
``append`` and ``attend`` never sync (except a sequence's first channel append: its calibration
reads the scales once, to refuse non-finite input). Each does one small host-to-device copy (the row
slot ids, and the block-table entries of newly taken pages), so a CUDA graph captures the functional
API instead, called with device tensors made beforehand (the pages the replays fill allocated).
"""

from __future__ import annotations

import torch

from . import int4
from .cache import FLOAT_DTYPES, _positive_int
from .decode_attention import (
    GRANULARITIES,
    HEAD_DIMS,
    _contiguous,
    _ensure_loaded,
    _tensor,
    check_granularity,
    check_head_dim,
    check_query_dtype,
    op_pair,
    resolve_sm_scale,
)
from .torch_impl import int4_sym_scale, scale_from_absmax

PAGE_TILE = 16        # page sizes are multiples of the kernels' 16-token tile ...
MAX_PAGE_SIZE = 256   # ... up to 256 (kernels/include/kvpack/decode_checks.h, check_paged)


# --- checks ---------------------------------------------------------------------------------------

def _on(x: torch.Tensor, name: str, device: torch.device, ref: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref} is on {device}; move it with .to({str(device)!r})")


def check_page_size(page_size: int, name: str = "page_size") -> None:
    if not (PAGE_TILE <= page_size <= MAX_PAGE_SIZE and page_size % PAGE_TILE == 0):
        raise ValueError(
            f"{name} = {page_size} is not supported; pages hold a multiple of {PAGE_TILE} tokens in "
            f"[{PAGE_TILE}, {MAX_PAGE_SIZE}] (so that a {PAGE_TILE}-token tile never crosses a page)"
        )


# The CUDA kernels address a token row of the pool (page id * Hkv * page_size + row) in 32 bits.
MAX_POOL_ROWS = 2**32


def check_pool_rows(num_pages: int, kv_heads: int, page_size: int) -> None:
    rows = num_pages * kv_heads * page_size
    if rows > MAX_POOL_ROWS:
        raise ValueError(
            f"the page pool holds num_pages * Hkv * page_size = {rows} token rows; the paged kernels address "
            f"at most 2^32: use fewer pages ({MAX_POOL_ROWS // (kv_heads * page_size)} at most for Hkv = "
            f"{kv_heads}, page_size = {page_size})"
        )


def page_shapes(num_pages: int, kv_heads: int, page_size: int, head_dim: int, slots: int, granularity: str,
                bits: int = 8, group_size: int = int4.DEFAULT_GROUP) -> tuple[tuple, tuple, tuple, torch.dtype]:
    """(pages shape, k_scales shape, v_scales shape, pages dtype) of a paged cache (module doc)."""
    channel = (slots, kv_heads, head_dim)
    if bits == 8:
        token = (num_pages, kv_heads, page_size)
        scales = token if granularity == "token" else channel
        return (num_pages, kv_heads, page_size, head_dim), scales, scales, torch.int8
    groups = (num_pages, kv_heads, page_size, head_dim // group_size)
    return ((num_pages, kv_heads, page_size, head_dim // 2), groups if granularity == "token" else channel, groups,
            torch.uint8)


def _int_tensor(x, name: str, dtype: torch.dtype, shape: tuple, what: str, device: torch.device, ref: str) -> None:
    _tensor(x, name, len(shape), what)
    if x.dtype != dtype:
        fix = "int()" if dtype == torch.int32 else "long()"
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}, got {x.dtype}; pass {name}.{fix}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {what}, got {tuple(x.shape)}")
    _on(x, name, device, ref)
    _contiguous(x, name)


def check_paged_cache(k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity: str,
                      batch: int, device: torch.device, ref: str, bits: int = 8,
                      group_size: int = int4.DEFAULT_GROUP) -> tuple[int, int, int, int, int, int]:
    """The paged cache's tensors (module doc) for ``batch`` rows on ``device``.

    Returns (num_pages, Hkv, page_size, D, S, max_pages_per_seq). Reads no values.
    """
    check_granularity(granularity)
    if bits not in int4.BITS or isinstance(bits, bool):
        int4.check_bits(bits, group_size, 0)  # raises, naming bits (the group is checked once D is known)
    want = torch.int8 if bits == 8 else torch.uint8
    layout = "[num_pages, Hkv, page_size, D] int8" if bits == 8 else "[num_pages, Hkv, page_size, D / 2] uint8"
    for name, p in (("k_pages", k_pages), ("v_pages", v_pages)):
        _tensor(p, name, 4, layout)
        if p.dtype != want:
            raise TypeError(f"{name} must be {str(want)[6:]} for bits={bits} (fill it with "
                            f"kvpack.paged.paged_kv_append), got {p.dtype}")
        _on(p, name, device, ref)
        _contiguous(p, name)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} must have one shape")
    num_pages, hkv, page_size, d = k_pages.shape
    d = d * 2 if bits == 4 else d
    if num_pages < 1 or hkv < 1:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} holds no pages or no KV heads")
    check_page_size(page_size, "page_size (k_pages.shape[2])")
    check_head_dim(d, "D (k_pages.shape[3])" if bits == 8 else "D (2 * k_pages.shape[3])")
    if bits == 4:
        int4.check_bits(bits, group_size, d)
        int4.check_device(device, group_size, d)
    check_pool_rows(num_pages, hkv, page_size)
    _tensor(block_tables, "block_tables", 2, "[S, max_pages_per_seq] int32")
    s, max_pages = block_tables.shape
    if s < 1 or max_pages < 1:
        raise ValueError(f"block_tables must have shape [S >= 1, max_pages_per_seq >= 1], got {tuple(block_tables.shape)}")
    if max_pages * page_size >= 2**31:
        raise ValueError(f"max_pages_per_seq * page_size = {max_pages * page_size} does not fit the int32 lengths")
    _int_tensor(block_tables, "block_tables", torch.int32, (s, max_pages), "[S, max_pages_per_seq]", device, ref)
    _int_tensor(lengths, "lengths", torch.int32, (s,), "[S] (one per sequence slot of block_tables)", device, ref)
    _, k_shape, v_shape, _ = page_shapes(num_pages, hkv, page_size, d, s, granularity, bits, group_size)
    kinds = {3: "[num_pages, Hkv, page_size] (a scale per token row)" if granularity == "token" and bits == 8
             else "[S, Hkv, D] (a scale per sequence slot and channel)",
             4: f"[num_pages, Hkv, page_size, D / group_size] (a scale per {group_size} channels of a token row)"}
    for name, x, shape in (("k_scales", k_scales, k_shape), ("v_scales", v_scales, v_shape)):
        kind = kinds[len(shape)]
        _tensor(x, name, len(shape), kind)
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for granularity={granularity!r}, bits={bits} {kind}, "
                             f"got {tuple(x.shape)}")
        _on(x, name, device, ref)
        _contiguous(x, name)
    if seq_ids is None:
        if s != batch:
            raise ValueError(f"without seq_ids row b uses slot b, so block_tables needs S = {batch} rows (one per "
                             f"row of {ref}), got {s}; pass seq_ids (int32 [{batch}]) to pick the slots")
    else:
        _int_tensor(seq_ids, "seq_ids", torch.int32, (batch,), f"[B = {batch}] (a slot id per row of {ref})",
                    device, ref)
    return num_pages, hkv, page_size, d, s, max_pages


def _check_sm_scale(sm_scale, d: int) -> float:
    if isinstance(sm_scale, bool):
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")  # noqa: TRY004 (the message and type every sm_scale check raises)
    return resolve_sm_scale(sm_scale, d)


def _host_slots(seq_ids, batch: int, s: int) -> torch.Tensor:
    """The rows' slot ids as int64 on the CPU (CPU tensors only: values are read), range-checked."""
    if seq_ids is None:
        return torch.arange(batch)
    slots = seq_ids.long()
    bad = ((slots < 0) | (slots >= s)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"seq_ids[{i}] = {int(slots[i])} is not a slot of block_tables (S = {s})")
    return slots


# --- attention ------------------------------------------------------------------------------------

def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    seq_ids: torch.Tensor | None = None,
    granularity: str = "token",
    sm_scale: float | None = None,
    clamped: torch.Tensor | None = None,
    splits: int = 0,
    bits: int = 8,
    group_size: int = int4.DEFAULT_GROUP,
) -> torch.Tensor:
    """softmax(q K^T * sm_scale) V over a paged int8 cache, one query token per row: ``[B, Hq, D]`` in q's dtype.

    Row b attends over the first ``lengths[slot]`` tokens of ``slot = seq_ids[b]`` (b without seq_ids).
    Values are never read on the host: a seq_ids entry outside [0, S) is clamped to that range, a
    length outside [1, max_pages_per_seq * page_size] to [0, max_pages_per_seq * page_size] (length 0
    gives a zero row), a page id of a table entry the row reads outside [0, num_pages) to that range,
    and ``clamped`` (int32 ``[1]``, optional) gets 1 when any was (it is never reset to 0 here).
    ``splits`` (CUDA): parts per sequence, 0 planned, as in ``kvpack.decode_attention``.

    ``bits=4``: the pages are packed INT4 with scales per ``group_size`` channels (module doc).
    """
    if type(splits) is int and splits >= 0 and granularity in GRANULARITIES:
        # The fast path (CUDA and CPU; a meta q would meet the op's shape-only fake kernel): the op checks
        # every tensor itself (in C++) and reads the format from the pages' dtype; only when it refuses,
        # or the format is not the one asked for, do the checks below run, to name the argument and the fix.
        try:
            if not q.is_meta and ((bits == 8 and k_pages.dtype == torch.int8) or (
                    bits == 4 and k_pages.dtype == torch.uint8 and group_size * v_scales.shape[-1] == q.shape[2])):
                return _paged_op(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids,
                                 granularity, _check_sm_scale(sm_scale, q.shape[2]), splits, clamped)
        except Exception as e:  # noqa: BLE001 (diagnosed below, else raised as it is)
            error = e
        else:
            error = None
        if error is not None:
            _check_paged_call(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity,
                              sm_scale, clamped, splits, bits, group_size)
            raise error
    q, sm_scale = _check_paged_call(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids,
                                    granularity, sm_scale, clamped, splits, bits, group_size)
    return _paged_op(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale,
                     splits, clamped)


_OPS: tuple | None = None  # op_pair("paged_decode_attention") once loaded


def _load_ops() -> tuple:
    global _OPS
    _OPS = op_pair("paged_decode_attention")
    return _OPS


def _paged_op(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale, splits,
              clamped):
    """The op (CUDA or CPU), which checks its tensors itself."""
    plain, flagged = _OPS or _load_ops()
    if clamped is not None:
        return flagged(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale,
                       splits, clamped)
    return plain(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale, splits)


def _check_paged_call(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, sm_scale,
                      clamped, splits, bits=8, group_size=int4.DEFAULT_GROUP):
    """Every check of a paged_decode_attention call, naming the argument and the fix; returns (q, sm_scale)."""
    check_granularity(granularity)
    q = _tensor(q, "q", 3, "[B, Hq, D] (one query token per row)")
    check_query_dtype(q.dtype, q.device, "q")
    b, hq, d = q.shape
    check_head_dim(d, "D (q.shape[2])")
    _contiguous(q, "q")
    dev = q.device
    _, hkv, _, kd, _, _ = check_paged_cache(
        k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, b, dev, "q", bits,
        group_size)
    if kd != d:
        raise ValueError(f"q has head dimension D = {d} but k_pages has {kd}")
    if hq % hkv:
        raise ValueError(f"Hq = {hq} query heads must be a multiple of Hkv = {hkv} KV heads (grouped-query attention)")
    if clamped is not None:
        _int_tensor(clamped, "clamped", torch.int32, (1,), "(a flag the call sets to 1)", dev, "q")
    sm_scale = _check_sm_scale(sm_scale, d)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
        raise ValueError(f"splits must be a non-negative int (0: planned), got {splits!r}")
    return q, sm_scale


# --- append ---------------------------------------------------------------------------------------

def paged_kv_append(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    arrivals: torch.Tensor,
    saturated: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_ids: torch.Tensor | None = None,
    granularity: str = "token",
    bits: int = 8,
    group_size: int = int4.DEFAULT_GROUP,
) -> None:
    """Quantize the t new rows of K and V (``[B, Hkv, t, D]``) into the pages and advance the lengths.

    Row b's tokens go to slot ``seq_ids[b]`` (b without seq_ids) at positions ``lengths[slot] ...
    lengths[slot] + t - 1``, in the pages its block table names; ``lengths[slot]`` grows by t. Token
    granularity writes a scale per row (absmax / 127); channel quantizes with the slot's calibrated
    scales, saturating at +-127 and counting the saturated values into ``saturated`` (int64, shape
    []). ``arrivals`` (int32 ``[S]``, zeros) is the CUDA kernel's counter. The slots of one call
    must be distinct and their pages allocated: on the CPU (values readable) duplicates, a slot outside
    [0, S), a position past max_pages_per_seq * page_size or a page id outside [0, num_pages) raise
    ValueError having written nothing; on CUDA nothing is read on the host, and the caller (e.g.
    ``PagedKVCache``) keeps them valid. ``bits=4``: INT4 pages (module doc); channel keys saturate at
    +-7.
    """
    for name, x in (("k", k), ("v", v)):
        _tensor(x, name, 4, "[B, Hkv, t_new, D]")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must match in shape and dtype")
    _tensor(k_pages, "k_pages", 4, "[num_pages, Hkv, page_size, D] int8 (bits=8) or [..., D / 2] uint8 (bits=4)")
    dev = k_pages.device
    for name, x in (("k", k), ("v", v)):
        _on(x, name, dev, "k_pages")
    b, h, t, d = k.shape
    _, hkv, _, pd, s, _ = check_paged_cache(
        k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity, b, dev, "k", bits,
        group_size)
    if (h, d) != (hkv, pd) or t < 1 or b < 1:
        raise ValueError(f"k must have shape [B >= 1, Hkv, t_new >= 1, D] = [B, {hkv}, t_new, {pd}] (the pages'), "
                         f"got {tuple(k.shape)}")
    _int_tensor(arrivals, "arrivals", torch.int32, (s,), "[S] (the write kernel's counter, zeros)", dev, "k_pages")
    if not isinstance(saturated, torch.Tensor):
        raise TypeError(f"saturated must be a torch.Tensor, got {type(saturated).__name__}")
    if saturated.dtype != torch.int64 or saturated.dim() != 0:
        raise ValueError(f"saturated must be an int64 scalar tensor (shape [], as KVCache.saturated), got "
                         f"{saturated.dtype} {tuple(saturated.shape)}")
    _on(saturated, "saturated", dev, "k_pages")
    k, v = k.contiguous(), v.contiguous()
    _ensure_loaded()
    if dev.type == "cpu":  # values are on the host: checked, so that a bad one raises having written nothing
        _check_append_values(k_pages, block_tables, lengths, k, seq_ids)
    torch.ops.kvpack.paged_kv_append.default(k_pages, v_pages, k_scales, v_scales, block_tables, lengths, arrivals,
                                             saturated, k, v, seq_ids, granularity)


def _check_append_values(k_pages, block_tables, lengths, k, seq_ids) -> None:
    """The CPU append's values: each slot once, room for t more tokens, every page it writes allocated
    (the op, as the CUDA kernel, would clamp them instead)."""
    b, _, t, _ = k.shape
    num_pages, _, page_size, _ = k_pages.shape
    s, max_pages = block_tables.shape
    slots = _host_slots(seq_ids, b, s)
    if len(set(slots.tolist())) != b:
        raise ValueError(f"seq_ids {slots.tolist()} name a slot twice; one call appends to each slot at most once")
    start = lengths.long()[slots]
    for i in range(b):
        if not 0 <= int(start[i]) <= max_pages * page_size - t:
            raise ValueError(f"slot {int(slots[i])} holds {int(start[i])} tokens; appending {t} would pass "
                             f"max_pages_per_seq * page_size = {max_pages * page_size}. Nothing was written")
    pos = start[:, None] + torch.arange(t)[None, :]                     # [B, t]
    pages = block_tables[slots[:, None], pos // page_size].long()       # [B, t]: the entries alone converted
    bad = ((pages < 0) | (pages >= num_pages)).nonzero()
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"block_tables[{int(slots[i])}, {int(pos[i, j]) // page_size}] = {int(pages[i, j])} is not "
                         f"a page id in [0, num_pages = {num_pages}); allocate the page first. Nothing was written")


# --- the cache ------------------------------------------------------------------------------------

class PagedKVCache:
    """A pool of ``num_pages`` int8 pages of ``page_size`` tokens shared by up to ``max_seqs`` sequences.

    ``bits=4``: INT4 pages with scales per ``group_size`` channels of a token (keys per channel with
    ``granularity="channel"``), kvpack/int4.py's arithmetic (module doc).
    """

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, *, granularity: str = "token",
                 device="cuda", dtype=torch.float16, max_seqs: int = 256, max_pages_per_seq: int | None = None,
                 bits: int = 8, group_size: int = int4.DEFAULT_GROUP):
        self.num_pages = _positive_int(num_pages, "num_pages")
        self.page_size = _positive_int(page_size, "page_size")
        self.kv_heads = _positive_int(kv_heads, "kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.max_seqs = _positive_int(max_seqs, "max_seqs")
        self.max_pages_per_seq = _positive_int(num_pages if max_pages_per_seq is None else max_pages_per_seq,
                                               "max_pages_per_seq")
        check_page_size(page_size)
        check_head_dim(head_dim, "head_dim")
        check_granularity(granularity)
        int4.check_bits(bits, group_size, head_dim)
        if self.max_tokens >= 2**31:
            raise ValueError(f"max_pages_per_seq * page_size = {self.max_tokens} does not fit the int32 lengths")
        check_pool_rows(self.num_pages, self.kv_heads, self.page_size)
        self.device = torch.device(device)
        check_query_dtype(dtype, self.device, "dtype (of the queries, outputs and new rows)")
        if bits == 4:
            int4.check_device(self.device, group_size, head_dim)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.granularity = granularity
        self.dtype = dtype
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        shape, k_shape, v_shape, page_dtype = page_shapes(num_pages, kv_heads, page_size, head_dim, max_seqs,
                                                          granularity, bits, group_size)
        dev = self.device
        # Zeros, not empty: rows no sequence holds are never used, but should be defined memory.
        self.k_pages = torch.zeros(shape, dtype=page_dtype, device=dev)
        self.v_pages = torch.zeros(shape, dtype=page_dtype, device=dev)
        self.k_scales = torch.zeros(k_shape, dtype=torch.float32, device=dev)
        self.v_scales = torch.zeros(v_shape, dtype=torch.float32, device=dev)
        self.block_tables = torch.zeros((max_seqs, self.max_pages_per_seq), dtype=torch.int32, device=dev)
        self.saturated = torch.zeros((), dtype=torch.int64, device=dev)  # as KVCache.saturated
        self._lengths = torch.zeros(max_seqs, dtype=torch.int32, device=dev)
        self._arrivals = torch.zeros(max_seqs, dtype=torch.int32, device=dev)
        # Host truth. Free pages and slots are stacks popped from the end: lowest ids first, and a
        # freed sequence's pages are the next ones taken (its first page first).
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}       # live slot -> its pages, in token order
        self._host_lengths: dict[int, int] = {}      # live slot -> tokens held
        self._calibrated: set[int] = set()           # live slots whose channel scales are set

    # --- state ------------------------------------------------------------------------------------

    @property
    def max_tokens(self) -> int:
        """Tokens one sequence can hold: max_pages_per_seq * page_size."""
        return self.max_pages_per_seq * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def sequences(self) -> list[int]:
        """Live slot ids, ascending."""
        return sorted(self._pages)

    @property
    def device_lengths(self) -> torch.Tensor:
        """The lengths the kernels read and the write kernel advances (int32 ``[max_seqs]`` on the device)."""
        return self._lengths

    @property
    def nbytes(self) -> int:
        """Bytes of the pages, their scales and the block tables (the lengths and counters not counted)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.k_pages, self.v_pages, self.k_scales, self.v_scales, self.block_tables))

    def lengths(self, seq_ids) -> list[int]:
        """Tokens held by each of ``seq_ids`` (the host's copy: no device sync)."""
        return [self._host_lengths[s] for s in self._check_ids(seq_ids, "seq_ids", unique=False)]

    def pages(self, seq_id: int) -> list[int]:
        """The page ids a sequence holds, in token order (a copy of the host's list)."""
        return list(self._pages[self._check_ids([seq_id], "seq_id", unique=False)[0]])

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, granularity={self.granularity!r}, bits={self.bits}, "
                f"{f'group_size={self.group_size}, ' if self.bits == 4 else ''}device={str(self.device)!r}, "
                f"max_seqs={self.max_seqs}, max_pages_per_seq={self.max_pages_per_seq}, "
                f"sequences={len(self._pages)}, free_pages={self.num_free_pages}, nbytes={self.nbytes})")

    def _check_ids(self, seq_ids, name: str, unique: bool) -> list[int]:
        if isinstance(seq_ids, torch.Tensor):
            if seq_ids.device.type != "cpu":
                raise ValueError(f"{name} must be host data (a list of ints or a CPU tensor): the cache checks "
                                 "them on the host without a device sync")
            seq_ids = seq_ids.tolist()
        ids = list(seq_ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{name} must be a non-empty list of ints (slot ids from add_sequence), got {seq_ids!r}")
        for i in ids:
            if i not in self._pages:
                raise ValueError(f"sequence {i} is not in the cache (never added, or freed); live: {self.sequences}")
        if unique and len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{name} names sequence {dup} twice; append each sequence's rows once per call")
        return ids

    # --- sequences --------------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """A free slot id for a new, empty sequence."""
        if not self._free_slots:
            raise ValueError(f"all max_seqs = {self.max_seqs} sequence slots are in use; free one first")
        slot = self._free_slots.pop()
        self._pages[slot] = []
        self._host_lengths[slot] = 0
        return slot

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool and its slot to the free slots."""
        slot = self._check_ids([seq_id], "seq_id", unique=False)[0]
        self._free_pages.extend(reversed(self._pages.pop(slot)))
        del self._host_lengths[slot]
        self._calibrated.discard(slot)
        self._free_slots.append(slot)
        self._lengths[slot] = 0  # an asynchronous fill on the device: the next owner starts empty

    # --- write --------------------------------------------------------------------------------------

    def _check_rows(self, k, v, rows: int) -> int:
        for name, x in (("k", k), ("v", v)):
            _tensor(x, name, 4, "[len(seq_ids), Hkv, t_new, D]")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} is {x.dtype} but the cache was made for {self.dtype}; convert it with .to()")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}; move it with .to()")
            b, h, t, d = x.shape
            if (b, h, d) != (rows, self.kv_heads, self.head_dim) or t < 1:
                raise ValueError(
                    f"{name} must have shape [len(seq_ids), Hkv, t_new, D] = [{rows}, {self.kv_heads}, t_new >= 1, "
                    f"{self.head_dim}], got {tuple(x.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
        return k.shape[2]

    def append(self, seq_ids, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize t new rows per sequence (k, v ``[len(seq_ids), Hkv, t, D]``) into pages taken from the pool.

        Raises ValueError, having written and allocated nothing, for an unknown or repeated id, a
        sequence that would pass max_pages_per_seq * page_size tokens, or too few free pages.
        """
        ids = self._check_ids(seq_ids, "seq_ids", unique=True)
        t = self._check_rows(k, v, len(ids))
        need = {}
        for s in ids:
            n = self._host_lengths[s] + t
            if n > self.max_tokens:
                raise ValueError(
                    f"sequence {s} holds {self._host_lengths[s]} tokens; appending {t} would pass max_pages_per_seq"
                    f" * page_size = {self.max_tokens}. Nothing was written"
                )
            need[s] = -(-n // self.page_size) - len(self._pages[s])
        total = sum(need.values())
        if total > len(self._free_pages):
            raise ValueError(f"appending {t} tokens to {len(ids)} sequences needs {total} more pages, "
                             f"{len(self._free_pages)} free. Nothing was written; free a sequence or make a larger pool")
        k, v = k.contiguous(), v.contiguous()
        fresh = [i for i, s in enumerate(ids) if s not in self._calibrated] if self.granularity == "channel" else []
        scales = self._calibration(k, v, fresh) if fresh else None
        # Committed from here on: nothing below raises on valid state.
        entries = []
        for s in ids:
            for _ in range(need[s]):
                page = self._free_pages.pop()
                entries.append((s * self.max_pages_per_seq + len(self._pages[s]), page))
                self._pages[s].append(page)
        b, n = len(ids), len(entries)
        host = torch.tensor(ids + [e[0] for e in entries] + [e[1] for e in entries] + [ids[i] for i in fresh],
                            dtype=torch.int64)
        dev = host.to(self.device, non_blocking=True)  # one small host-to-device copy
        slots = dev[:b].to(torch.int32)
        if entries:
            self.block_tables.view(-1).index_copy_(0, dev[b:b + n], dev[b + n:b + 2 * n].to(torch.int32))
        if scales is not None:
            fresh_slots = dev[b + 2 * n:]
            self.k_scales.index_copy_(0, fresh_slots, scales[0])
            if self.bits == 8:  # INT4 values stay in token groups
                self.v_scales.index_copy_(0, fresh_slots, scales[1])
            self._calibrated.update(ids[i] for i in fresh)
        paged_kv_append(self.k_pages, self.v_pages, self.k_scales, self.v_scales, self.block_tables, self._lengths,
                        self._arrivals, self.saturated, k, v, seq_ids=slots, granularity=self.granularity,
                        **self._format)
        for s in ids:
            self._host_lengths[s] += t

    @property
    def _format(self) -> dict:
        return {"bits": 8} if self.bits == 8 else {"bits": 4, "group_size": self.group_size}

    def _calibration(self, k: torch.Tensor, v: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scales of the given rows' first append: absmax over its tokens / 127 (as KVCache's);
        INT4, the keys' only, / 7 (as KVCache._calibrate)."""
        if self.bits == 8:
            ks, vs = (scale_from_absmax(x[rows].float().abs().amax(dim=2)) for x in (k, v))  # [rows, Hkv, D]
        else:
            ks = int4_sym_scale(k[rows].float().abs().amax(dim=2))
            vs = torch.zeros((), device=ks.device)
        if not bool(torch.isfinite(ks).all() & torch.isfinite(vs).all()):  # the one sync: a prefill's check
            raise ValueError("k or v holds non-finite values (inf or NaN); per-channel scales would be undefined. "
                             "Nothing was written")
        return ks, vs

    # --- read ---------------------------------------------------------------------------------------

    def attend(self, seq_ids, q: torch.Tensor, *, sm_scale: float | None = None, splits: int = 0) -> torch.Tensor:
        """Decode attention of q ``[len(seq_ids), Hq, D]`` (row b over sequence seq_ids[b]): ``[len(seq_ids), Hq, D]``."""
        ids = self._check_ids(seq_ids, "seq_ids", unique=False)
        empty = [s for s in ids if self._host_lengths[s] == 0]
        if empty:
            raise ValueError(f"sequence {empty[0]} holds no tokens; append its prefill before attending")
        if isinstance(q, torch.Tensor) and q.dtype != self.dtype:
            raise TypeError(f"q is {q.dtype} but the cache was made for {self.dtype}")
        if isinstance(q, torch.Tensor) and q.dim() == 3 and q.shape[0] != len(ids):
            raise ValueError(f"q holds {q.shape[0]} rows but seq_ids names {len(ids)} sequences")
        slots = torch.tensor(ids, dtype=torch.int32).to(self.device, non_blocking=True)
        return paged_decode_attention(q, self.k_pages, self.v_pages, self.k_scales, self.v_scales, self.block_tables,
                                      self._lengths, seq_ids=slots, granularity=self.granularity, sm_scale=sm_scale,
                                      splits=splits, **self._format)


__all__ = ["HEAD_DIMS", "MAX_PAGE_SIZE", "PAGE_TILE", "PagedKVCache", "check_page_size", "page_shapes",
           "paged_decode_attention", "paged_kv_append"]
