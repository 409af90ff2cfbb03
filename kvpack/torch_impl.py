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
    return scales.unsqueeze(0) if granularity == "channel" else scales.unsqueeze(1)


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
