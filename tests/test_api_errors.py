"""Bad input gets a clear TypeError/ValueError from the public API, never a crash deep inside."""

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
