"""The Python face of the kvpack ops: input checks with clear errors, variant dispatch, and
``register_fake`` so torch.compile can trace the custom ops without running them.

Inputs: a 2-D [T, D] tensor (T tokens, D head dimension) of float32, float16 or bfloat16.
Non-contiguous inputs are accepted and copied to a contiguous layout first (the kernels read
row-major data); that copy is the caller's cost, so pass contiguous tensors when timing.

Non-finite input and host synchronisation. The abs-max reduction propagates NaN and inf
(quant_math.h's absmax_combine), so a channel (token) holding one gets a non-finite scale, and the
default ``check_finite=True`` checks the D (or T) scales, never x: their copy to pinned host memory
and a check on the host. That is the call's one host synchronisation, and it is placed so as to
cost little: quantize queues the scales kernel, then the copy on a side stream (which waits for the
scales kernel), the quantize kernel on the current stream right after the scales kernel, and only
then waits, for the copy (an event), not for the quantize kernel: the copy and the host's round trip
overlap the quantize kernel. (H200, fp32 per channel: 1.00x the fused op's time at 262144x128 and
0.99x at 131072x1024, where a reduction of the scales on the device before the copy cost 1.11x and
1.03x; reports/reference/h200/logs/api_placement.txt. tools/bench_kernels.py --api measures it.) ``check_finite=False`` checks and
synchronises nothing: one call to the fused entry point (torch.ops.kvpack.quantize_fused: the scales
kernel, then the quantize kernel, on the current stream), outputs of shapes known from x's, so the
call can be captured in a CUDA graph; non-finite channels then come back with NaN/inf scales. With
``scales=`` given, the check is on those scales (finite, else ValueError), placed the same way; x is
not scanned, and non-finite elements of x quantize to what quant_math.h gives (NaN -> 0, +-inf ->
+-127 on the CUDA variants and cpu_serial; unspecified on cpu_torch). dequantize checks no values
and never synchronises.
"""

from __future__ import annotations

import json
import math
import os
import threading

import numpy as np
import torch

from .torch_impl import dequantize_torch, quantize_fused_torch, quantize_torch, scales_torch

CPU_VARIANTS = ("cpu_serial", "cpu_torch")
CUDA_VARIANTS = ("naive", "tiled", "coarsened", "vectorized", "fast")
VARIANTS = CPU_VARIANTS + CUDA_VARIANTS
GRANULARITIES = ("channel", "token")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_fakes_registered = False


ROWS_IN_FLIGHT_ENV = "KVPACK_QUANTIZE_ROWS_IN_FLIGHT"  # overrides the fast quantize's device-derived choice


def _check_environment() -> None:
    value = os.environ.get(ROWS_IN_FLIGHT_ENV)
    if value is not None and value not in ("4", "8"):
        raise ValueError(
            f"{ROWS_IN_FLIGHT_ENV}={value!r}: the fast quantize kernel keeps 4 or 8 rows in flight; set it "
            "to 4 or 8, or unset it to let the kernel choose from the device"
        )


def _ensure_loaded() -> dict:
    global _fakes_registered
    _check_environment()
    from . import build  # imported late: `python -m kvpack.build` must not find itself pre-imported

    info = build.load()
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True
    return info


def _register_fakes() -> None:
    def n_scales(x, granularity):
        return x.shape[1] if granularity == "channel" else x.shape[0]

    @torch.library.register_fake("kvpack::compute_scales")
    def _(x, granularity):
        return x.new_empty((n_scales(x, granularity),), dtype=torch.float32)

    @torch.library.register_fake("kvpack::quantize")
    def _(x, scales, variant, granularity):
        return x.new_empty(x.shape, dtype=torch.int8)

    @torch.library.register_fake("kvpack::dequantize")
    def _(q, scales, variant, granularity, dtype):
        return q.new_empty(q.shape, dtype=dtype)

    @torch.library.register_fake("kvpack::quantize_fused")
    def _(x, variant, granularity):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((n_scales(x, granularity),), dtype=torch.float32)


def available_variants(device="cpu") -> tuple[str, ...]:
    """Variants that run on ``device`` in this process ('cpu' or 'cuda')."""
    if torch.device(device).type == "cuda":
        return CUDA_VARIANTS if _ensure_loaded()["cuda"] else ()
    return CPU_VARIANTS


def fast_tuning(device=None) -> dict | None:
    """What the "fast" kernels chose on a CUDA device from its properties, or None without one.

    The device's peak DRAM bandwidth (memory clock x bus width), the bytes a streaming kernel must
    keep in flight per SM to reach it (bandwidth per SM x the loaded latency, Little's law), and the
    rows in flight and resident blocks of the quantize kernel per dtype (kernels/quantize_fast.cu).
    The benchmarks record it in their provenance.
    """
    if not torch.cuda.is_available() or not _ensure_loaded()["cuda"]:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return json.loads(torch.ops.kvpack.fast_tuning.default(torch.empty(0, device=device)))


def default_variant(device) -> str:
    return "fast" if torch.device(device).type == "cuda" else "cpu_torch"


# --- checks -------------------------------------------------------------------------------------

def _check_matrix(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [T, D] tensor (tokens x head dimension), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); T and D must both be at least 1")


def _check_input(x) -> None:
    _check_matrix(x, "x")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}; convert it with x.float()")


class _FiniteCheckState(threading.local):
    """Per thread and CUDA device: a side stream, a pinned host buffer and an event, made on first use
    and reused, so that a default call allocates nothing on the host (a pinned allocation and a new
    event cost the call tens of microseconds of host time). Reuse is safe: every call waits for its
    copy before it returns, and copies on one side stream run in order."""

    def __init__(self):
        self.streams: dict[int, torch.cuda.Stream] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.events: dict[int, torch.cuda.Event] = {}


_finite_state = _FiniteCheckState()


def _queue_finite_check(scales: torch.Tensor):
    """Start copying ``scales`` to the host; return a function that waits for the copy and says
    whether every scale is finite.

    On CUDA the copy (D or T floats into pinned memory) runs on a side stream that waits for the work
    queued so far on the current stream (the scales kernel), so the current stream goes on to the next
    kernel (quantize) with nothing in between, and the host waits for an event after the copy, not
    for the quantize kernel; the check itself runs on the host. (H200, 262144x128 fp32: the same
    steps cost 1.00x the fused op; a device reduction of the scales before the copy cost 1.11x on the
    current stream and 1.28x on the side stream: reports/reference/h200/logs/api_placement.txt.)
    """
    if scales.device.type != "cuda":
        return lambda: bool(torch.isfinite(scales).all())
    index = scales.device.index if scales.device.index is not None else torch.cuda.current_device()
    state = _finite_state
    side = state.streams.get(index)
    if side is None:
        side = state.streams[index] = torch.cuda.Stream(device=index)
        state.events[index] = torch.cuda.Event()
    buffer = state.buffers.get(index)
    n = scales.numel()
    if buffer is None or buffer.numel() < n:
        buffer = state.buffers[index] = torch.empty(max(n, 8192), dtype=torch.float32, pin_memory=True)
    host = buffer[:n]
    copied = state.events[index]
    side.wait_stream(torch.cuda.current_stream(scales.device))
    with torch.cuda.stream(side):
        host.copy_(scales, non_blocking=True)
        copied.record(side)
    scales.record_stream(side)  # its memory is not handed out again before the side stream has read it

    def wait():
        copied.synchronize()
        return bool(np.isfinite(host.numpy()).all())

    return wait


def _check_x_verdict(finite: bool, scales: torch.Tensor, granularity: str) -> None:
    """Raise if the scales computed from x, whose maximum was (not) finite, say that x holds inf or NaN.

    The scales are absmax / 127 with NaN and inf propagated, so they are >= 0 or non-finite, and their
    maximum (NaN wins in torch.amax) is finite exactly when every channel (token) of x is.
    """
    if finite:
        return
    bad = torch.nonzero(~torch.isfinite(scales)).flatten()  # the error path: may take its time
    units = "channels (columns)" if granularity == "channel" else "tokens (rows)"
    raise ValueError(
        f"x holds non-finite values (inf or NaN) in {bad.numel()} of its {scales.numel()} {units}, "
        f"the first at index {int(bad[0])}; INT8 scales would be undefined. Clean the input, or pass "
        "check_finite=False to skip this check (then the call never synchronises with the host, and "
        "those scales come back inf or NaN)"
    )


def _check_given_verdict(finite: bool, scales: torch.Tensor) -> None:
    """Raise if caller-given scales were not all finite. x is not scanned."""
    if finite:
        return
    bad = torch.nonzero(~torch.isfinite(scales)).flatten()
    raise ValueError(
        f"scales hold {bad.numel()} non-finite value(s) (inf or NaN), the first at index {int(bad[0])}; "
        "pass finite scales (kvpack.compute_scales gives them), or check_finite=False to skip this check"
    )


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _resolve_variant(variant, device: torch.device) -> str:
    if variant is None:
        return default_variant(device)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    if device.type == "cuda" and variant in CPU_VARIANTS:
        raise ValueError(f"variant {variant!r} runs on CPU tensors, but the tensor is on {device}; use one of {CUDA_VARIANTS}")
    if device.type != "cuda" and variant in CUDA_VARIANTS:
        raise ValueError(f"variant {variant!r} runs on CUDA tensors, but the tensor is on {device}; use one of {CPU_VARIANTS}")
    if device.type == "cuda" and not _ensure_loaded()["cuda"]:
        raise RuntimeError(f"the kvpack extension was built without its CUDA half: {_ensure_loaded()['cuda_skipped_reason']}")
    return variant


def _check_scales(scales, x, granularity: str) -> None:
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    n = x.shape[1] if granularity == "channel" else x.shape[0]
    kind = "one per channel (D)" if granularity == "channel" else "one per token (T)"
    if scales.dim() != 1 or scales.shape[0] != n:
        raise ValueError(f"scales must have shape ({n},), {kind} for a {tuple(x.shape)} tensor, got {tuple(scales.shape)}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if scales.device != x.device:
        raise ValueError(f"scales are on {scales.device} but the tensor is on {x.device}; move them with .to({str(x.device)!r})")


# --- public API ---------------------------------------------------------------------------------

def _scales_op(x: torch.Tensor, granularity: str, variant: str) -> torch.Tensor:
    if variant == "cpu_torch":
        return scales_torch(x, granularity)
    _ensure_loaded()
    return torch.ops.kvpack.compute_scales.default(x, granularity)


def _quantize_op(x: torch.Tensor, scales: torch.Tensor, variant: str, granularity: str) -> torch.Tensor:
    if variant == "cpu_torch":
        return quantize_torch(x, scales, granularity)
    _ensure_loaded()
    return torch.ops.kvpack.quantize.default(x, scales.contiguous(), variant, granularity)


def compute_scales(x: torch.Tensor, granularity: str = "channel", *, variant=None, check_finite: bool = True) -> torch.Tensor:
    """fp32 scales max|x| / 127, one per channel ([D]) or per token ([T]), on x's device.

    On CPU, ``variant='cpu_serial'`` uses the paper's serial loops, anything else torch ops; on CUDA
    every variant shares one scales kernel. A NaN (inf) in a channel (token) gives it a NaN (inf)
    scale. ``check_finite=True`` (default) then raises ValueError, found on the scales alone, at the
    cost of one host synchronisation; ``check_finite=False`` is asynchronous and returns them.
    """
    _check_input(x)
    _check_granularity(granularity)
    variant = _resolve_variant(variant, x.device)
    scales = _scales_op(x if variant == "cpu_torch" else x.contiguous(), granularity, variant)
    if check_finite:
        _check_x_verdict(math.isfinite(torch.amax(scales).item()), scales, granularity)
    return scales


def quantize(x: torch.Tensor, variant=None, granularity: str = "channel", *, scales=None, check_finite: bool = True):
    """Symmetric INT8 quantization. Returns ``(q, scales)``: q int8 [T, D], scales fp32.

    With ``scales=None`` the scales are computed on x's device and x is quantized with them.
    Non-finite input raises ValueError by default, found on the scales (a NaN or inf absmax), not by
    a pass over x: the scales kernel, a reduction of the scales and its copy to the host, the quantize
    kernel, then one host synchronisation, for the copy, which overlaps the quantize kernel.
    ``check_finite=False``: one call to the fused entry point (torch.ops.kvpack.quantize_fused), no
    check, no synchronisation, CUDA-graph capturable.

    With ``scales`` given, ``check_finite=True`` checks that they are finite (the same single
    synchronisation); x is not scanned, and a NaN in x quantizes to 0 and +-inf to +-127 (CUDA
    variants, cpu_serial; unspecified on cpu_torch).
    """
    _check_input(x)
    _check_granularity(granularity)
    variant = _resolve_variant(variant, x.device)
    if variant != "cpu_torch":
        x = x.contiguous()
    if scales is None:
        if not check_finite:
            if variant == "cpu_torch":
                return quantize_fused_torch(x, granularity)
            _ensure_loaded()
            return torch.ops.kvpack.quantize_fused.default(x, variant, granularity)
        scales = _scales_op(x, granularity, variant)
        finite = _queue_finite_check(scales)  # beside the quantize kernel, read after it
        q = _quantize_op(x, scales, variant, granularity)
        _check_x_verdict(finite(), scales, granularity)
        return q, scales
    _check_scales(scales, x, granularity)
    finite = _queue_finite_check(scales) if check_finite else None
    q = _quantize_op(x, scales, variant, granularity)
    if finite is not None:
        _check_given_verdict(finite(), scales)
    return q, scales


def quantize_fused(x: torch.Tensor, variant=None, granularity: str = "channel", *, check_finite: bool = True):
    """Scales then quantization in one call. Returns ``(q, scales)``.

    The same as ``quantize(x, variant, granularity)`` with ``scales=None``, and the same rule for
    ``check_finite``: by default one host synchronisation, overlapping the quantize kernel; with
    False, one call to torch.ops.kvpack.quantize_fused, asynchronous.
    """
    return quantize(x, variant, granularity, check_finite=check_finite)


def dequantize(q: torch.Tensor, scales: torch.Tensor, variant=None, granularity: str = "channel", dtype=torch.float32) -> torch.Tensor:
    """Reconstruct ``q * scales`` (computed in fp32) as ``dtype`` (float32, float16 or bfloat16).

    Checks shapes, dtypes and devices only: no values are scanned and the call never synchronises.
    """
    _check_matrix(q, "q")
    if q.dtype != torch.int8:
        raise TypeError(f"q must be int8 (the output of kvpack.quantize), got {q.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_granularity(granularity)
    _check_scales(scales, q, granularity)
    variant = _resolve_variant(variant, q.device)
    if variant == "cpu_torch":
        return dequantize_torch(q, scales, granularity, dtype)
    _ensure_loaded()
    return torch.ops.kvpack.dequantize.default(q.contiguous(), scales.contiguous(), variant, granularity, dtype)
