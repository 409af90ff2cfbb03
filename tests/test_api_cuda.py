"""The public API on CUDA: non-finite input found on the scales, and an asynchronous, capturable call.

The scales kernels reduce with quant_math.h's absmax_combine, which keeps NaN and inf, so one NaN
(inf) anywhere in a channel (token) makes its scale NaN (inf) on every path of kernels/scales.cu:
the 16-byte vector per-channel kernel (its unrolled rows and its tail rows, several row blocks merged
by atomics), the scalar per-channel kernel (odd D, misaligned data) and the per-token kernel (its
unrolled columns, its tail and the warp shuffles). kvpack.quantize's default check sees that and
raises; with check_finite=False the call is asynchronous and can be captured in a CUDA graph.

Needs a CUDA device: skipped otherwise.
"""

from __future__ import annotations

import math
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

DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (T, D, storage offset): vector per-channel kernel (D a multiple of 8, aligned; 4097 x 256 and
# 20000 x 64 have several row blocks per column and tail rows), scalar per-channel kernel (odd D;
# an offset of one element), per token (D = 200 and 67: tails of the 4 x 32 loads; 37 x 5120 wide).
SHAPES = [(1023, 64, 0), (4097, 256, 0), (20000, 64, 0), (37, 5120, 0), (1023, 67, 0), (257, 128, 1), (100, 200, 0)]


def case_seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) % (2**31)


def make_x(T: int, D: int, dtype, seed: int, offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = (torch.rand(T * D + offset, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).to(DEV)
    return flat[offset:].view(T, D)  # offset 1: data not 16-byte aligned (the scalar kernels)


def poisoned(x: torch.Tensor, offset: int, pos: tuple[int, int], value: float) -> torch.Tensor:
    """A copy of x, at the same storage offset (alignment), with x[pos] = value."""
    T, D = x.shape
    y = torch.empty(T * D + offset, dtype=x.dtype, device=DEV)[offset:].view(T, D)
    y.copy_(x)
    y[pos] = value
    return y


def positions(T: int, D: int, seed: int) -> list[tuple[int, int]]:
    g = np.random.default_rng(seed)
    return [(0, 0), (T - 1, D - 1), (T - 1, 0), (int(g.integers(T)), int(g.integers(D)))]


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    assert kvpack.available_variants("cuda"), "the extension has no CUDA variants"


@pytest.mark.parametrize("granularity", kvpack.GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}+{s[2]}")
def test_non_finite_reaches_the_scale(shape, dtype, granularity):
    T, D, offset = shape
    x = make_x(T, D, dtype, case_seed("nonfinite", shape, dtype, granularity), offset)
    s_ref = reference.scales(x.cpu(), granularity)
    for value in (float("nan"), float("inf"), float("-inf")):
        for pos in positions(T, D, case_seed("pos", shape, dtype, granularity, value)):
            y = poisoned(x, offset, pos, value)
            index = pos[1] if granularity == "channel" else pos[0]
            s = kvpack.compute_scales(y, granularity, check_finite=False)
            got = s[index].item()
            assert (math.isnan(got) if math.isnan(value) else got == math.inf), (value, pos, got)
            rest = np.delete(s.cpu().numpy().astype(np.float64), index)
            assert np.array_equal(rest, np.delete(s_ref, index)), "the other scales must not change"
            with pytest.raises(ValueError, match=rf"non-finite .* the first at index {index};"):
                kvpack.compute_scales(y, granularity)
    y = poisoned(x, offset, positions(T, D, 1)[-1], math.nan)
    for variant in kvpack.CUDA_VARIANTS:  # every variant's fused entry point refuses it by default
        with pytest.raises(ValueError, match="non-finite"):
            kvpack.quantize(y, variant, granularity)
        with pytest.raises(ValueError, match="non-finite"):
            kvpack.quantize_fused(y, variant, granularity)
        kvpack.quantize(y, variant, granularity, check_finite=False)  # no error, no sync


@pytest.mark.parametrize("variant", kvpack.CUDA_VARIANTS)
def test_default_quantize_equals_the_fused_op(variant):
    """quantize(x) with defaults (scales, check, quantize) gives quantize_fused's bits, and so does check_finite=False."""
    for dtype in DTYPES:
        for granularity in kvpack.GRANULARITIES:
            x = make_x(1023, 136, dtype, case_seed("fused", variant, dtype, granularity))
            q, s = kvpack.quantize(x, variant, granularity)
            q_f, s_f = torch.ops.kvpack.quantize_fused(x, variant, granularity)
            assert torch.equal(q, q_f) and torch.equal(s, s_f)
            q_a, s_a = kvpack.quantize(x, variant, granularity, check_finite=False)
            assert torch.equal(q_a, q_f) and torch.equal(s_a, s_f)
            q_ref, s_ref = reference.quantize(x.cpu(), granularity=granularity)
            assert np.array_equal(s.cpu().numpy().astype(np.float64), s_ref)
            assert np.array_equal(q.cpu().numpy(), q_ref)


@pytest.mark.parametrize("granularity", kvpack.GRANULARITIES)
@pytest.mark.parametrize("variant", kvpack.CUDA_VARIANTS)
def test_check_finite_false_is_graph_capturable(variant, granularity):
    """kvpack.quantize(x, check_finite=False) captured in a CUDAGraph, replayed on new data."""
    shape = (4097, 256)
    x1 = make_x(*shape, torch.float32, case_seed("graph1", variant, granularity))
    x2 = make_x(*shape, torch.float32, case_seed("graph2", variant, granularity))
    static_x = x1.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (torch's recipe for graphs)
        for _ in range(2):
            kvpack.quantize(static_x, variant, granularity, check_finite=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_static, s_static = kvpack.quantize(static_x, variant, granularity, check_finite=False)
    for x in (x1, x2, x1):
        static_x.copy_(x)
        graph.replay()
        q, s = kvpack.quantize(x, variant, granularity)
        torch.cuda.synchronize()
        assert torch.equal(q_static, q) and torch.equal(s_static, s)


@pytest.mark.parametrize("granularity", kvpack.GRANULARITIES)
def test_default_check_sees_each_call_through_its_reused_buffer(granularity):
    """The default check copies the scales into one pinned buffer per thread and device, reused and
    grown: a clean call, a NaN call with more scales than the buffer held (it grows), a clean call
    with fewer (a prefix of it), a NaN call again: each verdict is that call's own."""
    small = torch.rand(4096, 64, device=DEV) - 0.5
    big = torch.rand(20000, 9000, device=DEV) - 0.5
    big[123, 4567] = float("nan")
    kvpack.quantize(small, granularity=granularity)
    with pytest.raises(ValueError, match="non-finite"):
        kvpack.quantize(big, granularity=granularity)
    q, s = kvpack.quantize(small, granularity=granularity)
    assert bool(torch.isfinite(s).all())
    big_scales = kvpack.compute_scales(big.nan_to_num(0.0), granularity)
    small[7, 7] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        kvpack.quantize(small, granularity=granularity)
    # and a given-scales call checks the given scales the same way
    bad = big_scales.clone()
    bad[-1] = float("nan")
    with pytest.raises(ValueError):
        kvpack.quantize(big.nan_to_num(0.0), scales=bad, granularity=granularity)
