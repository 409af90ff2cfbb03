"""The paged INT8 (and INT4) KV cache: kvpack.paged (PagedKVCache, paged_kv_append, paged_decode_attention).

CPU tests run everywhere: paged attention and appends bit for bit against the contiguous
kvpack.KVCache fed the same tokens in the same chunks (MHA/GQA/MQA, D 64/128, pages of 16 and 64
tokens, both granularities, fp16 and bf16 queries) and within the CPU tolerance of the float64
reference over the pages gathered here by hand; sequences joining and leaving (freed pages reused),
shuffled and hand-built page tables, ragged lengths, seq_ids subsets in any order; the errors; the
clamping of lengths and page ids. GPU tests (marker gpu) check the paged CUDA kernels against the
contiguous ones bit for bit, and a CUDA graph of a paged decode step. The INT4 pages (bits=4) get the
same twin tests against KVCache(bits=4), on the CPU and on the GPU.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

import kvpack
from kvpack import reference as ref
from kvpack.decode_attention import op_pair
from kvpack.paged import (
    MAX_POOL_ROWS,
    PagedKVCache,
    check_pool_rows,
    page_shapes,
    paged_decode_attention,
    paged_kv_append,
)

HAS_CUDA = torch.cuda.is_available()
OUT_REL = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def rows(b, hkv, t, d, dtype, seed, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=g) * scale
    v = torch.randn(b, hkv, t, d, generator=g)
    k[..., :: max(1, d // 8)] *= 4.0  # a few large channels, as real keys have
    return k.to(dtype).to(device), v.to(dtype).to(device)


def make_q(b, hq, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(b, hq, d, generator=g).to(dtype).to(device)


def gathered(k_pages, v_pages, k_scales, v_scales, block_tables, lengths, seq_ids, granularity):
    """The rows' caches gathered from the pages by plain NumPy indexing (independent of kvpack.paged).
    INT4 pages (uint8): packed rows and group scales alike; their value scales are always per token."""
    int4 = k_pages.dtype == torch.uint8
    kp, vp = k_pages.cpu().numpy(), v_pages.cpu().numpy()
    ksp, vsp = k_scales.cpu().numpy(), v_scales.cpu().numpy()
    table, lens = block_tables.cpu().numpy(), lengths.cpu().numpy()
    p = kp.shape[2]
    out = {"k": [], "v": [], "ks": [], "vs": [], "n": []}
    t_max = table.shape[1] * p
    for s in seq_ids:
        n = int(lens[s])
        tok = np.arange(t_max)
        page, row = table[s, np.minimum(tok // p, table.shape[1] - 1)], tok % p
        page = np.where(tok < n, page, 0)  # entries past the length may be anything
        out["k"].append(kp[page, :, row].transpose(1, 0, 2))
        out["v"].append(vp[page, :, row].transpose(1, 0, 2))
        out["ks"].append(np.swapaxes(ksp[page, :, row], 0, 1) if granularity == "token" else ksp[s])
        out["vs"].append(np.swapaxes(vsp[page, :, row], 0, 1) if granularity == "token" or int4 else vsp[s])
        out["n"].append(n)
    return {key: np.stack(val) for key, val in out.items()}


def check_against_float64(out, q, g, granularity, dtype):
    """The CPU tolerance of tests/test_decode_attention.py: fp32 ops, then one rounding to q's dtype."""
    want = ref.decode_attention(q, g["k"], g["v"], g["ks"], g["vs"], g["n"], granularity)
    tol = OUT_REL[dtype] * np.abs(want) + 1e-5 * np.abs(want).max() + 1e-6
    err = np.abs(out.double().cpu().numpy() - want)
    assert (err <= tol).all(), float((err - tol).max())


def cache_gathered(cache, ids):
    """The cache's rows gathered (``gathered``)."""
    return gathered(cache.k_pages, cache.v_pages, cache.k_scales, cache.v_scales, cache.block_tables,
                    cache.device_lengths, ids, cache.granularity)


def assert_same_rows(paged, contiguous, ids):
    """Each held token's quantized row and scales in the pages equal the contiguous cache's (sequence i
    of ``contiguous`` is slot ids[i]); per-channel scales, per sequence, equal whole."""
    g = cache_gathered(paged, ids)
    for name, cname in (("k", "k_cache"), ("v", "v_cache"), ("ks", "k_scales"), ("vs", "v_scales")):
        want = getattr(contiguous, cname).cpu().numpy()
        per_sequence = paged.granularity == "channel" and (name == "ks" or (name == "vs" and paged.bits == 8))
        for i, length in enumerate(paged.lengths(ids)):
            got, exp = (g[name][i], want[i]) if per_sequence else (g[name][i, :, :length], want[i, :, :length])
            np.testing.assert_array_equal(got, exp, err_msg=name)


# --- paged == contiguous -------------------------------------------------------------------------------

HEADS = {"mha": (4, 1), "gqa": (2, 4), "mqa": (1, 8)}  # (Hkv, Hq / Hkv)


def run_twins(granularity, hkv, d, page_size, dtype, device="cpu", seed=0, shuffle=True, bits=8, group_size=32):
    """A PagedKVCache and a KVCache (same T_max, same format) fed the same tokens in the same chunks:
    three ragged prefills, a decode step of all, a 3-token chunk of a subset, a decode step of the
    subset reversed."""
    fmt = {} if bits == 8 else {"bits": 4, "group_size": group_size}
    num_pages = 160 // page_size + 3
    paged = PagedKVCache(num_pages, page_size, hkv, d, granularity=granularity, device=device, dtype=dtype,
                         max_seqs=5, max_pages_per_seq=num_pages - 1, **fmt)
    if shuffle:
        random.Random(seed).shuffle(paged._free_pages)  # pages taken in random order
    contiguous = kvpack.KVCache(3, hkv, d, paged.max_tokens, granularity=granularity, device=device, dtype=dtype,
                                **fmt)
    ids = [paged.add_sequence() for _ in range(3)]
    prefill = (37, 5, 70)
    k, v = rows(3, hkv, max(prefill), d, dtype, seed + 1, device)
    for i, n in zip(ids, prefill):  # each sequence's prefill its own call (it calibrates its own scales)
        paged.append([i], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
    contiguous.append(k, v, counts=list(prefill))  # one call: KVCache calibrates on its first append
    steps = [(ids, 1, 2.0), ([ids[2], ids[0]], 3, 1.0), ([ids[0], ids[2]], 1, 3.0)]
    for s, (who, t, scale) in enumerate(steps):  # scale > 1: saturation on the channel path
        k, v = rows(len(who), hkv, t, d, dtype, seed + 10 + s, device, scale=scale)
        paged.append(who, k, v)
        full_k = torch.zeros((3, hkv, t, d), dtype=dtype, device=device)
        full_v = torch.zeros_like(full_k)
        full_k[who], full_v[who] = k, v
        contiguous.append(full_k, full_v, counts=[t if i in who else 0 for i in range(3)])
    assert paged.lengths(ids) == contiguous.lengths.tolist() == [42, 6, 75]
    return paged, contiguous, ids


# Every granularity x heads x D x page size, the query dtype alternating so that each (D, page size)
# pair meets both dtypes in each granularity (the full product with both dtypes doubles the time).
TWIN_CASES = [(*c, (torch.float16, torch.bfloat16)[(i + i // 4) % 2]) for i, c in enumerate(
    itertools.product(["token", "channel"], list(HEADS), [64, 128], [16, 64]))]


@pytest.mark.parametrize("granularity,heads,d,page_size,dtype", TWIN_CASES,
                         ids=[f"{g}-{h}-D{d}-P{p}-{str(t)[6:]}" for g, h, d, p, t in TWIN_CASES])
def test_paged_equals_contiguous_cache(granularity, heads, d, page_size, dtype):
    hkv, group = HEADS[heads]
    paged, contiguous, ids = run_twins(granularity, hkv, d, page_size, dtype, seed=d + page_size)
    # The write path: each held token's int8 row and scale equal the contiguous cache's.
    assert_same_rows(paged, contiguous, ids)
    assert int(paged.saturated) == int(contiguous.saturated)
    if granularity == "channel":
        assert int(paged.saturated) > 0
    # Attention: every row order, a subset, bit for bit; and within the float64 reference's tolerance.
    q = make_q(3, hkv * group, d, dtype, seed=d)
    want = contiguous.attend(q)
    for order in ([1], [0, 1, 2], [2, 0], [2, 0, 1]):
        out = paged.attend([ids[i] for i in order], q[order])
        assert out.dtype == dtype and out.shape == (len(order), hkv * group, d)
        assert torch.equal(out, want[order]), order
    check_against_float64(out, q[[2, 0, 1]], cache_gathered(paged, [ids[2], ids[0], ids[1]]), granularity, dtype)


INT4_CASES = [("token", "gqa", 128, 16, 32), ("token", "mha", 64, 32, 64), ("channel", "gqa", 128, 64, 32),
              ("channel", "mqa", 64, 16, 64), ("token", "mqa", 256, 16, 128), ("channel", "mha", 128, 16, 16)]


@pytest.mark.parametrize("granularity,heads,d,page_size,group", INT4_CASES,
                         ids=[f"{g}-{h}-D{d}-P{p}-g{n}" for g, h, d, p, n in INT4_CASES])
def test_paged_int4_equals_contiguous_int4_cache(granularity, heads, d, page_size, group):
    """INT4 pages (bits=4) against KVCache(bits=4) fed the same tokens: the same packed rows and
    scales (keys per channel with "channel", values always in token groups), saturation counts and
    attention bit for bit (KVCache(bits=4) is itself tested against the float64 reference in
    tests/test_int4.py)."""
    hkv, hpk = HEADS[heads]
    dtype = torch.float16 if d != 64 else torch.bfloat16
    paged, contiguous, ids = run_twins(granularity, hkv, d, page_size, dtype, seed=d + group, bits=4,
                                       group_size=group)
    assert paged.k_pages.dtype == torch.uint8 and paged.k_pages.shape[3] == d // 2
    assert_same_rows(paged, contiguous, ids)
    assert int(paged.saturated) == int(contiguous.saturated)
    if granularity == "channel":
        assert int(paged.saturated) > 0  # the decode steps' scale-3 keys pass the calibrated scales
    q = make_q(3, hkv * hpk, d, dtype, seed=d)
    want = contiguous.attend(q)
    for order in ([1], [0, 1, 2], [2, 0]):
        out = paged.attend([ids[i] for i in order], q[order])
        assert out.dtype == dtype and out.shape == (len(order), hkv * hpk, d)
        assert torch.equal(out, want[order]), order


def test_fp32_queries_on_the_cpu():
    paged, contiguous, ids = run_twins("token", 2, 64, 16, torch.float32, seed=3)
    q = make_q(3, 4, 64, torch.float32, seed=3)
    assert torch.equal(paged.attend(ids, q), contiguous.attend(q))


@pytest.mark.parametrize("bits,granularity,page_size", [(8, "token", 48), (8, "channel", 16), (4, "token", 48),
                                                      (4, "channel", 80)])
def test_long_sequences_in_scattered_pages_equal_contiguous(bits, granularity, page_size):
    """Sequences longer than the CPU op's chunks of 1024 tokens, in pages of sizes that do not divide
    1024 (a chunk starts inside a page), their pages interleaved in the pool by alternating appends:
    attention bit for bit the contiguous cache's, in every row order."""
    hkv, d = 2, 64
    paged = kvpack.PagedKVCache(240, page_size, hkv, d, device="cpu", dtype=torch.float32, bits=bits,
                                granularity=granularity)
    contiguous = kvpack.KVCache(3, hkv, d, 2200, device="cpu", dtype=torch.float32, bits=bits,
                                granularity=granularity)
    ids = [paged.add_sequence() for _ in range(3)]
    for s, (who, t) in enumerate([([0, 1, 2], 7), ([1, 0], 300), ([0, 1], 718), ([0], 1075)]):
        k, v = rows(len(who), hkv, t, d, torch.float32, seed=40 + s)
        paged.append([ids[i] for i in who], k, v)
        full_k, full_v = torch.zeros(3, hkv, t, d), torch.zeros(3, hkv, t, d)
        full_k[who], full_v[who] = k, v
        contiguous.append(full_k, full_v, counts=[t if i in who else 0 for i in range(3)])
    assert paged.lengths(ids) == contiguous.lengths.tolist() == [2100, 1025, 7]
    q = make_q(3, hkv * 4, d, torch.float32, seed=5)
    want = contiguous.attend(q)
    for order in ([0, 1, 2], [2, 0], [1]):
        assert torch.equal(paged.attend([ids[i] for i in order], q[order]), want[order]), order


@pytest.mark.parametrize("page_size", [48, 256])
def test_other_page_sizes(page_size):
    """Any multiple of 16 up to 256: 48 (not a power of two), 256 (a sequence within one page)."""
    paged, contiguous, ids = run_twins("channel", 2, 64, page_size, torch.float16, seed=page_size)
    q = make_q(3, 4, 64, torch.float16, seed=4)
    assert torch.equal(paged.attend(ids[::-1], q.flip(0)), contiguous.attend(q).flip(0))


def test_a_pool_of_more_than_2_to_the_32_rows_is_refused_before_anything_is_allocated():
    """The CUDA kernels address a token row of the pool (page id * Hkv * page_size + row) in 32 bits."""
    assert MAX_POOL_ROWS == 2**32
    check_pool_rows(2**24, 1, 256)  # exactly 2^32 rows: allowed
    check_pool_rows(2**20, 16, 256)
    with pytest.raises(ValueError, match=r"num_pages \* Hkv \* page_size = 4294967552 token rows.*at most 2\^32"):
        check_pool_rows(2**24 + 1, 1, 256)
    with pytest.raises(ValueError, match=r"2097152 at most for Hkv = 8"):
        PagedKVCache(2**21 + 1, 256, 8, 64, device="cpu")  # 256 GiB a pool: refused before any allocation


# --- sequences joining and leaving -------------------------------------------------------------------

def test_sequences_join_and_leave_and_freed_pages_are_reused():
    p, hkv, d = 16, 2, 64
    cache = PagedKVCache(8, p, hkv, d, device="cpu", max_seqs=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert (a, b) == (0, 1)
    ka, va = rows(2, hkv, 20, d, torch.float16, 1)
    cache.append([a, b], ka, va)
    assert cache.pages(a) == [0, 1] and cache.pages(b) == [2, 3] and cache.num_free_pages == 4
    kb, vb = rows(1, hkv, 13, d, torch.float16, 2)
    cache.append([b], kb, vb)                                # b: 33 tokens, a third page
    assert cache.pages(b) == [2, 3, 4] and cache.lengths([b, a]) == [33, 20]
    cache.free(a)
    assert cache.num_free_pages == 5 and cache.sequences == [b]
    assert cache.device_lengths[a] == 0                      # the slot's device length reset
    c = cache.add_sequence()
    assert c == a                                            # the slot is reused
    kc, vc = rows(1, hkv, 17, d, torch.float16, 3)
    cache.append([c], kc, vc)
    assert cache.pages(c) == [0, 1]                          # a's pages, first page first
    assert cache.lengths([c, b]) == [17, 33] and cache.device_lengths[:2].tolist() == [17, 33]
    e = cache.add_sequence()
    cache.append([e], *rows(1, hkv, 1, d, torch.float16, 4))
    assert cache.pages(e) == [5] and cache.num_free_pages == 2
    # c's output is that of a contiguous cache holding only c's tokens: a's old rows never leak in.
    q = make_q(2, 4, d, torch.float16, seed=5)
    out = cache.attend([c, b], q)
    for i, (k, v, t) in enumerate(((kc, vc, 17), (torch.cat([ka[1:], kb], 2), torch.cat([va[1:], vb], 2), 33))):
        alone = kvpack.KVCache(1, hkv, d, cache.max_tokens, device="cpu")
        alone.append(k, v)
        assert torch.equal(out[i:i + 1], alone.attend(q[i:i + 1])), i
    cache.free(b)
    cache.free(c)
    cache.free(e)
    assert cache.num_free_pages == 8 and cache.sequences == []


def test_channel_slot_reuse_recalibrates():
    cache = PagedKVCache(4, 16, 1, 64, granularity="channel", device="cpu", max_seqs=1)
    a = cache.add_sequence()
    cache.append([a], *rows(1, 1, 5, 64, torch.float16, 1, scale=100.0))
    big = cache.k_scales[0].clone()
    cache.free(a)
    a = cache.add_sequence()
    k, v = rows(1, 1, 5, 64, torch.float16, 2)
    cache.append([a], k, v)
    np.testing.assert_array_equal(cache.k_scales[0, 0].double().numpy(), ref.scales(k[0, 0], "channel"))
    assert (cache.k_scales[0] < big).all() and int(cache.saturated) == 0


# --- the functional API with hand-built tables ---------------------------------------------------------

@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_functional_api_with_a_hand_built_random_table(granularity):
    p, hkv, d, num_pages, s, max_pages = 16, 2, 128, 12, 4, 3
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(7)).int()
    table = perm[: s * max_pages].reshape(s, max_pages).contiguous()  # every slot's pages, scattered
    k_pages = torch.zeros((num_pages, hkv, p, d), dtype=torch.int8)
    v_pages = torch.zeros_like(k_pages)
    sshape = (num_pages, hkv, p) if granularity == "token" else (s, hkv, d)
    k_scales, v_scales = torch.zeros(sshape), torch.zeros(sshape)
    lengths = torch.zeros(s, dtype=torch.int32)
    arrivals = torch.zeros(s, dtype=torch.int32)
    saturated = torch.zeros((), dtype=torch.int64)
    held = [[] for _ in range(s)]                                   # the rows each slot got, float32
    chunks = [(None, 20), ([3, 1], 9), ([0], 17), ([2, 3, 0], 1)]  # None: row b is slot b
    for step, (ids, t) in enumerate(chunks):
        slots = list(range(s)) if ids is None else ids
        k, v = rows(len(slots), hkv, t, d, torch.bfloat16, 40 + step)
        if granularity == "channel" and step == 0:  # calibrate from the first chunk, as the cache does
            k_scales.copy_(kvpack.torch_impl.scale_from_absmax(k.float().abs().amax(2)))
            v_scales.copy_(kvpack.torch_impl.scale_from_absmax(v.float().abs().amax(2)))
        seq_ids = None if ids is None else torch.tensor(ids, dtype=torch.int32)
        paged_kv_append(k_pages, v_pages, k_scales, v_scales, table, lengths, arrivals, saturated, k, v,
                        seq_ids=seq_ids, granularity=granularity)
        for i, slot in enumerate(slots):
            held[slot].append((k[i], v[i]))
    assert lengths.tolist() == [38, 29, 21, 30] and not arrivals.any()
    g = gathered(k_pages, v_pages, k_scales, v_scales, table, lengths, range(s), granularity)
    for slot in range(s):
        x = {"k": torch.cat([c[0] for c in held[slot]], 1), "v": torch.cat([c[1] for c in held[slot]], 1)}
        n = lengths.tolist()[slot]
        for name in ("k", "v"):
            for h in range(hkv):
                sc = None if granularity == "token" else g[name + "s"][slot, h]
                q_ref, s_ref = ref.quantize(x[name][h], sc, granularity)
                np.testing.assert_array_equal(g[name][slot, h, :n], q_ref)
                if granularity == "token":
                    np.testing.assert_array_equal(g[name + "s"][slot, h, :n], s_ref)
    q = make_q(3, 8, d, torch.bfloat16, seed=8)
    order = [2, 0, 3]
    out = paged_decode_attention(q, k_pages, v_pages, k_scales, v_scales, table, lengths,
                                 seq_ids=torch.tensor(order, dtype=torch.int32), granularity=granularity)
    check_against_float64(out, q, gathered(k_pages, v_pages, k_scales, v_scales, table, lengths, order, granularity),
                          granularity, torch.bfloat16)


def test_functional_append_errors_write_nothing():
    p, hkv, d = 16, 1, 64
    k_pages = torch.zeros((4, hkv, p, d), dtype=torch.int8)
    args = [k_pages, k_pages.clone(), torch.zeros(4, hkv, p), torch.zeros(4, hkv, p),
            torch.tensor([[0, 1], [2, -1]], dtype=torch.int32), torch.tensor([30, 10], dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32), torch.zeros((), dtype=torch.int64)]
    before = [a.clone() for a in args]
    k, v = rows(2, hkv, 3, d, torch.float16, 1)
    with pytest.raises(ValueError, match=r"slot 0 holds 30 tokens; appending 3 would pass max_pages_per_seq \* "
                                         r"page_size = 32"):
        paged_kv_append(*args, k, v)
    k1, v1 = k[1:], v[1:]
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = -1 is not a page id in \[0, num_pages = 4\)"):
        paged_kv_append(*args, k1.repeat(1, 1, 7, 1), v1.repeat(1, 1, 7, 1), seq_ids=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="name a slot twice"):
        paged_kv_append(*args, k, v, seq_ids=torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_ids\[1\] = 2 is not a slot of block_tables \(S = 2\)"):
        paged_kv_append(*args, k, v, seq_ids=torch.tensor([1, 2], dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(args, before))
    with pytest.raises(TypeError, match="seq_ids must be int32"):
        paged_kv_append(*args, k, v, seq_ids=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"saturated must be an int64 scalar tensor \(shape \[\]"):
        paged_kv_append(*args[:7], torch.zeros(1, dtype=torch.int64), k, v)
    with pytest.raises(ValueError, match=r"k must have shape \[B >= 1, Hkv, t_new >= 1, D\] = \[B, 1, t_new, 64\]"):
        paged_kv_append(*args, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    with pytest.raises(TypeError, match="k must be float32, float16 or bfloat16"):
        paged_kv_append(*args, k.int(), v.int())
    paged_kv_append(*args, k1, v1, seq_ids=torch.tensor([1], dtype=torch.int32))  # fits: 10 -> 13
    assert args[5].tolist() == [30, 13]


# --- clamping --------------------------------------------------------------------------------------

def _functional_cache(granularity="token"):
    cache = PagedKVCache(6, 16, 2, 64, granularity=granularity, device="cpu", max_seqs=3, max_pages_per_seq=2)
    ids = [cache.add_sequence() for _ in range(3)]
    cache.append(ids, *rows(3, 2, 32, 64, torch.float16, 11))  # every slot full: 32 = 2 pages of 16
    q = make_q(3, 4, 64, torch.float16, seed=11)
    return cache, q


def _attend(cache, q, lengths, table=None, clamped=None, seq_ids=None):
    return paged_decode_attention(q, cache.k_pages, cache.v_pages, cache.k_scales, cache.v_scales,
                                  cache.block_tables if table is None else table, lengths, seq_ids=seq_ids,
                                  granularity=cache.granularity, clamped=clamped)


def test_the_cpu_append_op_clamps_as_the_kernel_does():
    """torch.ops.kvpack.paged_kv_append on the CPU, called directly (kvpack.paged_kv_append refuses such
    values first): a page id outside the pool is clamped to it, a slot id to [0, S), and rows past
    max_pages * page_size are dropped, as the CUDA write kernel does; nothing outside the pages is touched."""
    def fresh():
        c = PagedKVCache(4, 16, 2, 64, device="cpu", max_seqs=2, max_pages_per_seq=2)
        return [c.k_pages, c.v_pages, c.k_scales, c.v_scales, c.block_tables, c.device_lengths,
                torch.zeros(2, dtype=torch.int32), torch.zeros((), dtype=torch.int64)]

    k, v = rows(1, 2, 20, 64, torch.float16, 12)
    op_pair("paged_decode_attention")  # loads the extension
    op = torch.ops.kvpack.paged_kv_append.default
    want = fresh()
    want[4][1] = torch.tensor([3, 0], dtype=torch.int32)       # slot 1: pages 3, 0
    op(*want, k, v, torch.tensor([1], dtype=torch.int32), "token")
    got = fresh()
    got[4][1] = torch.tensor([9, -2], dtype=torch.int32)       # clamped to 3 and 0
    op(*got, k, v, torch.tensor([7], dtype=torch.int32), "token")  # slot 7 clamped to 1
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)
    assert got[5].tolist() == want[5].tolist() == [0, 20]
    full = fresh()
    full[4][0] = torch.tensor([1, 2], dtype=torch.int32)
    full[5][0] = 25                                             # 7 rows of room: 13 of the 20 dropped
    op(*full, k, v, torch.tensor([0], dtype=torch.int32), "token")
    assert full[5].tolist()[0] == 32
    assert torch.equal(full[0][2, :, 9:], want[0][3, :, :7])     # rows 25..31: k's first 7, in page 2
    assert not full[0][[0, 3]].any()                             # no other page written


def test_lengths_outside_the_range_are_clamped_and_flagged():
    cache, q = _functional_cache()
    flag = torch.zeros(1, dtype=torch.int32)
    good = _attend(cache, q, torch.tensor([32, 7, 1], dtype=torch.int32), clamped=flag)
    assert flag.tolist() == [0]
    out = _attend(cache, q, torch.tensor([33, 7, 1], dtype=torch.int32), clamped=flag)
    assert flag.tolist() == [1] and torch.equal(out, good)  # 33 read as 32
    _attend(cache, q, torch.tensor([32, 7, 1], dtype=torch.int32), clamped=flag)
    assert flag.tolist() == [1]  # never reset to 0
    for bad in (0, -5):
        flag.zero_()
        out = _attend(cache, q, torch.tensor([32, bad, 1], dtype=torch.int32), clamped=flag)
        assert flag.tolist() == [1]
        assert not out[1].any() and torch.equal(out[[0, 2]], good[[0, 2]])  # a zero row, the others untouched
    # A slot id outside [0, S) is clamped to it (as the CUDA kernel does).
    flag.zero_()
    out = _attend(cache, q, torch.tensor([32, 7, 1], dtype=torch.int32), clamped=flag,
                  seq_ids=torch.tensor([-1, 1, 5], dtype=torch.int32))
    assert flag.tolist() == [1] and torch.equal(out, good)
    # Without a flag tensor the clamping still happens.
    assert torch.equal(_attend(cache, q, torch.tensor([2**31 - 1, 7, 1], dtype=torch.int32)), good)


def test_page_ids_outside_the_pool_are_clamped_and_flagged():
    cache, q = _functional_cache()
    lengths = torch.tensor([32, 7, 1], dtype=torch.int32)
    flag = torch.zeros(1, dtype=torch.int32)
    table = cache.block_tables.clone()
    table[1, 1] = -3    # slot 1 holds 7 tokens: its second entry is never read, whatever it holds
    table[2, 1] = 99
    good = _attend(cache, q, lengths, table, flag)
    assert flag.tolist() == [0] and torch.equal(good, _attend(cache, q, lengths))
    table[0, 1] = 99    # read by slot 0 (32 tokens): clamped to the last page, 5
    want_table = table.clone()
    want_table[0, 1] = 5
    out = _attend(cache, q, lengths, table, flag)
    assert flag.tolist() == [1] and torch.equal(out, _attend(cache, q, lengths, want_table))
    table[0, 1] = -1    # clamped to page 0
    want_table[0, 1] = 0
    flag.zero_()
    out = _attend(cache, q, lengths, table, flag)
    assert flag.tolist() == [1] and torch.equal(out, _attend(cache, q, lengths, want_table))


# --- errors: the cache ------------------------------------------------------------------------------

def _state(cache):
    return [t.clone() for t in (cache.k_pages, cache.v_pages, cache.k_scales, cache.v_scales, cache.block_tables,
                                cache.device_lengths, cache.saturated)]


def test_running_out_of_pages_writes_and_allocates_nothing():
    cache = PagedKVCache(5, 16, 1, 64, device="cpu", max_seqs=3)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a, b], *rows(2, 1, 20, 64, torch.float16, 1))  # 2 pages each: 1 free
    before, free = _state(cache), cache.num_free_pages
    with pytest.raises(ValueError, match=r"needs 2 more pages, 1 free\. Nothing was written"):
        cache.append([a, b], *rows(2, 1, 13, 64, torch.float16, 2))
    assert all(torch.equal(x, y) for x, y in zip(before, _state(cache)))
    assert cache.num_free_pages == free == 1 and cache.lengths([a, b]) == [20, 20]
    assert cache.pages(a) == [0, 1] and cache.pages(b) == [2, 3]
    cache.append([b], *rows(1, 1, 13, 64, torch.float16, 2))  # one of them fits
    assert cache.num_free_pages == 0 and cache.lengths([a, b]) == [20, 33]
    cache.append([a], *rows(1, 1, 12, 64, torch.float16, 3))  # fills a's second page: no new page needed
    assert cache.lengths([a]) == [32]


def test_cache_errors():
    cache = PagedKVCache(8, 16, 2, 64, device="cpu", max_seqs=2, max_pages_per_seq=2)
    a = cache.add_sequence()
    k, v = rows(1, 2, 3, 64, torch.float16, 1)
    cache.append([a], k, v)
    before = _state(cache)
    with pytest.raises(ValueError, match=r"sequence 7 is not in the cache \(never added, or freed\); live: \[0\]"):
        cache.append([7], k, v)
    b = cache.add_sequence()
    with pytest.raises(ValueError, match="all max_seqs = 2 sequence slots are in use"):
        cache.add_sequence()
    with pytest.raises(ValueError, match="seq_ids names sequence 0 twice"):
        cache.append([a, a], k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="seq_ids must be a non-empty list of ints"):
        cache.append([], k[:0], v[:0])
    with pytest.raises(ValueError, match="seq_ids must be a non-empty list of ints"):
        cache.append([True], k, v)
    with pytest.raises(ValueError, match=r"sequence 0 holds 3 tokens; appending 30 would pass max_pages_per_seq \* "
                                         r"page_size = 32"):
        cache.append([a], k.repeat(1, 1, 10, 1), v.repeat(1, 1, 10, 1))
    with pytest.raises(TypeError, match="k is torch.float32 but the cache was made for torch.float16"):
        cache.append([a], k.float(), v.float())
    with pytest.raises(TypeError, match="k is torch.int32"):
        cache.append([a], k.int(), v.int())
    with pytest.raises(ValueError, match=r"k must have shape \[len\(seq_ids\), Hkv, t_new, D\] = \[2, 2, t_new >= 1, "
                                         r"64\], got \(1, 2, 3, 64\)"):
        cache.append([a, b], k, v)
    with pytest.raises(ValueError, match="must have one shape"):
        cache.append([a], k, v[:, :, :2])
    with pytest.raises(ValueError, match="k is on meta but the cache is on cpu"):
        cache.append([a], k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="must be host data"):
        cache.append(torch.tensor([a]).to("meta"), k, v)
    assert all(torch.equal(x, y) for x, y in zip(before, _state(cache)))
    assert cache.lengths([a, b]) == [3, 0] and cache.num_free_pages == 7
    q = make_q(1, 4, 64, torch.float16, seed=1)
    with pytest.raises(ValueError, match="sequence 1 holds no tokens"):
        cache.attend([b], q)
    with pytest.raises(TypeError, match="q is torch.bfloat16 but the cache was made for torch.float16"):
        cache.attend([a], q.bfloat16())
    with pytest.raises(ValueError, match="q holds 1 rows but seq_ids names 2 sequences"):
        cache.attend([a, a], q)
    with pytest.raises(ValueError, match="Hq = 3 query heads must be a multiple of Hkv = 2"):
        cache.attend([a], q[:, :3].contiguous())
    with pytest.raises(ValueError, match=r"q must be a 3-D tensor"):
        cache.attend([a], q[0])
    assert torch.equal(cache.attend([a, a], q.repeat(2, 1, 1))[1], cache.attend([a], q)[0])  # repeats: fine
    cache.free(a)
    for call in (lambda: cache.attend([a], q), lambda: cache.free(a), lambda: cache.lengths([a]),
                 lambda: cache.append([a], k, v), lambda: cache.pages(a)):
        with pytest.raises(ValueError, match="sequence 0 is not in the cache"):
            call()


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"page_size = 24 is not supported; pages hold a multiple of 16 tokens in "
                                         r"\[16, 256\]"):
        PagedKVCache(4, 24, 1, 64, device="cpu")
    with pytest.raises(ValueError, match="page_size = 512 is not supported"):
        PagedKVCache(4, 512, 1, 64, device="cpu")
    with pytest.raises(ValueError, match="head_dim = 96 is not supported"):
        PagedKVCache(4, 16, 1, 96, device="cpu")
    with pytest.raises(ValueError, match="num_pages must be a positive int"):
        PagedKVCache(0, 16, 1, 64, device="cpu")
    with pytest.raises(ValueError, match="max_seqs must be a positive int"):
        PagedKVCache(4, 16, 1, 64, device="cpu", max_seqs=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        PagedKVCache(4, 16, 1, 64, device="cpu", granularity="tensor")
    with pytest.raises(TypeError, match=r"dtype .* must be float16 or bfloat16 \(or float32 on the CPU\)"):
        PagedKVCache(4, 16, 1, 64, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="does not fit the int32 lengths"):
        PagedKVCache(4, 256, 1, 64, device="cpu", max_pages_per_seq=2**23)


def test_channel_non_finite_prefill_is_refused_having_written_nothing():
    cache = PagedKVCache(4, 16, 1, 64, granularity="channel", device="cpu", max_seqs=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a], *rows(1, 1, 4, 64, torch.float16, 1))
    before = _state(cache)
    k, v = rows(2, 1, 4, 64, torch.float16, 2)
    v[1, 0, 2, 9] = float("inf")
    with pytest.raises(ValueError, match="non-finite values"):
        cache.append([a, b], k, v)
    assert all(torch.equal(x, y) for x, y in zip(before, _state(cache)))
    assert cache.lengths([a, b]) == [4, 0] and cache.num_free_pages == 3
    v[1, 0, 2, 9] = 0.0
    cache.append([a, b], k, v)  # b calibrates from these rows, a keeps its scales
    np.testing.assert_array_equal(cache.v_scales[b, 0].double().numpy(), ref.scales(v[1, 0], "channel"))
    assert torch.equal(cache.k_scales[a], before[2][a])


def test_nbytes_and_repr():
    cache = PagedKVCache(10, 32, 2, 128, device="cpu", max_seqs=4, max_pages_per_seq=5)
    assert cache.nbytes == 2 * 10 * 2 * 32 * 128 + 2 * 10 * 2 * 32 * 4 + 4 * 5 * 4
    ch = PagedKVCache(10, 32, 2, 128, granularity="channel", device="cpu", max_seqs=4, max_pages_per_seq=5)
    assert ch.nbytes == 2 * 10 * 2 * 32 * 128 + 2 * 4 * 2 * 128 * 4 + 4 * 5 * 4
    assert cache.max_tokens == 160
    cache.add_sequence()
    assert repr(cache) == ("PagedKVCache(num_pages=10, page_size=32, kv_heads=2, head_dim=128, granularity='token', "
                           f"bits=8, device='cpu', max_seqs=4, max_pages_per_seq=5, sequences=1, free_pages=10, "
                           f"nbytes={cache.nbytes})")
    # INT4: half a byte a value, a scale per group of a token (keys per channel and slot with "channel")
    c4 = PagedKVCache(10, 32, 2, 128, device="cpu", max_seqs=4, max_pages_per_seq=5, bits=4, group_size=64)
    assert c4.nbytes == 2 * 10 * 2 * 32 * 64 + 2 * 10 * 2 * 32 * 2 * 4 + 4 * 5 * 4
    ch4 = PagedKVCache(10, 32, 2, 128, granularity="channel", device="cpu", max_seqs=4, max_pages_per_seq=5, bits=4)
    assert ch4.nbytes == 2 * 10 * 2 * 32 * 64 + 4 * 2 * 128 * 4 + 10 * 2 * 32 * 4 * 4 + 4 * 5 * 4
    assert (ch4.k_pages.dtype, tuple(ch4.k_pages.shape), tuple(ch4.v_scales.shape)) == (
        torch.uint8, (10, 2, 32, 64), (10, 2, 32, 4))
    assert "bits=4, group_size=64, device='cpu'" in repr(c4)


# --- errors: the functional attention -------------------------------------------------------------

def _good_args():
    cache, q = _functional_cache()
    return {"q": q, "k_pages": cache.k_pages, "v_pages": cache.v_pages, "k_scales": cache.k_scales,
            "v_scales": cache.v_scales, "block_tables": cache.block_tables, "lengths": cache.device_lengths.clone()}


BAD = [
    ("q", lambda a: a["q"].double(), TypeError, r"q must be float16 or bfloat16 \(or float32 on the CPU\)"),
    ("q", lambda a: a["q"][0], ValueError, r"q must be a 3-D tensor \[B, Hq, D\]"),
    ("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2), ValueError, "q must be contiguous"),
    ("q", lambda a: a["q"][:, :3].contiguous(), ValueError, "Hq = 3 query heads must be a multiple of Hkv = 2"),
    ("q", lambda a: a["q"][:2], ValueError, r"without seq_ids row b uses slot b, so block_tables needs S = 2 rows"),
    ("q", lambda a: a["q"].repeat(1, 1, 2), ValueError, "q has head dimension D = 128 but k_pages has 64"),
    ("q", lambda a: a["q"][..., :32].contiguous(), ValueError, "head dimension D"),
    ("q", lambda a: a["q"].to("meta"), ValueError, "k_pages is on cpu but q is on meta"),
    ("k_pages", lambda a: a["k_pages"].float(), TypeError, "k_pages must be int8"),
    ("k_pages", lambda a: a["k_pages"][0], ValueError, r"k_pages must be a 4-D tensor"),
    ("v_pages", lambda a: a["v_pages"][:, :, :8].contiguous(), ValueError, "must have one shape"),
    ("k_pages", lambda a: a["k_pages"].transpose(2, 3), ValueError, "must have one shape|k_pages must be contiguous"),
    ("k_scales", lambda a: a["k_scales"].double(), TypeError, "k_scales must be float32"),
    ("v_scales", lambda a: a["v_scales"][:, :, :3], ValueError, r"v_scales must have shape \(6, 2, 16\)"),
    ("block_tables", lambda a: a["block_tables"].long(), TypeError, r"block_tables must be int32, got torch.int64"),
    ("block_tables", lambda a: a["block_tables"].t(), ValueError, r"block_tables must be contiguous"),
    ("block_tables", lambda a: a["block_tables"][0], ValueError, r"block_tables must be a 2-D tensor"),
    ("lengths", lambda a: a["lengths"].long(), TypeError, "lengths must be int32"),
    ("lengths", lambda a: a["lengths"][:2], ValueError, r"lengths must have shape \(3,\)"),
]


@pytest.mark.parametrize("name,bad,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_paged_decode_attention_bad_input(name, bad, exc, match):
    args = _good_args()
    args[name] = bad(args)
    with pytest.raises(exc, match=match):
        paged_decode_attention(*args.values())


def test_paged_decode_attention_other_errors():
    args = _good_args()
    pages = args["k_pages"]
    with pytest.raises(ValueError, match=r"page_size \(k_pages.shape\[2\]\) = 8 is not supported"):
        paged_decode_attention(**{**args, "k_pages": pages[:, :, :8].contiguous(),
                                  "v_pages": pages[:, :, :8].contiguous(), "k_scales": args["k_scales"][:, :, :8],
                                  "v_scales": args["v_scales"][:, :, :8]})
    with pytest.raises(ValueError, match="granularity must be one of"):
        paged_decode_attention(**args, granularity="tensor")
    with pytest.raises(ValueError, match=r"k_scales must have shape \(3, 2, 64\) for granularity='channel'"):
        paged_decode_attention(**args, granularity="channel")
    with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
        paged_decode_attention(**args, sm_scale=float("nan"))
    with pytest.raises(ValueError, match="splits must be a non-negative int"):
        paged_decode_attention(**args, splits=-1)
    with pytest.raises(TypeError, match="clamped must be int32"):
        paged_decode_attention(**args, clamped=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"clamped must have shape \(1,\)"):
        paged_decode_attention(**args, clamped=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_ids must be int32"):
        paged_decode_attention(**args, seq_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"seq_ids must have shape \(3,\) \[B = 3\]"):
        paged_decode_attention(**args, seq_ids=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="block_tables must be a torch.Tensor"):
        paged_decode_attention(**{**args, "block_tables": [[0, 1]]})
    sub = {**args, "q": args["q"][[2, 2]]}  # a subset with a repeat: rows of the same slot agree
    out = paged_decode_attention(**sub, seq_ids=torch.tensor([2, 2], dtype=torch.int32))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], paged_decode_attention(**args)[2])



def test_int4_format_errors():
    """The format asked for (bits, group_size) must be the pages' own: a clear error otherwise, for the
    functions and the cache alike, and nothing allocated or written."""
    args = _good_args()  # int8 pages, D = 64, token scales
    with pytest.raises(TypeError, match="k_pages must be uint8 for bits=4"):
        paged_decode_attention(**args, bits=4)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        paged_decode_attention(**args, bits=3)
    shape, k_shape, v_shape, dt = page_shapes(6, 2, 16, 64, 3, "token", bits=4, group_size=32)
    assert (shape, k_shape, v_shape, dt) == ((6, 2, 16, 32), (6, 2, 16, 2), (6, 2, 16, 2), torch.uint8)
    int4_args = {**args, "k_pages": torch.zeros(shape, dtype=dt), "v_pages": torch.zeros(shape, dtype=dt),
                 "k_scales": torch.zeros(k_shape), "v_scales": torch.zeros(v_shape)}
    with pytest.raises(TypeError, match="k_pages must be int8 for bits=8"):
        paged_decode_attention(**int4_args)
    with pytest.raises(ValueError, match=r"k_scales must have shape \(6, 2, 16, 4\) .*bits=4"):
        paged_decode_attention(**int4_args, bits=4, group_size=16)
    with pytest.raises(ValueError, match="group_size = 48 must be an even divisor of head_dim = 64"):
        paged_decode_attention(**int4_args, bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"v_scales must be a 4-D tensor \[num_pages, Hkv, page_size, D / group_size\]"):
        paged_decode_attention(**{**int4_args, "k_scales": torch.zeros(3, 2, 64), "v_scales": torch.zeros(3, 2, 64)},
                               bits=4, granularity="channel", group_size=32)
    out = paged_decode_attention(**int4_args, bits=4)  # well-formed (all-zero scales): zeros
    assert out.shape == args["q"].shape and not out.any()
    saturated, arrivals = torch.zeros((), dtype=torch.int64), torch.zeros(3, dtype=torch.int32)
    k = torch.ones(3, 2, 1, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="k_pages must be uint8 for bits=4"):
        paged_kv_append(args["k_pages"], args["v_pages"], args["k_scales"], args["v_scales"], args["block_tables"],
                        args["lengths"], arrivals, saturated, k, k, bits=4)
    for kwargs, match in (({"bits": 2}, "bits must be 8 or 4"),
                          ({"bits": 4, "group_size": 24}, "group_size = 24 must be an even divisor of head_dim = 128")):
        with pytest.raises(ValueError, match=match):
            PagedKVCache(10, 16, 2, 128, device="cpu", **kwargs)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="group_size = 16 is not built for CUDA"):
            PagedKVCache(10, 16, 2, 128, device="cuda", bits=4, group_size=16)

# --- GPU ------------------------------------------------------------------------------------------

def gpu_twins(granularity, hkv, d, page_size, dtype, seed, **fmt):
    """run_twins on the GPU and on the CPU; checks the write path: the CUDA pages bit for bit with the
    contiguous CUDA cache and with the paged CPU cache, the same saturation counts, the write kernel's
    counters reset. Returns (paged, contiguous, ids, cpu_paged)."""
    paged, contiguous, ids = run_twins(granularity, hkv, d, page_size, dtype, device="cuda", seed=seed, **fmt)
    cpu_paged, _, _ = run_twins(granularity, hkv, d, page_size, dtype, device="cpu", seed=seed, **fmt)
    torch.cuda.synchronize()
    assert not paged._arrivals.any()  # the write kernel reset its counter
    assert int(paged.saturated) == int(contiguous.saturated) == int(cpu_paged.saturated)
    assert_same_rows(paged, contiguous, ids)
    for name in ("k_pages", "v_pages", "k_scales", "v_scales", "block_tables"):
        assert torch.equal(getattr(paged, name).cpu(), getattr(cpu_paged, name)), name
    return paged, contiguous, ids, cpu_paged


def assert_gpu_attention_as_contiguous(paged, contiguous, ids, q, order):
    """The functional paged call over rows ``order`` (slots ids[order]) equals the contiguous cache's
    attention bit for bit at split counts 1, 3 and 8 (the same T_max, the same arithmetic)."""
    slots = torch.tensor([ids[i] for i in order], dtype=torch.int32, device="cuda")
    for splits in (1, 3, 8):
        want = contiguous.attend(q, splits=splits)[order]
        got = paged_decode_attention(q[order], paged.k_pages, paged.v_pages, paged.k_scales, paged.v_scales,
                                     paged.block_tables, paged.device_lengths, seq_ids=slots,
                                     granularity=paged.granularity, splits=splits, **paged._format)
        torch.cuda.synchronize()
        assert torch.equal(got, want), splits


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,d,page_size", [("mha", 64, 16), ("gqa", 128, 64), ("mqa", 128, 16), ("gqa", 256, 32)])
def test_gpu_paged_kernels_equal_contiguous_kernels(granularity, dtype, heads, d, page_size):
    hkv, group = HEADS[heads]
    paged, contiguous, ids, _ = gpu_twins(granularity, hkv, d, page_size, dtype, seed=d)
    # Attention: the same splits and T_max give the same bits.
    q = make_q(3, hkv * group, d, dtype, seed=d, device="cuda")
    order = [2, 0, 1]
    assert_gpu_attention_as_contiguous(paged, contiguous, ids, q, order)
    out = paged.attend([ids[i] for i in order], q[order])
    g = cache_gathered(paged, [ids[i] for i in order])
    want = ref.decode_attention(q[order], g["k"], g["v"], g["ks"], g["vs"], g["n"], granularity)
    bound = ref.decode_error_bound(
        q[order], ref.dequantize_cache(g["k"], g["ks"], granularity), ref.dequantize_cache(g["v"], g["vs"], granularity),
        g["n"], score_rel=2.0**-16, q_err=ref.int8_query_error(q[order], g["ks"], granularity),
        weight_rel=2.0**-11 + paged.max_tokens * 2.0**-25, out_rel=OUT_REL[dtype])
    assert (np.abs(out.double().cpu().numpy() - want) <= bound).all()


INT4_GPU_CASES = [("mha", 64, 16, 32, torch.float16), ("gqa", 128, 64, 32, torch.bfloat16),
                  ("mqa", 128, 16, 128, torch.float16), ("gqa", 256, 32, 64, torch.bfloat16),
                  ("gqa", 128, 16, 64, torch.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("heads,d,page_size,group,dtype", INT4_GPU_CASES,
                         ids=[f"{h}-D{d}-P{p}-g{n}-{str(t)[6:]}" for h, d, p, n, t in INT4_GPU_CASES])
def test_gpu_paged_int4_kernels_equal_contiguous_kernels(granularity, heads, d, page_size, group, dtype):
    """The paged INT4 kernels (bits=4): the write kernel's pages bit for bit with the paged CPU cache
    and with the contiguous INT4 CUDA cache; attention bit for bit with the contiguous INT4 kernel at
    the same split counts, and close to the CPU's fp32 attention over the same pages."""
    hkv, hpk = HEADS[heads]
    paged, contiguous, ids, cpu_paged = gpu_twins(granularity, hkv, d, page_size, dtype, seed=d + group, bits=4,
                                                  group_size=group)
    q = make_q(3, hkv * hpk, d, dtype, seed=d, device="cuda")
    order = [2, 0, 1]
    assert_gpu_attention_as_contiguous(paged, contiguous, ids, q, order)
    out = paged.attend([ids[i] for i in order], q[order]).float().cpu()
    cpu_out = cpu_paged.attend([ids[i] for i in order], q[order].cpu()).float()
    assert (out - cpu_out).abs().max() <= 1e-2 * cpu_out.abs().max() + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_clamping_matches_the_cpu():
    cache, q = _functional_cache()
    gpu = {name: getattr(cache, name).cuda() for name in ("k_pages", "v_pages", "k_scales", "v_scales",
                                                           "block_tables")}
    for lengths, seq_ids in (([33, 7, 1], None), ([32, 0, -4], None), ([32, 7, 2**31 - 1], None),
                             ([32, 7, 1], [-1, 1, 5])):
        flags = []
        outs = []
        for dev, tensors in (("cpu", {n: getattr(cache, n) for n in gpu}), ("cuda", gpu)):
            flag = torch.zeros(1, dtype=torch.int32, device=dev)
            outs.append(paged_decode_attention(q.to(dev), tensors["k_pages"], tensors["v_pages"], tensors["k_scales"],
                                               tensors["v_scales"], tensors["block_tables"],
                                               torch.tensor(lengths, dtype=torch.int32, device=dev), clamped=flag,
                                               seq_ids=None if seq_ids is None else
                                               torch.tensor(seq_ids, dtype=torch.int32, device=dev)))
            flags.append(flag.item())
        assert flags == [1, 1], lengths
        cpu_out, gpu_out = outs[0].double().numpy(), outs[1].double().cpu().numpy()
        assert np.isfinite(gpu_out).all()
        assert (gpu_out[cpu_out == 0] == 0).all()  # zero rows agree
        assert np.abs(gpu_out - cpu_out).max() < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_paged_decode_step_in_a_cuda_graph(bits):
    """paged_kv_append of one token per row and paged_decode_attention, captured once, replayed: the same
    results as eager calls on a twin (the table preallocated, the lengths advanced on the device)."""
    p, hkv, group, d, num_pages, s = 16, 2, 4, 128, 24, 3
    fmt = {"bits": bits, "group_size": 32}
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3)).int()
    table = perm[: s * 8].reshape(s, 8).contiguous().cuda()
    shape, k_shape, v_shape, page_dtype = page_shapes(num_pages, hkv, p, d, s, "token", **fmt)

    def make():
        c = {"k_pages": torch.zeros(shape, dtype=page_dtype, device="cuda"),
             "v_pages": torch.zeros(shape, dtype=page_dtype, device="cuda"),
             "k_scales": torch.zeros(k_shape, device="cuda"),
             "v_scales": torch.zeros(v_shape, device="cuda"),
             "block_tables": table.clone(), "lengths": torch.zeros(s, dtype=torch.int32, device="cuda")}
        extra = {"arrivals": torch.zeros(s, dtype=torch.int32, device="cuda"),
                 "saturated": torch.zeros((), dtype=torch.int64, device="cuda")}
        return c, extra

    def append(c, extra, k, v, seq_ids):
        paged_kv_append(c["k_pages"], c["v_pages"], c["k_scales"], c["v_scales"], c["block_tables"], c["lengths"],
                        extra["arrivals"], extra["saturated"], k, v, seq_ids=seq_ids, **fmt)

    def attend(c, q, seq_ids):
        return paged_decode_attention(q, *c.values(), seq_ids=seq_ids, **fmt)

    caches = [make(), make()]
    seq_ids = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")
    for c, extra in caches:
        for i, n in enumerate((90, 17, 33)):
            k, v = rows(1, hkv, n, d, torch.float16, 20 + i, device="cuda")
            append(c, extra, k, v, torch.tensor([i], dtype=torch.int32, device="cuda"))
    (cache, cx), (twin, tx) = caches
    k1, v1 = rows(3, hkv, 1, d, torch.float16, 30, device="cuda")
    q = make_q(3, hkv * group, d, torch.float16, seed=30, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (loads, plans) outside the capture
        attend(cache, q, seq_ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        append(cache, cx, k1, v1, seq_ids)
        out = attend(cache, q, seq_ids)
    for step in range(3):
        graph.replay()
        append(twin, tx, k1, v1, seq_ids)
        want = attend(twin, q, seq_ids)
        torch.cuda.synchronize()
        assert torch.equal(out, want), step
    assert cache["lengths"].tolist() == [93, 20, 36]
    for name in cache:
        assert torch.equal(cache[name], twin[name]), name
