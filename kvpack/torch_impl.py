"""The quantizer written in plain PyTorch ops: the ``cpu_torch`` variant, the eager peer, and
(through torch.compile) the compiled peer. Same arithmetic as quant_math.h: IEEE fp32 division,
round half to even (torch.round), clamp to [-127, 127], zero scale -> 0.
"""

from __future__ import annotations

import torch

QMAX = 127.0


def _dim(granularity: str) -> int:
    return 0 if granularity == "channel" else 1  # reduce over tokens (per channel) or channels


def _bcast(scales: torch.Tensor, granularity: str) -> torch.Tensor:
    """Scales against rows ``[..., T, D]``: per channel ``[..., D]``, per token ``[..., T]``."""
    return scales.unsqueeze(-2) if granularity == "channel" else scales.unsqueeze(-1)


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 absmax / 127, the IEEE quotient (quant_math.h's scale_from_absmax)."""
    absmax = absmax.float()
    # Divide by a tensor, not a Python number: on CUDA, torch turns division by a scalar into
    # multiplication by its reciprocal, which is not the IEEE quotient the kernels compute.
    return absmax / torch.full_like(absmax, QMAX)


def scales_torch(x: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    return scale_from_absmax(torch.amax(torch.abs(x.float()), dim=_dim(granularity)))


def quantize_torch(x: torch.Tensor, scales: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    s = _bcast(scales, granularity)
    q = torch.clamp(torch.round(x.float() / s), -QMAX, QMAX)
    return torch.where(s == 0, 0.0, q).to(torch.int8)


def dequantize_torch(q: torch.Tensor, scales: torch.Tensor, granularity: str = "channel", dtype=torch.float32) -> torch.Tensor:
    return (q.float() * _bcast(scales, granularity)).to(dtype)


def quantize_fused_torch(x: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    s = scales_torch(x, granularity)
    return quantize_torch(x, s, granularity), s


# --- INT4 (issue 17): two values per byte, a scale per group -----------------------------------------
#
# Symmetric: scale = fp32(absmax / 7); q = clamp(round_half_even(fp32(x / scale)), -7, 7), stored as
# the nibble q + 8 (1..15); x_hat = fp32(q * scale). Asymmetric: lo = min, range = fp32(max - lo),
# scale = fp32(range / 15); q = clamp(round_half_even(fp32(fp32(x - lo) / scale)), 0, 15), the nibble
# itself; x_hat = fp32(fp32(q * scale) + lo). A zero scale gives q = 0 (x_hat = lo, or 0). Every step
# is one IEEE fp32 operation, so kvpack/reference.py's float64 version is bit-exact with this one.

INT4_SYM_QMAX = 7.0
INT4_ASYM_LEVELS = 15.0


def int4_sym_scale(absmax: torch.Tensor) -> torch.Tensor:
    absmax = absmax.float()
    return absmax / torch.full_like(absmax, INT4_SYM_QMAX)  # the IEEE quotient (see scale_from_absmax)


def int4_asym_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, lo) of an asymmetric group: scale = fp32(fp32(hi - lo) / 15)."""
    lo, hi = lo.float(), hi.float()
    span = hi - lo
    return span / torch.full_like(span, INT4_ASYM_LEVELS), lo


def quantize_int4(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None = None) -> torch.Tensor:
    """Nibbles (uint8 0..15) of x with broadcastable ``scale`` (and ``lo``: asymmetric)."""
    x = x.float()
    if lo is None:
        q = torch.clamp(torch.round(x / scale), -INT4_SYM_QMAX, INT4_SYM_QMAX) + 8.0
        q = torch.where(scale == 0, 8.0, q)
    else:
        q = torch.clamp(torch.round((x - lo) / scale), 0.0, INT4_ASYM_LEVELS)
        q = torch.where(scale == 0, 0.0, q)
    return q.to(torch.uint8)


def dequantize_int4(nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None = None,
                    dtype=torch.float32) -> torch.Tensor:
    if lo is None:
        return ((nibbles.float() - 8.0) * scale).to(dtype)
    return (nibbles.float() * scale + lo).to(dtype)  # two fp32 ops: the product rounds, then the sum


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., D] nibbles (uint8 0..15, D even) -> [..., D / 2] bytes: element 2i low, 2i + 1 high."""
    if nibbles.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack two values per byte, got {nibbles.shape[-1]}")
    n = nibbles.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., D / 2] bytes -> [..., D] nibbles (the inverse of pack_nibbles)."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def int4_quantize_groups(x: torch.Tensor, group: int, symmetric: bool = True):
    """INT4 over groups of ``group`` consecutive elements of the last dimension (which it must divide):
    (nibbles like x, scale [..., n_groups], lo [..., n_groups] or None)."""
    d = x.shape[-1]
    if group < 1 or d % group:
        raise ValueError(f"group = {group} must divide the last dimension ({d})")
    g = x.float().reshape(*x.shape[:-1], d // group, group)
    if symmetric:
        scale, lo = int4_sym_scale(torch.amax(torch.abs(g), dim=-1)), None
    else:
        scale, lo = int4_asym_params(torch.amin(g, dim=-1), torch.amax(g, dim=-1))
    nib = quantize_int4(g, scale.unsqueeze(-1), None if lo is None else lo.unsqueeze(-1))
    return nib.reshape(x.shape), scale, lo


def int4_dequantize_groups(nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, dtype=torch.float32):
    d = nibbles.shape[-1]
    group = d // scale.shape[-1]
    n = nibbles.reshape(*nibbles.shape[:-1], d // group, group)
    x = dequantize_int4(n, scale.unsqueeze(-1), None if lo is None else lo.unsqueeze(-1), dtype)
    return x.reshape(nibbles.shape)
