"""cpu_serial (the paper's C++ baseline) and cpu_torch, bit-exact against the float64 reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpack
from kvpack import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 5), (1023, 67), (64, 129), (2, 4097)]


def _check(x, variant, granularity):
    q, s = kvpack.quantize(x, variant, granularity)
    qr, sr = R.quantize(x, granularity=granularity)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert np.array_equal(s.double().numpy(), sr), "scales differ from the reference"
    assert np.array_equal(q.numpy(), qr), "quantized values differ from the reference"
    y = kvpack.dequantize(q, s, variant, granularity, dtype=x.dtype)
    yr = torch.from_numpy(R.dequantize(qr, sr, granularity)).float().to(x.dtype)
    assert y.dtype == x.dtype and torch.equal(y, yr)


@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
@pytest.mark.parametrize("granularity", kvpack.GRANULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact(variant, granularity, dtype, shape):
    torch.manual_seed(hash((variant, granularity, str(dtype), shape)) % 2**31)
    x = (torch.randn(shape) * 3).to(dtype)
    _check(x, variant, granularity)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.floats(1e-6, 1e6), st.sampled_from(kvpack.CPU_VARIANTS),
       st.sampled_from(kvpack.GRANULARITIES), st.integers(0, 2**31 - 1))
def test_bit_exact_random(T, D, scale, variant, granularity, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((T, D), generator=g) * 2 - 1) * scale
    _check(x, variant, granularity)


@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_zero_column_and_row(variant):
    x = torch.randn(6, 5)
    x[:, 2] = 0
    x[4, :] = 0
    for g in kvpack.GRANULARITIES:
        q, s = kvpack.quantize(x, variant, g)
        y = kvpack.dequantize(q, s, variant, g)
        assert torch.isfinite(y).all()
        if g == "channel":
            assert s[2] == 0 and (q[:, 2] == 0).all() and (y[:, 2] == 0).all()
        else:
            assert s[4] == 0 and (q[4] == 0).all() and (y[4] == 0).all()


def test_variants_agree_on_paper_data():
    from kvpack.study import workloads

    x = workloads.uniform(2048, 128, seed=0)
    a, sa = kvpack.quantize(x, "cpu_serial")
    b, sb = kvpack.quantize(x, "cpu_torch")
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert torch.equal(kvpack.compute_scales(x, variant="cpu_serial"), kvpack.compute_scales(x, variant="cpu_torch"))


def test_non_contiguous_input_is_copied():
    x = torch.randn(40, 30)
    xt = x.t()  # non-contiguous view
    for v in kvpack.CPU_VARIANTS:
        q, s = kvpack.quantize(xt, v)
        qr, _ = R.quantize(xt)
        assert np.array_equal(q.numpy(), qr)


def test_cpu_variants_listed():
    assert kvpack.available_variants("cpu") == ("cpu_serial", "cpu_torch")
    assert set(kvpack.VARIANTS) == set(kvpack.CPU_VARIANTS) | set(kvpack.CUDA_VARIANTS)
