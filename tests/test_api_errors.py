"""Bad input gets a clear TypeError/ValueError from the public API, never a crash deep inside."""

import math

import pytest
import torch

import kvpack


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.ones(4, 4, dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
        (torch.ones(4, 4, dtype=torch.int32), TypeError, "float32, float16 or bfloat16"),
        (torch.ones(4), ValueError, "2-D"),
        (torch.ones(2, 3, 4), ValueError, "2-D"),
        (torch.ones(0, 4), ValueError, "empty"),
        (torch.ones(4, 0), ValueError, "empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "non-finite"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "non-finite"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_quantize_rejects(x, exc, match, variant):
    with pytest.raises(exc, match=match):
        kvpack.quantize(x, variant)


def test_non_finite_check_can_be_turned_off():
    x = torch.tensor([[1.0, float("inf")], [0.5, 2.0]])
    q, s = kvpack.quantize(x, "cpu_serial", check_finite=False)
    assert q.shape == x.shape


def test_unknown_variant_and_granularity():
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown variant"):
        kvpack.quantize(x, "turbo")
    with pytest.raises(ValueError, match="granularity"):
        kvpack.quantize(x, "cpu_torch", "tensor")


def test_gpu_variant_on_cpu_tensor():
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        kvpack.quantize(torch.ones(2, 2), "fast")


@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_bad_scales(variant):
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        kvpack.quantize(x, variant, scales=torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        kvpack.quantize(x, variant, "token", scales=torch.ones(5))
    with pytest.raises(TypeError, match="float32"):
        kvpack.quantize(x, variant, scales=torch.ones(5, dtype=torch.float64))
    q, s = kvpack.quantize(x, variant)
    with pytest.raises(ValueError, match="shape"):
        kvpack.dequantize(q, s[:-1], variant)
    with pytest.raises(TypeError, match="int8"):
        kvpack.dequantize(q.float(), s, variant)
    with pytest.raises(TypeError, match="dtype"):
        kvpack.dequantize(q, s, variant, dtype=torch.float64)


def test_direct_op_call_is_checked_in_cpp():
    kvpack.quantize(torch.ones(1, 1), "cpu_serial")  # loads the extension
    with pytest.raises(ValueError, match="scales must have shape"):
        torch.ops.kvpack.quantize(torch.ones(3, 5), torch.ones(4), "cpu_serial", "channel")
    with pytest.raises(ValueError, match="no CPU implementation"):
        torch.ops.kvpack.quantize(torch.ones(3, 5), torch.ones(5), "fast", "channel")
    with pytest.raises(ValueError, match="granularity"):
        torch.ops.kvpack.compute_scales(torch.ones(3, 5), "tensor")


def test_opcheck_cpu_ops():
    x = torch.randn(7, 9)
    kvpack.quantize(x, "cpu_serial")
    s = torch.ops.kvpack.compute_scales(x, "channel")
    q = torch.ops.kvpack.quantize(x, s, "cpu_serial", "channel")
    for op, args in [
        (torch.ops.kvpack.compute_scales.default, (x, "channel")),
        (torch.ops.kvpack.quantize.default, (x, s, "cpu_serial", "channel")),
        (torch.ops.kvpack.dequantize.default, (q, s, "cpu_serial", "channel", torch.float16)),
        (torch.ops.kvpack.quantize_fused.default, (x, "cpu_serial", "token")),
    ]:
        torch.library.opcheck(op, args)


# --- non-finite input: found on the scales, not by a pass over x ---------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _poisoned(value: float, position: tuple[int, int], dtype, shape=(37, 21)) -> torch.Tensor:
    x = torch.linspace(-3, 3, shape[0] * shape[1]).reshape(shape)
    x[position] = value
    return x.to(dtype)


POSITIONS = [(0, 0), (36, 20), (17, 3), (0, 20), (36, 0)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", POSITIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", kvpack.GRANULARITIES)
@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_non_finite_input_is_refused_by_every_entry_point(variant, granularity, dtype, position, value):
    x = _poisoned(value, position, dtype)
    index = position[1] if granularity == "channel" else position[0]
    n = x.shape[1] if granularity == "channel" else x.shape[0]
    unit = "channel" if granularity == "channel" else "token"
    expected = rf"non-finite values \(inf or NaN\) in 1 of its {n} {unit}s \(.*first at index {index};"
    with pytest.raises(ValueError, match=expected):
        kvpack.quantize(x, variant, granularity)
    with pytest.raises(ValueError, match=expected):
        kvpack.quantize_fused(x, variant, granularity)
    with pytest.raises(ValueError, match=expected):
        kvpack.compute_scales(x, granularity, variant=variant)
    # check_finite=False: no error, and the bad channel's (token's) scale says what it held
    s = kvpack.compute_scales(x, granularity, variant=variant, check_finite=False)
    q, s_q = kvpack.quantize(x, variant, granularity, check_finite=False)
    q_f, s_f = kvpack.quantize_fused(x, variant, granularity, check_finite=False)
    for scales in (s, s_q, s_f):
        assert (torch.isnan(scales[index]) if math.isnan(value) else torch.isposinf(scales[index]))
        others = torch.ones(n, dtype=torch.bool)
        others[index] = False
        assert bool(torch.isfinite(scales[others]).all())
    for scales in (s_q, s_f):
        torch.testing.assert_close(scales, s, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, q_f)


@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_nan_wins_over_inf_and_the_message_counts_channels(variant):
    x = torch.randn(8, 6)
    x[1, 2], x[5, 2] = float("inf"), float("nan")  # one channel, both
    x[3, 4] = float("-inf")
    s = kvpack.compute_scales(x, variant=variant, check_finite=False)
    assert torch.isnan(s[2]) and torch.isposinf(s[4]) and int(torch.isfinite(s).sum()) == 4
    with pytest.raises(ValueError, match=r"in 2 of its 6 channels \(columns\), the first at index 2;"):
        kvpack.quantize(x, variant)
    with pytest.raises(ValueError, match=r"in 3 of its 8 tokens \(rows\), the first at index 1;"):
        kvpack.quantize(x, variant, "token")


@pytest.mark.parametrize("variant", kvpack.CPU_VARIANTS)
def test_given_scales_are_checked_and_x_is_not_scanned(variant):
    x = torch.randn(5, 4)
    s = kvpack.compute_scales(x)
    bad = s.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"scales hold 1 non-finite value\(s\) .*first at index 3;"):
        kvpack.quantize(x, variant, scales=bad)
    kvpack.quantize(x, variant, scales=bad, check_finite=False)  # unchecked: no error
    # non-finite x with finite scales given: not scanned, no error; quant_math.h's rule on cpu_serial
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("-inf")
    q, _ = kvpack.quantize(x, variant, scales=s)
    if variant == "cpu_serial":
        assert (q[0, 0], q[1, 1], q[2, 2]) == (0, 127, -127)


def test_the_default_check_does_not_scan_x(monkeypatch):
    """The checks' torch.isfinite (and friends) see the scales, never a tensor of x's size."""
    x = torch.randn(64, 48)
    seen = []
    for name in ("isfinite", "isnan", "isinf", "nonzero"):
        original = getattr(torch, name)

        def spy(t, *args, _original=original, **kwargs):
            seen.append(t.numel())
            return _original(t, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    for variant in kvpack.CPU_VARIANTS:
        kvpack.quantize(x, variant)
        kvpack.quantize(x, variant, "token")
        kvpack.quantize_fused(x, variant)
        kvpack.compute_scales(x, variant=variant)
        kvpack.quantize(x, variant, scales=torch.ones(48))
    monkeypatch.undo()
    assert seen and max(seen) <= 64, seen  # the scales: D = 48 or T = 64 values


def test_dequantize_checks_no_values():
    q = torch.zeros(3, 4, dtype=torch.int8)
    s = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    for variant in kvpack.CPU_VARIANTS:
        y = kvpack.dequantize(q, s, variant)
        assert y.shape == q.shape
