"""INT4 arithmetic (issue 17): kvpack/torch_impl.py's quantizer against the float64 reference in
kvpack/reference.py, bit for bit (nibbles, scales, minima, reconstruction), the nibble packing, the
error bound that follows from the step, and the INT4 formats of the format study."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
@pytest.mark.parametrize("hkv,group_q,d,group", [(2, 4, 64, 32), (1, 8, 128, 64), (4, 1, 128, 128)])
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


def test_int4_cache_bytes_errors_and_the_gpu():
    cache = kvpack.KVCache(2, 8, 128, 1000, device="cpu", bits=4)
    assert cache.nbytes == 2 * (2 * 8 * 1000 * 64) + 2 * (2 * 8 * 1000 * 4 * 4)  # packed + a scale per 32 channels
    assert cache.k_cache.dtype == torch.uint8 and cache.k_cache.shape == (2, 8, 1000, 64)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        kvpack.KVCache(2, 8, 128, 10, device="cpu", bits=3)
    with pytest.raises(ValueError, match="group_size = 48 must be an even divisor of head_dim = 128"):
        kvpack.KVCache(2, 8, 128, 10, device="cpu", bits=4, group_size=48)
    with pytest.raises(NotImplementedError, match="CPU implementation only"):
        kvpack.KVCache(2, 8, 128, 10, device="cuda", bits=4)
    q = torch.zeros(2, 8, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_cache must be uint8"):
        kvpack.decode_attention(q, cache.v_cache.view(torch.int8), cache.v_cache, cache.k_scales, cache.v_scales,
                                bits=4)
    with pytest.raises(ValueError, match="k_scales must be float32"):
        kvpack.decode_attention(q, cache.k_cache, cache.v_cache, cache.k_scales[..., :2], cache.v_scales, bits=4)
