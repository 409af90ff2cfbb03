"""INT4 arithmetic (issue 17): kvpack/torch_impl.py's quantizer against the float64 reference in
kvpack/reference.py, bit for bit (nibbles, scales, minima, reconstruction), the nibble packing, the
error bound that follows from the step, and the INT4 formats of the format study."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_decode_attention import (  # tests/ is on sys.path under pytest
    assert_cuda_appends_equal_cpu_appends,
    assert_graph_step_equals_eager,
)

import kvpack
from kvpack import reference as ref
from kvpack import torch_impl as ti
from kvpack.study import formats


def _data(kind: str, t: int, d: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        x = torch.rand(t, d, generator=g) * 2 - 1
    elif kind == "outliers":  # a few channels 30x the rest (the keys KIVI groups per channel)
        x = torch.randn(t, d, generator=g)
        x[:, :: max(1, d // 8)] *= 30
    elif kind == "shifted":  # all positive, away from 0: where an asymmetric grid pays
        x = 3 + torch.rand(t, d, generator=g)
    elif kind == "special":  # zero groups, constant groups, ties at half steps
        x = torch.randn(t, d, generator=g)
        x[0] = 0
        x[1] = 0.25
        x[2, : d // 2] = torch.arange(d // 2) * 0.5 - 3.5
    else:
        raise ValueError(kind)
    return x.to(dtype)


CASES = [(kind, dtype, d, group) for kind in ("uniform", "outliers", "shifted", "special")
         for dtype in (torch.float32, torch.float16, torch.bfloat16) for d, group in ((64, 32), (128, 64), (128, 128))]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("kind,dtype,d,group", CASES)
def test_token_groups_bit_exact_with_the_float64_reference(kind, dtype, d, group, symmetric):
    x = _data(kind, 48, d, dtype, seed=d + group)
    nib, scale, lo = ti.int4_quantize_groups(x, group, symmetric)
    r_nib, r_scale, r_lo = ref.int4_quantize(x, group, symmetric, "token")
    assert np.array_equal(nib.numpy(), r_nib)
    assert np.array_equal(scale.double().numpy(), r_scale)
    if symmetric:
        assert lo is None and r_lo is None
    else:
        assert np.array_equal(lo.double().numpy(), r_lo)
    x_hat = ti.int4_dequantize_groups(nib, scale, lo)
    assert np.array_equal(x_hat.double().numpy(), ref.int4_dequantize(r_nib, r_scale, r_lo, "token"))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("kind", ["uniform", "outliers", "special"])
def test_channel_groups_bit_exact_with_the_float64_reference(kind, symmetric):
    x = _data(kind, 96, 64, torch.float16, seed=5)
    y = formats.get_format("int4_channel" if symmetric else "int4_channel_asym").roundtrip(x)
    r_nib, r_scale, r_lo = ref.int4_quantize(x, 0, symmetric, "channel")
    want = ref.int4_dequantize(r_nib, r_scale, r_lo, "channel")
    assert np.array_equal(y.double().numpy(), torch.from_numpy(want).to(torch.float16).double().numpy())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_the_error_is_at_most_half_a_step(symmetric):
    """|x - x_hat| <= scale / 2 (+ the fp32 roundings of the quotient and the reconstruction): no value
    saturates, since the grid spans the group's absmax (symmetric) or [min, max] (asymmetric)."""
    x = _data("outliers", 64, 128, torch.float32, seed=11).double()
    nib, scale, lo = ti.int4_quantize_groups(x.float(), 32, symmetric)
    x_hat = ti.int4_dequantize_groups(nib, scale, lo).double()
    step = scale.double().repeat_interleave(32, dim=-1)
    slack = 4 * 2.0**-24 * (x.abs() + step * 8)
    assert bool(((x - x_hat).abs() <= step / 2 + slack).all())
    codes = nib.int()
    assert int(codes.min()) >= (1 if symmetric else 0) and int(codes.max()) <= 15


def test_nibbles_pack_two_per_byte_and_unpack():
    g = torch.Generator().manual_seed(3)
    nib = torch.randint(0, 16, (5, 7, 128), generator=g, dtype=torch.uint8)
    packed = ti.pack_nibbles(nib)
    assert packed.shape == (5, 7, 64) and packed.dtype == torch.uint8
    assert torch.equal(packed[..., 3], nib[..., 6] | (nib[..., 7] << 4))
    assert torch.equal(ti.unpack_nibbles(packed), nib)
    with pytest.raises(ValueError, match="must be even"):
        ti.pack_nibbles(nib[..., :3])


def test_int4_formats_storage_and_names():
    assert formats.get_format("int4_token_g32").bytes_per_element(1024, 128) == 0.5 + 4 / 32
    assert formats.get_format("int4_token_g64_asym").bytes_per_element(1024, 128) == 0.5 + 8 / 64
    assert formats.get_format("int4_channel").bytes_per_element(1024, 128) == 0.5 + 4 / 1024
    assert formats.get_format("int4_token_g128").bytes_per_element(1024, 32) == 0.5 + 4 / 32  # G past D is D
    assert set(formats.INT4_FORMATS) <= set(formats.FORMATS)
    with pytest.raises(ValueError, match="even"):
        formats.get_format("int4_token_g7")
    with pytest.raises(ValueError, match="must divide"):
        ti.int4_quantize_groups(torch.zeros(4, 96), 64)


def test_the_study_decision_holds():
    """docs/int4.md's decision rests on two comparisons of the study (tools/int4_study.py), held here
    on a smaller run: at equal bytes (0.625 per element) symmetric groups of 32 have a lower
    geometric-mean output error than asymmetric groups of 64, for keys and for values; and on
    outlier-channel keys the asymmetric token groups have the larger worst-case error."""
    df = formats.compare_formats(("gaussian", "student_t", "outlier_keys", "uniform"),
                                 ("int4_token_g32", "int4_token_g64_asym", "int4_token_g32_asym"), (64,), 1024,
                                 ("float16",), 0, n_queries=16, topk=1)
    gm = df.groupby(["role", "format"])["output_rel_error"].agg(formats._geomean)
    for role in ("key", "value"):
        assert gm[(role, "int4_token_g32")] < gm[(role, "int4_token_g64_asym")]
    out = df[(df["distribution"] == "outlier_keys") & (df["role"] == "key")].set_index("format")["output_rel_error"]
    assert out["int4_token_g32"] < out["int4_token_g32_asym"] and out["int4_token_g32"] < out["int4_token_g64_asym"]


# --- the INT4 cache on the CPU (KVCache(bits=4), decode_attention(bits=4)) -------------------------


def _kv(b, hkv, t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=g)
    k[..., :: max(1, d // 8)] *= 10  # outlier channels
    return k.to(dtype), torch.randn(b, hkv, t, d, generator=g).to(dtype)


def _ref_cache(x, counts, group, granularity, channel_scales=None):
    """float64 [B, Hkv, max(counts), D] of the reference's INT4 roundtrip of each sequence's rows."""
    b, h, _, d = x.shape
    out = np.zeros((b, h, max(counts), d))
    for i in range(b):
        for j in range(h):
            rows = x[i, j, : counts[i]]
            if granularity == "channel":  # the cache's calibrated scales, the reference's quantizer
                s = channel_scales[i, j].double().numpy()
                r = ref._fp32(rows.double().numpy() / s[None, :])
                q = np.where(s[None, :] == 0, 8, np.clip(np.rint(r), -7, 7) + 8)
                out[i, j, : counts[i]] = ref.int4_dequantize(q.astype(np.uint8), s, None, "channel")
            else:
                n, s, lo = ref.int4_quantize(rows, group, True, "token")
                out[i, j, : counts[i]] = ref.int4_dequantize(n, s, lo, "token")
    return out


@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("hkv,group_q,d,group", [(2, 4, 64, 32), (1, 8, 128, 64), (4, 1, 128, 128),
                                                  (2, 2, 64, 16), (1, 4, 128, 2)])  # 16, 2: CPU only
def test_int4_cache_attends_as_the_float64_reference(granularity, hkv, group_q, d, group):
    """KVCache(bits=4) on the CPU: ragged appends, then attention; against the float64 reference
    attention over the reference's INT4 roundtrip of the same rows. The kvpack path dequantizes to the
    same fp32 values and attends in fp32: the bound is the fp16 output's rounding plus fp32 sums."""
    b, t = 3, 40
    k, v = _kv(b, hkv, t, d, torch.float16, seed=d + group)
    cache = kvpack.KVCache(b, hkv, d, 64, device="cpu", bits=4, group_size=group, granularity=granularity)
    first = [30, 12, 1]
    cache.append(k, v, counts=first)
    second = [5, 0, 20]
    cache.append(torch.roll(k, 7, dims=2), torch.roll(v, 7, dims=2), counts=second)
    lengths = [a + c for a, c in zip(first, second)]
    assert cache.lengths.tolist() == lengths and cache.device_lengths.tolist() == lengths
    # the same rows, in order, per sequence, padded to the longest
    kk, vv = (torch.stack([torch.nn.functional.pad(torch.cat([x[i, :, : first[i]], torch.roll(x, 7, dims=2)[i, :, : second[i]]],
                                                             1), (0, 0, 0, max(lengths) - lengths[i])) for i in range(b)])
              for x in (k, v))
    k_hat = _ref_cache(kk, lengths, group, granularity, cache.k_scales if granularity == "channel" else None)
    v_hat = _ref_cache(vv, lengths, group, "token")
    q = torch.randn(b, hkv * group_q, d, generator=torch.Generator().manual_seed(1)).half()
    out = cache.attend(q).double().numpy()
    want = ref.attention_decode(q, k_hat, v_hat, lengths)
    tol = 2.0**-10 * np.abs(v_hat).max() + 1e-5
    assert np.abs(out - want).max() <= tol
    if granularity == "channel":  # keys past the calibrated range (the rolled rows) saturate and are counted
        s = cache.k_scales.double()
        x = torch.roll(k, 7, dims=2).double()
        over = sum(int(((x[i, :, : second[i]] / s[i].unsqueeze(1)).abs() > 7.5).sum()) for i in range(b))
        assert int(cache.saturated) == over


@pytest.mark.parametrize("group", [32, 2])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_int4_dequantize_is_the_reference_roundtrip_of_the_appended_rows(granularity, group):
    """KVCache(bits=4).dequantize: the reference's INT4 roundtrip of the appended rows (the kv_append
    op's CPU write), bit for bit (channel keys with the cache's calibrated scales); the slots past a
    length are finite."""
    counts = [7, 2, 12]
    k, v = _kv(3, 2, 12, 64, torch.float32, seed=91)
    cache = kvpack.KVCache(3, 2, 64, 16, device="cpu", dtype=torch.float32, bits=4, granularity=granularity,
                           group_size=group)
    cache.append(k, v, counts=counts)
    kd, vd = cache.dequantize(12)
    assert kd.shape == vd.shape == (3, 2, 12, 64)
    for got, want in ((kd, _ref_cache(k, counts, group, granularity, cache.k_scales)),
                      (vd, _ref_cache(v, counts, group, "token"))):
        for i, n in enumerate(counts):
            np.testing.assert_array_equal(got[i, :, :n].double().numpy(), want[i, :, :n])
    assert all(bool(torch.isfinite(x).all()) for x in cache.dequantize())


def test_int4_cache_bytes_and_errors():
    cache = kvpack.KVCache(2, 8, 128, 1000, device="cpu", bits=4)
    assert cache.nbytes == 2 * (2 * 8 * 1000 * 64) + 2 * (2 * 8 * 1000 * 4 * 4)  # packed + a scale per 32 channels
    assert cache.k_cache.dtype == torch.uint8 and cache.k_cache.shape == (2, 8, 1000, 64)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        kvpack.KVCache(2, 8, 128, 10, device="cpu", bits=3)
    with pytest.raises(ValueError, match="group_size = 48 must be an even divisor of head_dim = 128"):
        kvpack.KVCache(2, 8, 128, 10, device="cpu", bits=4, group_size=48)
    with pytest.raises(ValueError, match="group_size = 16 is not built for CUDA"):
        kvpack.KVCache(2, 8, 128, 10, device="cuda", bits=4, group_size=16)
    q = torch.zeros(2, 8, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_cache must be uint8"):
        kvpack.decode_attention(q, cache.v_cache.view(torch.int8), cache.v_cache, cache.k_scales, cache.v_scales,
                                bits=4)
    with pytest.raises(ValueError, match="k_scales must be float32"):
        kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales[..., :2], cache.v_scales, bits=4)
    # the op itself (what the Python checks guard): a group must be even, a byte's two values one scale
    odd = torch.ones(2, 8, 1000, 128)  # D / 128 scales a row: groups of 1 channel
    with pytest.raises(ValueError, match="even number of channels dividing D"):
        torch.ops.kvpack.decode_attention(q, cache.k_cache, cache.v_cache, odd, odd, None, "token", 1.0, 0)


# --- the INT4 cache on the GPU (kernels/decode_int4.cu) ----------------------------------------------

FP16_REL = 2.0**-11
OUT_REL = {torch.float16: FP16_REL, torch.bfloat16: 2.0**-8}


def _gpu_cache(b, hkv, d, t_max, lengths, granularity, group, dtype, seed, device="cuda"):
    cache = kvpack.KVCache(b, hkv, d, t_max, granularity=granularity, device=device, dtype=dtype, bits=4,
                           group_size=group)
    k, v = _kv(b, hkv, max(lengths), d, dtype, seed)
    cache.append(k.to(device), v.to(device), counts=list(lengths))
    return cache


def _dequantized(cache):
    """float64 K and V of an INT4 cache (its own nibbles and scales, the reference's arithmetic)."""
    per_channel = cache.granularity == "channel"
    kh = kvpack.int4.dequantize(cache.k_cache.cpu(), cache.k_scales.cpu(), per_channel).double()
    vh = kvpack.int4.dequantize(cache.v_cache.cpu(), cache.v_scales.cpu(), False).double()
    return kh, vh


def _int4_kernel_bound(q, cache, kh, vh, lengths, dtype):
    """What the fused INT4 kernel may differ from float64 attention over the same dequantized cache.
    Relative to each product: q' in fp16 (2^-11), the group ratio r = fp16(s_group / s_ref) (2^-11;
    s_ref: the token's largest K scale, the tile's largest V scale), and one more 2^-11 of slack;
    P' in fp16 and its subnormal tail; the output's rounding. Absolute, per element: the kernel
    converts a stored nibble n (1..15) to fp16(n r) and restores the -8 of q = n - 8 exactly in fp32
    (kernels/include/kvpack/decode_kernels.cuh, scaled_nibbles_to_f16x2), so the rounding of n r, up
    to 15 r 2^-11 of s_ref, i.e. 15 * 2^-11 of the group's own scale (2^-25 of s_ref where n r is
    subnormal), is an error of the value that does not shrink with it: k_err per token (keys in token
    groups; keys per channel convert n - 8 exactly) and v_err, both 15 * 2^-11 of the largest scale."""
    k_err = None
    if cache.granularity == "token":
        k_err = 15 * FP16_REL * cache.k_scales.double().amax(dim=-1).cpu().numpy()
    v_err = 15 * FP16_REL * float(cache.v_scales.double().max())
    return ref.decode_error_bound(q, kh, vh, lengths, score_rel=3 * FP16_REL + 2.0**-16,
                                  weight_rel=3 * FP16_REL + cache.max_tokens * 2.0**-25, k_err=k_err, v_err=v_err,
                                  out_rel=OUT_REL[dtype])


GPU_CASES = [
    # b, hkv, q heads per kv head, d, group, t_max, lengths, granularity, dtype
    (1, 2, 1, 64, 32, 40, (40,), "token", torch.float16),
    (2, 2, 4, 64, 64, 300, (300, 17), "channel", torch.bfloat16),
    (3, 1, 8, 128, 32, 1000, (1, 1000, 517), "token", torch.float16),
    (2, 4, 2, 128, 64, 2048, (2048, 1500), "token", torch.bfloat16),
    (2, 2, 5, 128, 128, 700, (33, 700), "channel", torch.float16),
    (1, 8, 4, 128, 32, 4096, (4096,), "channel", torch.float16),
    (2, 2, 4, 256, 32, 600, (600, 111), "token", torch.float16),
    (1, 2, 12, 256, 128, 333, (333,), "channel", torch.bfloat16),
    (2, 1, 3, 256, 64, 130, (16, 130), "token", torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,hkv,group_q,d,group,t_max,lengths,granularity,dtype", GPU_CASES)
def test_int4_fused_kernel_matches_float64_reference(b, hkv, group_q, d, group, t_max, lengths, granularity, dtype):
    cache = _gpu_cache(b, hkv, d, t_max, lengths, granularity, group, dtype, seed=t_max + d)
    q = torch.randn(b, hkv * group_q, d, generator=torch.Generator().manual_seed(t_max)).to(dtype).cuda()
    out = cache.attend(q)
    assert out.shape == q.shape and out.dtype == dtype
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    kh, vh = _dequantized(cache)
    want = ref.attention_decode(q, kh, vh, list(lengths))
    bound = _int4_kernel_bound(q, cache, kh, vh, list(lengths), dtype)
    err = np.abs(got - want)
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}, max err {float(err.max())}"
    one = kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths,
                                  granularity=granularity, splits=1, bits=4, group_size=group)
    assert (np.abs(one.double().cpu().numpy() - want) <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("d,group", [(64, 32), (128, 32), (256, 64)])
def test_int4_fused_kernel_holds_its_bound_across_a_wide_range_of_scales(d, group):
    """Tokens and groups whose scales span 2^-32 to 2^10 inside one tile: the ratios the kernel
    converts with (a token's largest K scale, the tile's largest V scale) reach fp16's subnormals, and
    the result must still be finite and within _int4_kernel_bound of float64 attention over the same
    cache. That bound is about 1% of a head's largest |v| here: it catches a wrong offset, an overflow
    or a NaN from a flushed scale, not a lost low bit."""
    b, hkv, group_q, t = 2, 2, 4, 203
    g = torch.Generator().manual_seed(d + group)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    # keys up to 1 (scores stay moderate, so the bound stays tight), values up to 2^10
    k_rows, v_rows = (2.0 ** torch.randint(lo, hi, (b, hkv, t, 1), generator=g).float() for lo, hi in ((-20, 1), (-20, 11)))
    k_groups, v_groups = (2.0 ** torch.randint(-12, 1, (b, hkv, t, d // group), generator=g).float().repeat_interleave(group, -1)
                          for _ in range(2))
    k, v = (k * k_rows * k_groups).half(), (v * v_rows * v_groups).half()
    cache = kvpack.KVCache(b, hkv, d, 256, device="cuda", dtype=torch.float16, bits=4, group_size=group)
    cache.append(k.cuda(), v.cuda(), counts=[t, 150])
    q = torch.randn(b, hkv * group_q, d, generator=g).half().cuda()
    got = cache.attend(q).double().cpu().numpy()
    kh, vh = _dequantized(cache)
    want = ref.attention_decode(q, kh, vh, [t, 150])
    bound = _int4_kernel_bound(q, cache, kh, vh, [t, 150], torch.float16)
    err = np.abs(got - want)
    assert np.isfinite(got).all()
    assert (err <= bound).all(), f"max excess {float((err - bound).max())}, max err {float(err.max())}"


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,group", [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128), (256, 32), (256, 128)])
def test_int4_cuda_append_is_bit_exact_with_the_cpu_append(granularity, dtype, d, group):
    b, hkv = 3, 2
    caches = [kvpack.KVCache(b, hkv, d, 300, granularity=granularity, device=dev, bits=4, group_size=group)
              for dev in ("cpu", "cuda")]
    assert_cuda_appends_equal_cpu_appends(*caches, lambda t, seed: _kv(b, hkv, t, d, dtype, seed=seed))
    if granularity == "channel":
        assert int(caches[1].saturated) > 0


@pytest.mark.gpu
def test_int4_decode_step_in_a_cuda_graph_never_syncs_and_flags_clamped_lengths():
    """Append one token and attend, captured once and replayed, as eager calls give; the default call
    queues kernels only; a length outside [1, T_max] is clamped (0: a zero row) and flagged."""
    b, hkv, group_q, d = 4, 2, 4, 128
    lengths = (300, 17, 64, 1)
    cache, twin = (_gpu_cache(b, hkv, d, 512, lengths, "token", 32, torch.float16, seed=81) for _ in range(2))
    k1, v1 = (x.cuda() for x in _kv(b, hkv, 1, d, torch.float16, seed=82))
    q = torch.randn(b, hkv * group_q, d, generator=torch.Generator().manual_seed(82)).half().cuda()
    assert_graph_step_equals_eager(cache, twin, k1, v1, q, [303, 20, 67, 4])
    args = (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales)
    bad = torch.tensor([600, 20, 67, -3], dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = kvpack.decode_attention(*args, bad, clamped=flag, bits=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.item() == 1
    good = torch.tensor([512, 20, 67, 4], dtype=torch.int32, device="cuda")
    want = kvpack.decode_attention(*args, good, bits=4)
    assert torch.equal(got[:3], want[:3]) and torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.gpu
def test_int4_opcheck_cuda():
    cache = _gpu_cache(2, 2, 128, 64, (64, 9), "token", 32, torch.float16, seed=91)
    q = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(91)).half().cuda()
    torch.library.opcheck(
        torch.ops.kvpack.decode_attention.default,
        (q, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths, "token", 0.1, 0),
    )
    k, v = (x.cuda() for x in _kv(2, 2, 2, 128, torch.bfloat16, 92))
    torch.library.opcheck(
        torch.ops.kvpack.kv_append.default,
        (cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, cache.device_lengths, cache._arrivals,
         cache.saturated, k, v, None, "token"),
    )
