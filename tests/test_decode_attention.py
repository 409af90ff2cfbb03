"""The INT8 KV cache: kvpack.KVCache (quantize on write) and kvpack.decode_attention (fused decode
attention over int8), against the float64 reference (kvpack.reference) and the paper's arithmetic.

CPU tests run everywhere (CI): the API's shapes, errors and ragged lengths, the CPU implementation
against float64 attention over the dequantized cache, append round trips bit for bit, opcheck.
GPU tests (marker gpu) check the fused CUDA kernel against the same float64 reference within the
error bound reference.decode_error_bound derives, against fp16 SDPA on the unquantized cache within
the quantization budget, the CUDA write path bit for bit against the CPU one, and a CUDA graph.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvpack
from kvpack import reference as ref

FP16_REL = 2.0**-11  # half an ulp of fp16, relative
BF16_REL = 2.0**-8
OUT_REL = {torch.float16: FP16_REL, torch.bfloat16: BF16_REL}


def make_kv(b, hkv, t, d, dtype, seed, device="cpu", outliers=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    if outliers:  # a few large channels, as real keys have
        k[..., :: max(1, d // 8)] *= 8.0
    return k.to(dtype).to(device), v.to(dtype).to(device)


def make_q(b, hq, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(b, hq, d, generator=g).to(dtype).to(device)


def filled_cache(b, hkv, d, t_max, lengths, granularity, dtype, seed, device="cpu", outliers=False):
    cache = kvpack.KVCache(b, hkv, d, t_max, granularity=granularity, device=device, dtype=dtype)
    k, v = make_kv(b, hkv, max(lengths), d, dtype, seed, device, outliers)
    cache.append(k, v, counts=list(lengths))
    return cache, k, v


def kernel_bound(q, cache, dtype, extra_rel=0.0):
    """What the fused kernel may differ from float64 attention over the same int8 cache (module doc)."""
    kd = ref.dequantize_cache(cache.k_cache, cache.k_scales, cache.granularity)
    vd = ref.dequantize_cache(cache.v_cache, cache.v_scales, cache.granularity)
    t_max = cache.max_tokens
    return ref.decode_error_bound(
        q, kd, vd, cache.lengths,
        score_rel=2.0**-16,                      # fp32 scaling and sums
        q_err=ref.int8_query_error(q, cache.k_scales, cache.granularity),  # q' as a 14-bit integer
        weight_rel=FP16_REL + t_max * 2.0**-25 + extra_rel,  # P' in fp16, its subnormal tail
        out_rel=OUT_REL[dtype],
    )


# --- CPU: the API ---------------------------------------------------------------------------------

CPU_CASES = [
    # b, hkv, group, d, t_max, lengths, granularity, dtype
    (1, 2, 1, 64, 40, (40,), "token", torch.float16),
    (2, 2, 4, 64, 37, (37, 5), "token", torch.bfloat16),
    (3, 1, 8, 128, 20, (1, 20, 13), "channel", torch.float16),
    (2, 4, 2, 256, 33, (17, 33), "channel", torch.bfloat16),
    (2, 2, 2, 64, 2100, (2100, 1025), "token", torch.float16),  # past one chunk of the CPU path (1024 tokens)
]


@pytest.mark.parametrize("b,hkv,group,d,t_max,lengths,granularity,dtype", CPU_CASES)
def test_cpu_decode_attention_matches_float64_reference(b, hkv, group, d, t_max, lengths, granularity, dtype):
    cache, _, _ = filled_cache(b, hkv, d, t_max, lengths, granularity, dtype, seed=b * 7 + d)
    q = make_q(b, hkv * group, d, dtype, seed=d)
    out = cache.attend(q)
    assert out.shape == q.shape and out.dtype == dtype
    want = ref.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.lengths,
                                granularity)
    # fp32 torch ops over the dequantized cache, then one rounding to q's dtype.
    tol = OUT_REL[dtype] * np.abs(want) + 1e-5 * np.abs(want).max() + 1e-6
    err = np.abs(out.double().numpy() - want)
    assert (err <= tol).all(), float((err - tol).max())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_cpu_result_depends_on_its_own_sequence_alone(bits, granularity):
    """On the CPU a sequence's output is bit for bit the same whatever its batch neighbours and the cache's
    T_max: what lets the paged CPU path (pages gathered into a cache of another T_max) equal the contiguous
    one. Lengths past one chunk of the CPU path (1024 tokens), and a group of 4 query heads per KV head."""
    b, hkv, d, t_max = 3, 2, 64, 2300
    g = torch.Generator().manual_seed(11)
    cache = kvpack.KVCache(b, hkv, d, t_max, granularity=granularity, device="cpu", dtype=torch.float32, bits=bits)
    cache.append(torch.randn(b, hkv, t_max, d, generator=g), torch.randn(b, hkv, t_max, d, generator=g))
    q = torch.randn(b, 4 * hkv, d, generator=g)
    lengths = torch.tensor([2300, 1500, 7], dtype=torch.int32)
    kw = {"bits": bits} if bits == 8 else {"bits": 4, "group_size": cache.group_size}
    whole = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, lengths,
                                    granularity=granularity, **kw)
    for i, t in ((1, 1600), (2, 7), (0, 2300)):  # sequence i alone, in a cache of T_max = t
        # channel scales are a sequence's own ([B, Hkv, D]); token scales (and INT4's value groups) follow T
        ks = cache.k_scales[i:i + 1] if granularity == "channel" else cache.k_scales[i:i + 1, :, :t]
        vs = cache.v_scales[i:i + 1] if granularity == "channel" and bits == 8 else cache.v_scales[i:i + 1, :, :t]
        alone = kvpack.decode_attention(q[i:i + 1], cache.k_cache[i:i + 1, :, :t].contiguous(),
                                        cache.v_cache[i:i + 1, :, :t].contiguous(), ks.contiguous(), vs.contiguous(),
                                        lengths[i:i + 1], granularity=granularity, **kw)
        assert torch.equal(alone[0], whole[i]), (i, t)


def test_lengths_hide_the_tail():
    """Tokens past a sequence's length never reach its output, whatever the cache holds there."""
    cache, _, _ = filled_cache(2, 2, 64, 32, (32, 32), "token", torch.float16, seed=3)
    q = make_q(2, 4, 64, torch.float16, seed=3)
    short = torch.tensor([10, 32], dtype=torch.int32)
    a = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, short)
    cache.k_cache[0, :, 10:] = 127  # scribble past sequence 0's length
    cache.v_cache[0, :, 10:] = -127
    b = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, short)
    assert torch.equal(a, b)
    want = ref.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, short)
    assert np.abs(b.double().numpy() - want).max() < 1e-2


def test_default_sm_scale_and_lengths():
    cache, _, _ = filled_cache(1, 1, 128, 16, (16,), "token", torch.float16, seed=5)
    q = make_q(1, 4, 128, torch.float16, seed=5)
    a = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales)
    b = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales,
                                torch.tensor([16], dtype=torch.int32), sm_scale=1 / math.sqrt(128))
    assert torch.equal(a, b)
    c = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, sm_scale=0.5)
    want = ref.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, sm_scale=0.5)
    assert np.abs(c.double().numpy() - want).max() < 4e-3


# --- CPU: the write path --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_append_is_the_reference_quantizer_row_by_row(dtype):
    b, hkv, d = 2, 3, 64
    cache = kvpack.KVCache(b, hkv, d, 50, device="cpu")
    k1, v1 = make_kv(b, hkv, 20, d, dtype, seed=11)
    k2, v2 = make_kv(b, hkv, 7, d, dtype, seed=12)
    cache.append(k1, v1, counts=[20, 9])
    cache.append(k2, v2)  # every sequence appends all 7
    assert cache.lengths.tolist() == [27, 16]
    assert cache.device_lengths.tolist() == [27, 16]
    for i, rows in enumerate(([(k1, v1, 20), (k2, v2, 7)], [(k1, v1, 9), (k2, v2, 7)])):
        for which, cache_q, cache_s in ((0, cache.k_cache, cache.k_scales), (1, cache.v_cache, cache.v_scales)):
            x = torch.cat([kv[which][i, :, :n] for *kv, n in rows], dim=1)  # [Hkv, n_total, D]
            for h in range(hkv):
                q_ref, s_ref = ref.quantize(x[h], granularity="token")
                n_total = x.shape[1]
                np.testing.assert_array_equal(cache_q[i, h, :n_total].numpy(), q_ref)
                np.testing.assert_array_equal(cache_s[i, h, :n_total].double().numpy(), s_ref)
                assert not cache_q[i, h, n_total:].any()  # nothing written past the length


def test_channel_append_calibrates_on_the_prefill_and_counts_saturation():
    b, hkv, d = 2, 2, 64
    cache = kvpack.KVCache(b, hkv, d, 40, granularity="channel", device="cpu", dtype=torch.float16)
    k, v = make_kv(b, hkv, 16, d, torch.float32, seed=21)
    cache.append(k, v)
    for i in range(b):
        for h in range(hkv):
            np.testing.assert_array_equal(cache.k_scales[i, h].double().numpy(), ref.scales(k[i, h], "channel"))
            q_ref, _ = ref.quantize(v[i, h], ref.scales(v[i, h], "channel"), "channel")
            np.testing.assert_array_equal(cache.v_cache[i, h, :16].numpy(), q_ref)
    assert int(cache.saturated) == 0  # the prefill is within its own scales
    # A decode step with some values past the calibration: they saturate at +-127 and are counted.
    k2, v2 = make_kv(b, hkv, 1, d, torch.float32, seed=22)
    k2 = k2 * 3.0
    cache.append(k2, v2)
    predicted = 0
    for x, s in ((k2, cache.k_scales), (v2, cache.v_scales)):
        quot = (x[:, :, 0].double().numpy() / s.double().numpy()).astype(np.float32)  # the IEEE fp32 quotient
        predicted += int((np.abs(quot) >= 127.5).sum())
    assert predicted > 0
    assert int(cache.saturated) == predicted
    assert cache.k_cache[:, :, 16].abs().max() == 127


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_scales_come_from_each_sequences_first_rows(bits):
    """Channel granularity, ragged appends: a sequence with no rows in the first append (a chunk of
    its left padding, say) is calibrated by its own first rows later, not left with zero scales; the
    scales of a sequence already calibrated never change; an append whose new sequence's rows hold a
    NaN is refused with every scale and row as it was."""
    b, hkv, d = 3, 2, 64
    cache = kvpack.KVCache(b, hkv, d, 16, granularity="channel", device="cpu", dtype=torch.float32, bits=bits)
    k, v = make_kv(b, hkv, 4, d, torch.float32, seed=23, outliers=True)
    cache.append(k, v, counts=[4, 0, 0])
    assert cache._calibrated == [True, False, False] and not cache.calibrated
    first = cache.k_scales.clone(), cache.v_scales.clone()
    k2, v2 = make_kv(b, hkv, 3, d, torch.float32, seed=24)
    bad = k2.clone()
    bad[2, 1, 0, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        cache.append(bad, v2, counts=[3, 2, 1])
    assert torch.equal(cache.k_scales, first[0]) and torch.equal(cache.v_scales, first[1])
    assert cache.lengths.tolist() == [4, 0, 0] and cache._calibrated == [True, False, False]
    cache.append(k2, v2, counts=[3, 2, 0])
    assert cache._calibrated == [True, True, False]
    assert torch.equal(cache.k_scales[0], first[0][0])
    assert bits == 4 or torch.equal(cache.v_scales[0], first[1][0])  # (INT4 values: a scale per token group)
    for h in range(hkv):
        rows = k2[1, h, :2].double().numpy()
        want = (ref.scales(rows, "channel") if bits == 8 else
                ref.int4_quantize(rows, 0, True, "channel")[1])
        np.testing.assert_array_equal(cache.k_scales[1, h].double().numpy(), want)
        if bits == 8:
            np.testing.assert_array_equal(cache.v_scales[1, h].double().numpy(), ref.scales(v2[1, h, :2], "channel"))
    cache.reset()
    assert cache._calibrated == [False] * b


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_dequantize_is_the_reference_roundtrip_of_the_appended_rows(granularity):
    """KVCache.dequantize (what the multi-token path of kvpack.hf attends over): each sequence's rows
    are the float64 reference's quantize-dequantize of what was appended (the channel scales
    calibrated on the appended rows only), bit for bit; the slots never written are zeros."""
    lengths = (5, 9, 1)
    cache, k, v = filled_cache(3, 2, 64, 16, lengths, granularity, torch.float32, seed=90, outliers=True)
    kd, vd = cache.dequantize(10)
    assert kd.shape == vd.shape == (3, 2, 10, 64) and kd.dtype == torch.float32
    for x, got in ((k, kd), (v, vd)):
        for i, n in enumerate(lengths):
            for j in range(2):
                rows = x[i, j, :n].double().numpy()
                q, sc = ref.quantize(rows, None, granularity)
                np.testing.assert_array_equal(got[i, j, :n].double().numpy(), ref.dequantize(q, sc, granularity))
            assert not got[i, :, n:].any()
    half = cache.dequantize(dtype=torch.float16)[1]
    assert half.shape == (3, 2, 16, 64) and torch.equal(half[:, :, :10], vd.half())
    some = cache.dequantize(10, sequences=slice(1, 3))
    assert torch.equal(some[0], kd[1:]) and torch.equal(some[1], vd[1:])
    for bad in (17, -1, 2.0):
        with pytest.raises(ValueError, match="tokens must be an int"):
            cache.dequantize(bad)


def test_append_past_max_tokens_raises_and_writes_nothing():
    cache, _, _ = filled_cache(2, 1, 64, 10, (8, 3), "token", torch.float16, seed=31)
    before = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths)]
    k, v = make_kv(2, 1, 3, 64, torch.float16, seed=32)
    with pytest.raises(ValueError, match=r"sequence 0 holds 8 tokens; appending 3 would pass max_tokens = 10"):
        cache.append(k, v)
    after = (cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert cache.lengths.tolist() == [8, 3]
    cache.append(k, v, counts=[2, 3])  # fits exactly
    assert cache.lengths.tolist() == [10, 6]


def test_nbytes_is_the_int8_cache_and_its_scales():
    cache = kvpack.KVCache(2, 8, 128, 1000, device="cpu")
    assert cache.nbytes == 2 * (2 * 8 * 1000 * 128) + 2 * (2 * 8 * 1000 * 4)
    ch = kvpack.KVCache(2, 8, 128, 1000, granularity="channel", device="cpu")
    assert ch.nbytes == 2 * (2 * 8 * 1000 * 128) + 2 * (2 * 8 * 128 * 4)


# --- CPU: bad input -------------------------------------------------------------------------------

def _good(b=2, hkv=2, group=2, d=64, t=8):
    cache, _, _ = filled_cache(b, hkv, d, t, (t,) * b, "token", torch.float16, seed=41)
    q = make_q(b, hkv * group, d, torch.float16, seed=41)
    return {"q": q, "k_cache": cache.k_cache, "v_cache": cache.v_cache, "k_scales": cache.k_scales,
            "v_scales": cache.v_scales, "lengths": cache.device_lengths.clone()}


BAD = [
    ("q", lambda a: a["q"].double(), TypeError, r"q must be float16 or bfloat16 \(or float32 on the CPU\)"),
    ("q", lambda a: a["q"][0], ValueError, r"q must be a 3-D tensor \[B, Hq, D\]"),
    ("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2), ValueError, "q must be contiguous"),
    ("q", lambda a: a["q"][:, :3].contiguous(), ValueError, "Hq = 3 query heads must be a multiple of Hkv = 2"),
    ("q", lambda a: a["q"][:1], ValueError, "q holds B = 1 sequences but k_cache holds 2"),
    ("k_cache", lambda a: a["k_cache"].float(), TypeError, "k_cache must be int8"),
    ("k_cache", lambda a: a["k_cache"].transpose(2, 3), ValueError, "must have one shape|k_cache must be contiguous"),
    ("v_cache", lambda a: a["v_cache"][:, :, :4].contiguous(), ValueError, "must have one shape"),
    ("k_scales", lambda a: a["k_scales"].double(), TypeError, "k_scales must be float32"),
    ("v_scales", lambda a: a["v_scales"][:, :, :3], ValueError, r"v_scales must have shape \(2, 2, 8\)"),
    ("lengths", lambda a: a["lengths"].long(), TypeError, "lengths must be int32"),
    ("lengths", lambda a: a["lengths"][:1], ValueError, "lengths must have one entry per sequence"),
    ("lengths", lambda a: torch.tensor([9, 1], dtype=torch.int32), ValueError, r"lengths\[0\] = 9 is outside \[1, T_max = 8\]"),
    ("lengths", lambda a: torch.tensor([3, 0], dtype=torch.int32), ValueError, r"lengths\[1\] = 0 is outside"),
    ("q", lambda a: a["q"][..., :32].contiguous(), ValueError, "head dimension D"),
    # the op's fake kernel (shapes only) answers a meta tensor: the default call must not return its result
    ("q", lambda a: a["q"].to("meta"), ValueError, "k_cache is on cpu but q is on meta"),
]


@pytest.mark.parametrize("name,bad,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_decode_attention_bad_input(name, bad, exc, match):
    args = _good()
    args[name] = bad(args)
    lengths = args.pop("lengths")
    with pytest.raises(exc, match=match):  # (the lengths' values: checked on request, check_lengths=True)
        kvpack.decode_attention(*args.values(), lengths, check_lengths=True)


@pytest.mark.parametrize("name,bad,exc,match", [b for b in BAD if "outside" not in b[3]],
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD) if "outside" not in b[3]])
def test_default_call_names_the_bad_argument_too(name, bad, exc, match):
    """The default call hands the tensors straight to the op (its checks are in C++); when the op
    refuses them, the Python checks run and raise as the checking call does."""
    args = _good()
    args[name] = bad(args)
    with pytest.raises(exc, match=match):
        kvpack.decode_attention(*args.values())


def test_default_call_never_reads_an_int4_cache_as_int8_or_back():
    args = _good()
    u8 = {**args, "k_cache": args["k_cache"].view(torch.uint8), "v_cache": args["v_cache"].view(torch.uint8)}
    with pytest.raises(TypeError, match="k_cache must be int8"):
        kvpack.decode_attention(*u8.values())  # bits=8, the default
    with pytest.raises((TypeError, ValueError), match="uint8|INT4|bits=4"):
        kvpack.decode_attention(*args.values(), bits=4)


@pytest.mark.parametrize("lengths,clamped_to", [([9, 1], [8, 1]), ([3, 0], [3, 0]), ([-4, 8], [0, 8])])
def test_decode_attention_clamps_bad_lengths_by_default_and_flags_them(lengths, clamped_to):
    """The default call reads no lengths on the host: an out-of-range length is clamped to [0, T_max]
    (0: a zero row), the result is that of the clamped lengths, and `clamped` is set; in-range
    lengths leave the flag alone."""
    args = _good()
    args.pop("lengths")
    flag = torch.zeros(1, dtype=torch.int32)
    out = kvpack.decode_attention(*args.values(), torch.tensor(lengths, dtype=torch.int32), clamped=flag)
    assert flag.item() == 1
    ok = torch.tensor([max(c, 1) for c in clamped_to], dtype=torch.int32)
    flag2 = torch.zeros(1, dtype=torch.int32)
    want = kvpack.decode_attention(*args.values(), ok, clamped=flag2)
    assert flag2.item() == 0
    for b, c in enumerate(clamped_to):
        if c == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        else:
            assert torch.equal(out[b], want[b])
    with pytest.raises(ValueError, match="clamped must be an int32 tensor of shape"):
        kvpack.decode_attention(*args.values(), ok, clamped=torch.zeros(2, dtype=torch.int32))


def test_decode_attention_other_errors():
    args = _good()
    with pytest.raises(ValueError, match="granularity must be one of"):
        kvpack.decode_attention(**args, granularity="tensor")
    with pytest.raises(ValueError, match=r"k_scales must have shape \(2, 2, 64\) for granularity='channel'"):
        kvpack.decode_attention(**args, granularity="channel")
    with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
        kvpack.decode_attention(**args, sm_scale=float("nan"))
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        kvpack.decode_attention(args["q"], None, args["v_cache"], args["k_scales"], args["v_scales"])


def test_kvcache_bad_input():
    with pytest.raises(ValueError, match="head_dim = 96 is not supported"):
        kvpack.KVCache(1, 1, 96, 8, device="cpu")
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        kvpack.KVCache(1, 1, 64, 0, device="cpu")
    with pytest.raises(TypeError, match=r"dtype .* must be float16 or bfloat16 \(or float32 on the CPU\), got torch.float64"):
        kvpack.KVCache(1, 1, 64, 8, device="cpu", dtype=torch.float64)
    cache = kvpack.KVCache(2, 2, 64, 8, device="cpu")
    with pytest.raises(ValueError, match="sequence 0 holds no tokens"):
        cache.attend(make_q(2, 2, 64, torch.float16, 0))
    k, v = make_kv(2, 2, 3, 64, torch.float16, 0)
    with pytest.raises(ValueError, match=r"k must have shape \[B, Hkv, t_new, D\] = \[2, 2, t_new >= 1, 64\]"):
        cache.append(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="must match in shape and dtype"):
        cache.append(k, v.float())
    with pytest.raises(ValueError, match=r"counts\[1\] = 4 must be in \[0, t_new = 3\]"):
        cache.append(k, v, counts=[1, 4])
    with pytest.raises(ValueError, match="counts must hold 2 ints"):
        cache.append(k, v, counts=[1])
    with pytest.raises(TypeError, match="k must be float32, float16 or bfloat16"):
        cache.append(k.int(), v.int())
    assert cache.lengths.tolist() == [0, 0]
    ch = kvpack.KVCache(1, 1, 64, 8, granularity="channel", device="cpu")
    k1, v1 = make_kv(1, 1, 2, 64, torch.float32, 0)
    k1[0, 0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        ch.append(k1, v1)
    assert ch.lengths.tolist() == [0] and not ch.calibrated


# --- CPU: the custom ops --------------------------------------------------------------------------

def test_opcheck_cpu():
    args = _good()
    kvpack.decode_attention(**args)  # loads the extension and registers the fakes
    torch.library.opcheck(
        torch.ops.kvpack.decode_attention.default,
        (args["q"], args["k_cache"], args["v_cache"], args["k_scales"], args["v_scales"], args["lengths"], "token",
         0.125, 0),
    )
    cache = kvpack.KVCache(2, 2, 64, 8, device="cpu")
    k, v = make_kv(2, 2, 3, 64, torch.float16, 1)
    torch.library.opcheck(
        torch.ops.kvpack.kv_append.default,
        (cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths, cache._arrivals,
         cache.saturated, k, v, None, "token"),
    )


# --- accuracy: int8 decoding against attention over the unquantized cache ---------------------------

@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("outliers", [False, True])
def test_int8_decoding_within_the_quantization_budget(granularity, outliers):
    """Attention over the int8 cache vs over the unquantized one (both float64): within the bound that
    the quantization errors alone allow (|K error| <= half its scale, |V error| <= half the largest)."""
    b, hkv, group, d, t = 2, 2, 4, 64, 48
    cache, k, v = filled_cache(b, hkv, d, t, (t, 30), granularity, torch.float16, 51,
                               outliers=outliers)
    q = make_q(b, hkv * group, d, torch.float16, 51)
    ks = cache.k_scales.double().numpy()
    k_err = ks / 2 if granularity == "token" else np.broadcast_to(ks.max(axis=-1, keepdims=True) / 2, (b, hkv, t))
    v_err = float(cache.v_scales.max()) / 2
    bound = ref.decode_error_bound(q, k, v, cache.lengths, score_rel=0.0, weight_rel=0.0, k_err=k_err, v_err=v_err)
    got = ref.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.lengths,
                               granularity)
    want = ref.attention_decode(q, k, v, cache.lengths)
    err = np.abs(got - want)
    assert (err <= bound).all()
    assert err.max() > 0  # the budget is not vacuous: quantization does move the output


# --- GPU ------------------------------------------------------------------------------------------

GPU_CASES = [
    # b, hkv, group, d, t_max, lengths, granularity, dtype
    (1, 1, 1, 128, 1, (1,), "token", torch.float16),                      # T = 1
    (1, 4, 1, 64, 1000, (1000,), "token", torch.float16),                 # MHA, T not a multiple of 16
    (3, 2, 4, 128, 777, (777, 1, 300), "token", torch.bfloat16),          # GQA, ragged
    (2, 1, 32, 128, 513, (513, 250), "token", torch.float16),             # MQA: 4 head groups share K/V
    (2, 2, 2, 256, 400, (399, 17), "token", torch.bfloat16),
    (2, 8, 4, 128, 4096, (4096, 2049), "token", torch.float16),           # many splits
    (2, 2, 4, 64, 333, (333, 100), "channel", torch.float16),
    (1, 2, 8, 256, 250, (250,), "channel", torch.bfloat16),
    (4, 2, 1, 128, 97, (97, 96, 95, 16), "channel", torch.bfloat16),
    (1, 1, 3, 64, 40, (40,), "token", torch.float16),                     # a group of 3
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,hkv,group,d,t_max,lengths,granularity,dtype", GPU_CASES)
def test_fused_kernel_matches_float64_reference(b, hkv, group, d, t_max, lengths, granularity, dtype):
    cache, _, _ = filled_cache(b, hkv, d, t_max, lengths, granularity, dtype, seed=t_max + d, device="cuda",
                               outliers=granularity == "channel")
    q = make_q(b, hkv * group, d, dtype, seed=t_max, device="cuda")
    out = cache.attend(q)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    want = ref.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.lengths,
                                granularity)
    bound = kernel_bound(q, cache, dtype)
    err = np.abs(got - want)
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}, max err {float(err.max())}"
    # The split count does not change the function (only the fp32 merge order).
    one = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales,
                                  cache.device_lengths, granularity=granularity, splits=1)
    assert (np.abs(one.double().cpu().numpy() - want) <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_append_is_bit_exact_with_the_cpu_append(granularity, dtype, d):
    b, hkv = 3, 2
    caches = [kvpack.KVCache(b, hkv, d, 300, granularity=granularity, device=dev) for dev in ("cpu", "cuda")]
    assert_cuda_appends_equal_cpu_appends(*caches, lambda t, seed: make_kv(b, hkv, t, d, dtype, seed=seed))


def assert_cuda_appends_equal_cpu_appends(cpu, gpu, make):
    """Three appends (ragged counts, one token, some sequences skipped; keys past the channel
    calibration after the first) into a CPU and a CUDA cache of one shape: every stored byte, scale,
    saturation count and length equal. make(t, seed) -> (k, v) of t new tokens."""
    for step, (t_new, counts) in enumerate(((200, [200, 37, 1]), (1, None), (5, [0, 5, 2]))):
        k, v = make(t_new, 60 + step)
        if step:
            k = k * 1.5  # past the calibration: saturation on the channel path
        for cache in (cpu, gpu):
            cache.append(k.to(cache.device), v.to(cache.device), counts=counts)
    for name in ("k_cache", "v_cache", "k_scales", "v_scales", "saturated"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), name
    assert torch.equal(cpu.device_lengths, gpu.device_lengths.cpu())
    assert not gpu._arrivals.any()  # the kernel reset its counter


@pytest.mark.gpu
@pytest.mark.parametrize("hkv,group", [(8, 4), (32, 1)])
def test_fused_int8_decoding_against_fp16_sdpa_on_the_unquantized_cache(hkv, group):
    """The whole INT8 path (quantize on write, fused attention) against fp16 SDPA over the fp16 cache,
    within the quantization budget plus the kernel's and SDPA's own rounding."""
    b, d, t = 2, 128, 2000
    cache, k, v = filled_cache(b, hkv, d, t, (t, t), "token", torch.float16, seed=71, device="cuda")
    q = make_q(b, hkv * group, d, torch.float16, seed=71, device="cuda")
    out = cache.attend(q).double().cpu().numpy()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    ).squeeze(2).double().cpu().numpy()
    ks = cache.k_scales.double().cpu().numpy()
    bound = ref.decode_error_bound(q, k, v, None, score_rel=2 * FP16_REL, weight_rel=2 * FP16_REL + t * 2.0**-25,
                                   k_err=ks / 2, v_err=float(cache.v_scales.max()) / 2, out_rel=2 * FP16_REL,
                                   q_err=ref.int8_query_error(q, cache.k_scales, "token"))
    err = np.abs(out - sdpa)
    assert (err <= bound).all(), float((err - bound).max())


def _merge_cases():
    """(name, attend, q, splits) over every merge path: INT8 token and channel, INT4 in groups and with
    channel keys, MHA/GQA/MQA, ragged lengths that leave parts empty, 1 to 128 parts (merged by the
    last block) and 129 (the merge kernel)."""
    cases = []
    for name, b, hkv, group, d, t, lengths, gran, bits in [
        ("int8-token-gqa", 3, 2, 4, 128, 2000, (2000, 3, 700), "token", 8),
        ("int8-channel-mqa", 2, 1, 32, 64, 1500, (1500, 20), "channel", 8),
        ("int8-token-mha-d256", 2, 4, 1, 256, 900, (17, 900), "token", 8),
        ("int4-token-gqa", 2, 2, 4, 128, 1600, (1600, 40), "token", 4),
        ("int4-channel-mha", 2, 2, 1, 64, 1200, (1200, 333), "channel", 4),
    ]:
        cache = kvpack.KVCache(b, hkv, d, t, granularity=gran, device="cuda", dtype=torch.float16, bits=bits)
        k, v = make_kv(b, hkv, t, d, torch.float16, seed=t + d, device="cuda", outliers=gran == "channel")
        cache.append(k, v, counts=list(lengths))
        q = make_q(b, hkv * group, d, torch.float16, seed=d + b, device="cuda")
        for splits in (0, 1, 7, 64, 128, 129):
            cases.append((f"{name}-s{splits}", cache.attend, q, splits))
    # Paged, channel scales: the merge reads the V scales of each row's slot (rows in reverse order).
    from kvpack.paged import PagedKVCache
    paged = PagedKVCache(64, 32, 2, 128, granularity="channel", device="cuda", dtype=torch.float16)
    ids = [paged.add_sequence() for _ in range(2)]
    for i, n in zip(ids, (700, 45)):
        k, v = make_kv(1, 2, n, 128, torch.float16, seed=n, device="cuda", outliers=True)
        paged.append([i], k, v)
    q = make_q(2, 8, 128, torch.float16, seed=3, device="cuda")
    for splits in (0, 5, 128, 129):
        cases.append((f"paged-channel-s{splits}", lambda q, splits, f=paged.attend: f(ids[::-1], q, splits=splits),
                      q, splits))
    return cases


@pytest.mark.gpu
def test_last_block_merge_is_the_merge_kernel_bit_for_bit():
    """The split kernel's last-block merge (arrival counters) and the merge kernel that runs without
    them give the same bits, for every format, head grouping and part count; repeated calls reuse the
    counters (each launch resets its own), so they agree with the first."""
    torch.ops.kvpack._set_fused_merge(True)
    got = {}
    for name, attend, q, splits in _merge_cases():
        got[name] = [attend(q, splits=splits) for _ in range(3)]
    prev = torch.ops.kvpack._set_fused_merge(False)
    try:
        for name, attend, q, splits in _merge_cases():
            want = attend(q, splits=splits)
            assert all(torch.equal(x, want) for x in got[name]), name
    finally:
        torch.ops.kvpack._set_fused_merge(prev)


@pytest.mark.gpu
def test_decode_on_two_streams_at_once_keeps_each_streams_counters():
    """Two streams decoding at the same time, back to back with no wait between them: each keeps its
    own arrival counters, so each output equals that of calls made one at a time."""
    caches = []
    for seed in (1, 2):
        cache, _, _ = filled_cache(1, 8, 128, 4096, (4096,), "token", torch.float16, seed=seed, device="cuda")
        caches.append((cache, make_q(1, 32, 128, torch.float16, seed=seed, device="cuda")))
    want = [c.attend(q) for c, q in caches]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(50):
        for i, ((c, q), s) in enumerate(zip(caches, streams)):
            with torch.cuda.stream(s):
                outs[i].append(c.attend(q))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(o, want[i]) for o in outs[i]), i


def test_query_off_a_16_byte_boundary_decodes_as_an_aligned_one():
    """The CUDA kernel reads the query 16 bytes at a time: a contiguous view at an odd offset is
    copied first; on any device the result equals the aligned query's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache, _, _ = filled_cache(2, 2, 64, 64, (64, 9), "token", torch.float16, seed=12, device=device)
    q = make_q(2, 8, 64, torch.float16, seed=12, device=device)
    odd = torch.empty(q.numel() + 1, dtype=q.dtype, device=device)[1:].view_as(q)
    odd.copy_(q)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    assert torch.equal(cache.attend(odd), cache.attend(q))


@pytest.mark.gpu
def test_decode_step_in_a_cuda_graph():
    """Append one token and attend, captured once, replayed: same results as eager calls."""
    b, hkv, group, d = 4, 2, 4, 128
    cache, _, _ = filled_cache(b, hkv, d, 512, (300, 17, 64, 1), "token", torch.float16, seed=81, device="cuda")
    twin, _, _ = filled_cache(b, hkv, d, 512, (300, 17, 64, 1), "token", torch.float16, seed=81, device="cuda")
    k1, v1 = make_kv(b, hkv, 1, d, torch.float16, seed=82, device="cuda")
    q = make_q(b, hkv * group, d, torch.float16, seed=82, device="cuda")
    assert_graph_step_equals_eager(cache, twin, k1, v1, q, [303, 20, 67, 4])
    assert torch.equal(cache.k_cache, twin.k_cache) and torch.equal(cache.v_scales, twin.v_scales)


def assert_graph_step_equals_eager(cache, twin, k1, v1, q, lengths_after):
    """One append and attend captured as a CUDA graph on `cache` and replayed three times: each replay
    gives bit for bit what the same eager calls give on `twin` (a cache filled the same way)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (loads, plans) outside the capture
        cache.attend(q)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.append(k1, v1)
        out = cache.attend(q)
    for step in range(3):
        graph.replay()
        twin.append(k1, v1)
        want = twin.attend(q)
        torch.cuda.synchronize()
        assert torch.equal(out, want), step
    assert cache.sync_lengths().tolist() == list(lengths_after)


@pytest.mark.gpu
def test_opcheck_cuda():
    cache, _, _ = filled_cache(2, 2, 128, 64, (64, 9), "token", torch.float16, seed=91, device="cuda")
    q = make_q(2, 8, 128, torch.float16, seed=91, device="cuda")
    torch.library.opcheck(
        torch.ops.kvpack.decode_attention.default,
        (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths, "token", 0.1, 0),
    )
    k, v = make_kv(2, 2, 2, 128, torch.bfloat16, 92, device="cuda")
    torch.library.opcheck(
        torch.ops.kvpack.kv_append.default,
        (cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths, cache._arrivals,
         cache.saturated, k, v, None, "token"),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_default_call_never_syncs_and_flags_clamped_lengths():
    """The default call queues kernels only (sync debug mode 'error' would raise on a sync); a length
    outside [1, T_max] is clamped on the device (0: a zero row) and reported in `clamped`."""
    b, hkv, group, d, t = 3, 2, 4, 128, 256
    cache, _, _ = filled_cache(b, hkv, d, t, (t, 100, 7), "token", torch.float16, seed=95, device="cuda")
    q = make_q(b, hkv * group, d, torch.float16, seed=95, device="cuda")
    args = (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales)
    bad = torch.tensor([t + 50, 100, -3], dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    kvpack.decode_attention(*args, bad)  # loads the kernels before the no-sync window
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kvpack.decode_attention(*args, bad, clamped=flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.item() == 1
    good = torch.tensor([t, 100, 1], dtype=torch.int32, device="cuda")
    flag.zero_()
    want = kvpack.decode_attention(*args, good, clamped=flag)
    assert flag.item() == 0
    assert torch.equal(out[:2], want[:2]) and torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_int8_query_error_bounds_the_kernels_integer_query(granularity):
    """The fused INT8 kernel's query as decode_kernels.cuh builds it (q' = q * sm_scale * log2(e) in
    fp32, times the channel's K scale per channel; a power of two puts the head's largest |q'| in
    [2^13, 2^14); rint; two int8 digits 256 hi + lo), simulated here in numpy: the digits fit int8 and
    the query they stand for is within ref.int8_query_error of q, for queries from tiny to huge."""
    rng = np.random.default_rng(5)
    b, hkv, group, d = 2, 2, 3, 64
    q = (rng.standard_normal((b, hkv * group, d)) * np.exp2(rng.integers(-20, 10, (b, hkv * group, 1)))).astype(np.float16)
    q[0, 0, 5] = np.float16(60000.0)  # one huge element beside small ones
    q[1, 1] = 0                        # an all-zero head
    ks = (rng.random((b, hkv, d)) * np.exp2(rng.integers(-12, 4, (b, hkv, d)))).astype(np.float32)
    ks[0, 0, 3] = 0.0                  # an all-zero channel
    sm = np.float32(1 / math.sqrt(d) * 1.4426950408889634)
    qf = q.astype(np.float32) * sm
    if granularity == "channel":
        qf = qf * np.repeat(ks, group, axis=1)
    amax = np.abs(qf).max(axis=-1, keepdims=True)
    _, e2 = np.frexp(amax)
    shift = np.where((amax > 0) & np.isfinite(amax), np.clip(14 - e2, -100, 100), 0)
    qi = np.clip(np.rint(np.ldexp(qf.astype(np.float64), shift)), -16384, 16384).astype(np.int64)
    hi = (qi + 128) >> 8
    lo = qi - 256 * hi
    assert np.abs(hi).max() <= 64 and lo.min() >= -128 and lo.max() <= 127
    back = np.ldexp((256 * hi + lo).astype(np.float64), -shift) / float(sm)
    if granularity == "channel":
        s = np.repeat(ks, group, axis=1).astype(np.float64)
        back = np.where(s > 0, back / np.where(s > 0, s, 1.0), q.astype(np.float64))
    err = np.abs(back - q.astype(np.float64))
    bound = ref.int8_query_error(torch.from_numpy(q), torch.from_numpy(ks), granularity)
    assert (err <= bound).all(), float((err - bound).max())
    assert (bound[0, 0] > 0).all() or granularity == "channel"
