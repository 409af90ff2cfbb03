"""The CUDA variants against the float64 reference (kvpack.reference), bit for bit.

Every variant x input dtype x granularity, on odd and large shapes, misaligned pointers and past
2^31 (and, for dequantize, 2^32) elements: quantize, dequantize and the GPU scales must equal the
reference exactly, the variants must agree with each other, dequantize(quantize(x)) must stay within
s/2 of x, and the ops must pass torch.library.opcheck.

Outputs are "poisoned" first: a tensor of the output's size is filled with a value no kernel can
produce (int8 -128, float NaN) and freed just before the op, so the caching allocator usually hands
that block to the op's output, and an element a kernel forgets to write shows up as a mismatch
rather than as a stale correct value left by an earlier test.

Large shapes are checked on a sample of rows (plus the first and last rows) on the CPU; their
reference scales are the reference's formula applied to torch's exact GPU abs-max (abs and max are
exact in any dtype), so no float64 copy of billions of elements is ever made.

Needs a CUDA device: skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import kvpack
from kvpack import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

VARIANTS = kvpack.CUDA_VARIANTS
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRANULARITIES = ("channel", "token")
# Odd shapes (every edge case of the 16 x 16, x4 and x16 layouts), D % 4 != 0, D % 16 == 0 and
# D % 16 != 0 but D % 4 == 0 (the fast path and the fallbacks), wide rows (several column blocks).
SHAPES = [(1, 1), (3, 5), (1023, 67), (4097, 129), (64, 128), (100, 68), (1000, 16), (37, 5120), (2, 8192)]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    variants = kvpack.available_variants("cuda")  # builds/loads the extension, registers the fakes
    assert set(variants) == set(VARIANTS), f"the extension offers {variants} on CUDA"


# --- helpers -------------------------------------------------------------------------------------


def case_seed(*parts) -> int:
    """A fresh seed per test case, the same in every run (str hash() is salted per process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) % (2**31)


def make_x(T: int, D: int, dtype, seed: int, device=DEV) -> torch.Tensor:
    """Uniform [-1, 1] (the paper's data) times per-column and per-row magnitudes over 4 decades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, D, generator=g, dtype=torch.float64) * 2 - 1
    x *= 10 ** (torch.rand(1, D, generator=g, dtype=torch.float64) * 4 - 2)
    x *= 10 ** (torch.rand(T, 1, generator=g, dtype=torch.float64) * 2 - 1)
    return x.to(dtype).to(device)


def make_x_gpu(T: int, D: int, dtype, seed: int) -> torch.Tensor:
    """Large inputs, drawn on the GPU: uniform [-1, 1]."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.empty(T, D, dtype=dtype, device=DEV).uniform_(-1, 1, generator=g)


def poison(shape, dtype) -> None:
    value = -128 if dtype == torch.int8 else float("nan")
    t = torch.full(tuple(shape), value, dtype=dtype, device=DEV)
    del t  # back to the caching allocator: the next allocation of this size most likely reuses it


def ref_scales(x: torch.Tensor, granularity: str) -> np.ndarray:
    """Reference scales (float64 holding fp32). Large inputs: the reference's formula on torch's exact GPU abs-max."""
    if x.numel() <= 2**24:
        return reference.scales(x.cpu(), granularity)
    dim = 0 if granularity == "channel" else 1
    absmax = x.abs().amax(dim=dim).to(torch.float64).cpu().numpy()
    return reference.scales(absmax[None, :] if granularity == "channel" else absmax[:, None], granularity)


def sample_rows(T: int, n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randint(0, T, (n,), generator=g), torch.arange(min(8, T)), torch.arange(max(0, T - 8), T)])
    return torch.unique(rows)


def scales_for_rows(s: np.ndarray, rows, granularity: str) -> np.ndarray:
    return s if granularity == "channel" else s[rows.numpy()]


def assert_int8_equal(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    a = actual.cpu().numpy()
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    bad = np.argwhere(a != expected)
    assert bad.size == 0, (
        f"{what}: {len(bad)} of {a.size} int8 values differ from the reference; first at {tuple(bad[0])}: "
        f"got {a[tuple(bad[0])]}, expected {expected[tuple(bad[0])]}"
    )


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.cpu(), expected.cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
    diff = a.view(INT_VIEW[a.dtype]) != e.view(INT_VIEW[e.dtype])
    if bool(diff.any()):
        idx = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {a.numel()} values differ bitwise from the reference; first at {idx}: "
            f"got {a[idx].item()!r}, expected {e[idx].item()!r}"
        )


def expected_dequant(q_np: np.ndarray, s_np: np.ndarray, granularity: str, dtype) -> torch.Tensor:
    """fp32(q * s) from the reference, then one round-to-nearest-even to dtype (torch's CPU cast)."""
    return torch.from_numpy(reference.dequantize(q_np, s_np, granularity)).to(torch.float32).to(dtype)


def check_variant(x: torch.Tensor, variant: str, granularity: str, rows=None, out_dtype=None, s_ref=None) -> None:
    """quantize with the reference scales, dequantize, compare (on `rows` only if given) bit-exactly."""
    T, D = x.shape
    out_dtype = out_dtype or x.dtype
    tag = f"{variant}/{DTYPE_NAME[x.dtype]}/{granularity}/{T}x{D}"
    if s_ref is None:
        s_ref = ref_scales(x, granularity)
    s = torch.from_numpy(s_ref).to(torch.float32).to(DEV)
    poison((T, D), torch.int8)
    q, _ = kvpack.quantize(x, variant, granularity, scales=s, check_finite=False)
    poison((T, D), out_dtype)
    y = kvpack.dequantize(q, s, variant, granularity, dtype=out_dtype)
    if rows is None:
        q_ref, _ = reference.quantize(x.cpu(), scale=s_ref, granularity=granularity)
        assert_int8_equal(q, q_ref, f"quantize {tag}")
        assert_same_bits(y, expected_dequant(q_ref, s_ref, granularity, out_dtype), f"dequantize {tag}")
    else:
        idx = rows.to(DEV)
        s_rows = scales_for_rows(s_ref, rows, granularity)
        q_ref, _ = reference.quantize(x[idx].cpu(), scale=s_rows, granularity=granularity)
        assert_int8_equal(q[idx], q_ref, f"quantize {tag} (sampled rows)")
        assert_same_bits(
            y[idx], expected_dequant(q_ref, s_rows, granularity, out_dtype), f"dequantize {tag} (sampled rows)"
        )


# --- bit-exact against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, dtype, granularity, shape):
    x = make_x(*shape, dtype, case_seed(variant, dtype, granularity, shape))
    check_variant(x, variant, granularity)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_to_every_dtype(variant, out_dtype):
    x = make_x(513, 96, torch.float32, case_seed("dq", variant, out_dtype))
    for g in GRANULARITIES:
        check_variant(x, variant, g, out_dtype=out_dtype)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
def test_large_matches_reference_on_sampled_rows(dtype, granularity):
    """131072 x 1024 (the paper's 'Realistic Small LLM workload'): every variant, sampled rows."""
    T, D = 131072, 1024
    x = make_x_gpu(T, D, dtype, case_seed("large", dtype, granularity))
    rows = sample_rows(T, 2048, seed=case_seed("rows", dtype, granularity))
    s_ref = ref_scales(x, granularity)
    for variant in VARIANTS:
        check_variant(x, variant, granularity, rows=rows, s_ref=s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_past_the_grid_y_limit(variant, dtype):
    """T > 65535 * 16 rows: the 2-D kernels cap gridDim.y at 65535 and must loop over the rest."""
    x = make_x(65535 * 16 + 37, 3, dtype, case_seed("gridy", variant, dtype))
    for g in GRANULARITIES:
        check_variant(x, variant, g)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
def test_ties_round_half_to_even(variant, dtype):
    """x / s = n + 1/2 exactly (s a power of two): quantize must round half to even, as the reference."""
    halves = torch.arange(-126, 127, dtype=torch.float64) + 0.5  # -125.5 .. 126.5, exact in bf16 too
    col = torch.cat([torch.tensor([127.0, -127.0]), halves])  # absmax 127: s = 2^j exactly
    x_channel = torch.stack([col * 2.0**j for j in (-3, 0, 5)], dim=1)  # [N, 3]
    for granularity, x in (("channel", x_channel), ("token", x_channel.T.contiguous())):
        x = x.to(dtype).to(DEV)
        q, s = kvpack.quantize(x, variant, granularity)
        q_ref, s_ref = reference.quantize(x.cpu(), granularity=granularity)
        assert np.array_equal(s.cpu().numpy().astype(np.float64), s_ref)
        assert_int8_equal(q, q_ref, f"ties {variant}/{granularity}")
        q_col = q.cpu()[:, 0] if granularity == "channel" else q.cpu()[0, :]
        got = dict(zip(col.tolist(), q_col.tolist()))
        assert (got[0.5], got[1.5], got[2.5], got[-0.5], got[-1.5], got[-2.5]) == (0, 2, 2, 0, -2, -2)


def near_tie_input(dtype, T: int = 512, D: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """x [T, D] and fp32 scales [D] (as float64) such that x / s sits on and around rounding ties.

    Scales: log-uniform, not powers of two, plus the awkward ones (zero, negative, subnormal, tiny
    with 1 / s near overflow, huge with 1 / s subnormal) where the dtype can hold the x they give.
    Rows: exact ties (k + 1/2) * s in fp32, 1-3 ulps either side, and uniform values; then cast to
    dtype (16-bit values land on or near ties of their own).
    """
    rng = np.random.default_rng(seed)
    big = {torch.float32: 1e30, torch.float16: 400.0, torch.bfloat16: 1e30}[dtype]
    small = {torch.float32: 1e-40, torch.float16: 1e-9, torch.bfloat16: 1e-40}[dtype]
    s = (10.0 ** rng.uniform(-4, 2, D)).astype(np.float32)
    special = [0.0, -0.37, small, 3e-39 if dtype != torch.float16 else 1e-7, big, -big / 7, 2.0**-3]
    s[: len(special)] = np.array(special, dtype=np.float32)
    k = rng.integers(-128, 128, (T, D)).astype(np.float32) + np.float32(0.5)
    x = (k * s[None, :]).astype(np.float32)
    steps = rng.integers(-3, 4, (T, D))
    for n in range(1, 4):
        up, down = steps >= n, steps <= -n
        x[up] = np.nextafter(x[up], np.float32(np.inf))
        x[down] = np.nextafter(x[down], np.float32(-np.inf))
    plain = rng.random((T, D)) < 0.25
    x[plain] = (rng.uniform(-127, 127, (T, D)).astype(np.float32) * s[None, :])[plain]
    xt = torch.from_numpy(x).to(dtype)
    assert bool(torch.isfinite(xt).all())
    return xt.to(DEV), s.astype(np.float64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
def test_near_ties_and_awkward_scales_on_the_vector_paths(variant, dtype):
    """D % 16 == 0 (the main path of every vector kernel) with values on and 1-3 ulps around rounding
    ties, under given scales of every kind. "fast" multiplies by 1 / s and must take the division
    exactly where the product could round differently: bit-exact with the reference, per channel and
    per token."""
    x, s = near_tie_input(dtype, seed=case_seed("near-ties", variant, dtype))
    check_variant(x, variant, "channel", s_ref=s)  # [512, 64], a scale per column
    check_variant(x.T.contiguous(), variant, "token", s_ref=s)  # [64, 512], the same scales per row


# --- misaligned pointers -----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1023, 67), (64, 128), (33, 4096), (5, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_misaligned_storage_offset(variant, dtype, shape, offset):
    """x, q and the scales start `offset` elements into their storage: no 16-byte alignment."""
    T, D = shape
    seed = case_seed("misaligned", variant, dtype, shape, offset)
    base = make_x(1, T * D + offset + 5, dtype, seed)
    x = base.view(-1)[offset : offset + T * D].view(T, D)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    for g in GRANULARITIES:
        s_ref = ref_scales(x, g)
        s_base = torch.full((len(s_ref) + offset,), float("nan"), device=DEV)
        s = s_base[offset:]
        s.copy_(torch.from_numpy(s_ref).to(torch.float32))
        q, _ = kvpack.quantize(x, variant, g, scales=s)
        q_ref, _ = reference.quantize(x.cpu(), scale=s_ref, granularity=g)
        assert_int8_equal(q, q_ref, f"quantize {variant}/{g} offset {offset}")
        q_base = torch.full((T * D + offset,), -128, dtype=torch.int8, device=DEV)
        q_mis = q_base[offset:].view(T, D)
        q_mis.copy_(q)
        assert q_mis.data_ptr() % 16 != 0
        y = kvpack.dequantize(q_mis, s, variant, g, dtype=dtype)
        assert_same_bits(y, expected_dequant(q_ref, s_ref, g, dtype), f"dequantize {variant}/{g} offset {offset}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sliced_input(variant):
    """x[:, 1:] of a contiguous matrix (copied to contiguous by the wrapper), and a column slice."""
    big = make_x(257, 130, torch.float16, case_seed("slice", variant))
    for x in (big[:, 1:], big[:, 3:67], big[5:, :128]):
        for g in GRANULARITIES:
            q, s = kvpack.quantize(x, variant, g)
            q_ref, s_ref = reference.quantize(x.cpu(), granularity=g)
            assert np.array_equal(s.cpu().numpy().astype(np.float64), s_ref)
            assert_int8_equal(q, q_ref, f"slice {variant}/{g}")


# --- past 2^31 and 2^32 elements -----------------------------------------------------------------------


def need_free_memory(nbytes: int) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.15:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.mark.parametrize("D", [4096, 4099])
def test_past_2_31_elements(D):
    """fp16 quantize (every variant) + scales + dequantize past 2^31 elements: the 64-bit offsets.

    D = 4096 runs the row-structured vector paths, D = 4099 the flat fallbacks.
    """
    T = 2**31 // D + 5
    n = T * D
    assert n > 2**31
    need_free_memory(n * (2 + 2 + 1 + 1 + 2))  # x, |x| (reference abs-max), q, q of a variant, x_hat
    x = make_x_gpu(T, D, torch.float16, case_seed("2^31", D))
    rows = torch.unique(torch.cat([sample_rows(T, 128, seed=D), torch.tensor([2**31 // D - 1, 2**31 // D])]))
    for g in GRANULARITIES:
        s_ref = ref_scales(x, g)
        s = kvpack.compute_scales(x, g, check_finite=False)
        assert np.array_equal(s.cpu().numpy().astype(np.float64), s_ref), f"compute_scales {g} past 2^31"
        q_fast, _ = kvpack.quantize(x, "fast", g, scales=s, check_finite=False)
        idx = rows.to(DEV)
        s_rows = scales_for_rows(s_ref, rows, g)
        q_ref, _ = reference.quantize(x[idx].cpu(), scale=s_rows, granularity=g)
        assert_int8_equal(q_fast[idx], q_ref, f"quantize fast/{g} past 2^31 (sampled rows)")
        for variant in VARIANTS:
            if variant != "fast":
                poison((T, D), torch.int8)
                q, _ = kvpack.quantize(x, variant, g, scales=s, check_finite=False)
                assert torch.equal(q, q_fast), f"quantize {variant}/{g} differs from fast past 2^31"
                del q
            y = kvpack.dequantize(q_fast, s, variant, g, dtype=torch.float16)
            assert_same_bits(
                y[idx],
                expected_dequant(q_ref, s_rows, g, torch.float16),
                f"dequantize {variant}/{g} past 2^31 (sampled rows)",
            )
            del y
        del q_fast
    torch.cuda.empty_cache()


def test_dequantize_past_2_32_elements():
    """int8 -> fp16 dequantize past 2^32 elements (D = 4099: the flat paths' 64-bit division too)."""
    D = 4099
    T = 2**32 // D + 3
    n = T * D
    assert n > 2**32
    need_free_memory(n * (1 + 2))
    g_cuda = torch.Generator(device=DEV).manual_seed(7)
    q = torch.randint(-127, 128, (T, D), dtype=torch.int8, device=DEV, generator=g_cuda)
    rows = torch.unique(torch.cat([sample_rows(T, 128, seed=11), torch.tensor([2**32 // D - 1, 2**32 // D])]))
    idx = rows.to(DEV)
    q_rows = q[idx].cpu().numpy()
    for g in GRANULARITIES:
        s_np = np.abs(np.random.default_rng(3).standard_normal(D if g == "channel" else T)).astype(np.float32)
        s = torch.from_numpy(s_np).to(DEV)
        s_rows = scales_for_rows(s_np.astype(np.float64), rows, g)
        expected = expected_dequant(q_rows, s_rows, g, torch.float16)
        for variant in VARIANTS:
            y = kvpack.dequantize(q, s, variant, g, dtype=torch.float16)
            assert_same_bits(y[idx], expected, f"dequantize {variant}/{g} past 2^32 (sampled rows)")
            del y
    del q
    torch.cuda.empty_cache()


# --- GPU scales, fused entry point, zeros, agreement, round trip ------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(131072, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
def test_compute_scales_matches_reference(dtype, granularity, shape):
    x = make_x(*shape, dtype, case_seed("scales", dtype, granularity, shape))
    poison((shape[1] if granularity == "channel" else shape[0],), torch.float32)
    s = kvpack.compute_scales(x, granularity)
    assert s.dtype == torch.float32 and s.device == x.device
    assert np.array_equal(s.cpu().numpy().astype(np.float64), reference.scales(x.cpu(), granularity))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_fused_equals_scales_then_quantize(variant, granularity):
    for dtype in DTYPES:
        for shape in [(3, 5), (1023, 67), (256, 128)]:
            x = make_x(*shape, dtype, case_seed("fused", variant, granularity, dtype, shape))
            q_f, s_f = kvpack.quantize_fused(x, variant, granularity)
            s = kvpack.compute_scales(x, granularity)
            q, _ = kvpack.quantize(x, variant, granularity, scales=s)
            assert torch.equal(s_f, s) and torch.equal(q_f, q)
            q_ref, s_ref = reference.quantize(x.cpu(), granularity=granularity)
            assert np.array_equal(s_f.cpu().numpy().astype(np.float64), s_ref)
            assert_int8_equal(q_f, q_ref, f"fused {variant}/{granularity}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_column_and_row(variant, dtype):
    """An all-zero channel (or token) has scale 0, quantizes to 0 and dequantizes to 0, never NaN."""
    x = make_x(77, 48, torch.float64, case_seed("zeros", variant, dtype), device="cpu")
    x[:, 5] = 0
    x[9, :] = 0
    x = x.to(dtype).to(DEV)
    for g, zero in (("channel", (slice(None), 5)), ("token", (9, slice(None)))):
        q, s = kvpack.quantize(x, variant, g)
        y = kvpack.dequantize(q, s, variant, g, dtype=dtype)
        idx = 5 if g == "channel" else 9
        assert s[idx].item() == 0.0
        assert bool((q[zero] == 0).all()) and bool((y[zero] == 0).all())
        assert not bool(torch.isnan(y).any())
        q_ref, s_ref = reference.quantize(x.cpu(), granularity=g)
        assert_int8_equal(q, q_ref, f"zeros {variant}/{g}")
        assert_same_bits(y, expected_dequant(q_ref, s_ref, g, dtype), f"zeros dequantize {variant}/{g}")


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
def test_variants_agree(dtype, granularity):
    for shape in [(1, 1), (1023, 67), (4097, 129), (2048, 1024), (9, 8200)]:
        x = make_x(*shape, dtype, case_seed("agree", dtype, granularity, shape))
        s = kvpack.compute_scales(x, granularity)
        outs = {v: kvpack.quantize(x, v, granularity, scales=s)[0] for v in VARIANTS}
        deq = {v: kvpack.dequantize(outs["fast"], s, v, granularity, dtype=dtype) for v in VARIANTS}
        for v in VARIANTS:
            assert torch.equal(outs[v], outs["fast"]), f"quantize {v} != fast on {shape}"
            assert torch.equal(deq[v].view(INT_VIEW[dtype]), deq["fast"].view(INT_VIEW[dtype])), (
                f"dequantize {v} != fast"
            )


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_within_half_a_step(variant, dtype, granularity):
    """|dequantize(quantize(x)) - x| <= s/2 (plus two fp32 roundings: 2 * 127 * 2^-24 * s)."""
    x = make_x(1537, 200, dtype, case_seed("roundtrip", variant, dtype, granularity))
    q, s = kvpack.quantize(x, variant, granularity)
    y = kvpack.dequantize(q, s, variant, granularity, dtype=torch.float32)
    err = (y.double() - x.double()).abs()
    sb = s.double()[None, :] if granularity == "channel" else s.double()[:, None]
    bound = sb / 2 * (1 + 4e-5)
    assert bool((err <= bound).all()), f"max err / s = {float((err / sb.clamp_min(1e-30)).max()):.6f}"


# --- opcheck and errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant):
    """All of opcheck's default tests (schema, autograd registration, fake tensor, aot dispatch dynamic)."""
    ops = torch.ops.kvpack
    for dtype, shape in ((torch.float32, (33, 40)), (torch.bfloat16, (7, 129))):
        x = make_x(*shape, dtype, case_seed("opcheck", variant, dtype))
        for g in GRANULARITIES:
            s = ops.compute_scales.default(x, g)
            q = ops.quantize.default(x, s, variant, g)
            torch.library.opcheck(ops.compute_scales.default, (x, g))
            torch.library.opcheck(ops.quantize.default, (x, s, variant, g))
            torch.library.opcheck(ops.dequantize.default, (q, s, variant, g, torch.float16))
            torch.library.opcheck(ops.quantize_fused.default, (x, variant, g))


def test_errors_public_api():
    x = make_x(16, 8, torch.float32, 1)
    s = kvpack.compute_scales(x, "channel")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kvpack.quantize(x.to(torch.int32), "fast")
    with pytest.raises(ValueError, match=r"scales must have shape \(8,\)"):
        kvpack.quantize(x, "fast", scales=torch.ones(9, device=DEV))
    with pytest.raises(ValueError, match="scales are on cpu"):
        kvpack.quantize(x, "fast", scales=s.cpu())
    with pytest.raises(ValueError, match="unknown variant"):
        kvpack.quantize(x, "warp")
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        kvpack.quantize(x, "cpu_serial")
    with pytest.raises(TypeError, match="q must be int8"):
        kvpack.dequantize(x, s, "fast")


def test_errors_from_the_cuda_ops():
    """The C++ checks, reached by calling torch.ops.kvpack directly (no Python wrapper in front)."""
    ops = torch.ops.kvpack
    x = make_x(16, 8, torch.float32, 2)
    s = ops.compute_scales.default(x, "channel")
    q = ops.quantize.default(x, s, "fast", "channel")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.quantize.default(x.double(), s, "fast", "channel")
    with pytest.raises(ValueError, match=r"scales must have shape \[8\]"):
        ops.quantize.default(x, s[:7], "fast", "channel")
    with pytest.raises(ValueError, match="scales are on cpu but the tensor is on cuda"):
        ops.quantize.default(x, s.cpu(), "fast", "channel")
    with pytest.raises(TypeError, match="scales must be float32"):
        ops.quantize.default(x, s.double(), "fast", "channel")
    with pytest.raises(ValueError, match="unknown CUDA variant 'warp'"):
        ops.quantize.default(x, s, "warp", "channel")
    with pytest.raises(ValueError, match="unknown CUDA variant 'cpu_serial'"):
        ops.dequantize.default(q, s, "cpu_serial", "channel", torch.float32)
    with pytest.raises(ValueError, match="granularity must be 'channel' or 'token'"):
        ops.quantize_fused.default(x, "fast", "tensor")
    with pytest.raises(TypeError, match="dequantize dtype must be"):
        ops.dequantize.default(q, s, "fast", "channel", torch.int32)
    with pytest.raises(TypeError, match="q must be int8"):
        ops.dequantize.default(x, s, "fast", "channel", torch.float32)
    with pytest.raises(ValueError, match="is empty"):
        ops.compute_scales.default(x[:0], "token")


# --- the fast quantize's other depth ---------------------------------------------------------------

_FAST_DEPTH_TESTS = "fast and (matches_reference or ties or near_ties or rows_past or misaligned or large_matches or fused)"


def test_fast_quantize_honours_the_rows_in_flight_override():
    """fast_tuning reports the device-derived depth, or the override when one is set."""
    tuning = kvpack.ops.fast_tuning()
    forced = os.environ.get(kvpack.ops.ROWS_IN_FLIGHT_ENV)
    depths = set(tuning["quantize_rows_in_flight"].values())
    assert depths <= {4, 8}, tuning
    if forced:
        assert depths == {int(forced)}, tuning
    assert tuning["peak_gbps"] > 0 and tuning["bytes_in_flight_per_sm"] > 0, tuning


def test_fast_quantize_at_the_other_rows_in_flight():
    """The device picks one of the kernel's two depths (4 or 8 rows in flight); the fast tests run
    again, in a child process, with the other one forced, so both instantiations are checked bit
    for bit on whatever GPU runs this."""
    if os.environ.get(kvpack.ops.ROWS_IN_FLIGHT_ENV):
        pytest.skip("this is the child run")
    chosen = kvpack.ops.fast_tuning()["quantize_rows_in_flight"]["float32"]
    other = 4 if chosen == 8 else 8
    env = {**os.environ, kvpack.ops.ROWS_IN_FLIGHT_ENV: str(other)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         _FAST_DEPTH_TESTS + " or honours"],
        env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
