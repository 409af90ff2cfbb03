"""The INT4 KV cache's layout and its checks (issue 17; ``KVCache(bits=4)`` and
``decode_attention(..., bits=4)`` use them). The arithmetic is kvpack/torch_impl.py's INT4 (symmetric,
docs/int4.md says why), in quant_math.h for the ops: ``kv_append`` and ``decode_attention`` take a
uint8 cache as INT4, with group size D / v_scales.shape[-1], on CUDA (kernels/decode_int4.cu, groups of
32, 64 or 128 channels) and on the CPU (kernels/decode_cpu.cpp, any even group dividing D).

Layout:

* ``k_cache``, ``v_cache``: uint8 ``[B, Hkv, T_max, D / 2]``, two values per byte (element 2i in the
  low nibble), each stored as ``q + 8`` (q in [-7, 7]);
* ``granularity="token"``: ``k_scales``, ``v_scales`` fp32 ``[B, Hkv, T_max, D / group_size]``: one
  scale absmax / 7 per group of ``group_size`` consecutive channels of a token, computed on write;
* ``granularity="channel"``: keys per channel, KIVI's choice: ``k_scales`` fp32 ``[B, Hkv, D]``
  calibrated by a sequence's first append with rows for it (absmax over them / 7, as the INT8 cache's
  channel scales; later keys beyond it saturate at +-7 and are counted), values per token group as above.
"""

from __future__ import annotations

import torch

from . import torch_impl as ti

BITS = (8, 4)
DEFAULT_GROUP = 32  # docs/int4.md: symmetric groups of 32 channels
CUDA_GROUPS = (32, 64, 128)  # the group sizes the CUDA kernels are built for


def check_bits(bits, group_size, head_dim: int) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2
                      or group_size % 2 or head_dim % group_size):
        raise ValueError(f"group_size = {group_size!r} must be an even divisor of head_dim = {head_dim} "
                         "(32, 64 or 128 for the study's layouts)")


def check_device(device: torch.device, group_size: int, head_dim: int) -> None:
    """The CUDA kernels take groups of 32, 64 or 128 channels (at most D); the CPU path any even divisor."""
    if torch.device(device).type == "cuda" and group_size not in CUDA_GROUPS:
        raise ValueError(f"group_size = {group_size} is not built for CUDA: the INT4 kernels take group sizes "
                         f"{CUDA_GROUPS} (at most head_dim = {head_dim}); the CPU path takes any even divisor of D")


def shapes(batch: int, kv_heads: int, head_dim: int, max_tokens: int, granularity: str, group_size: int):
    """(cache shape, k_scales shape, v_scales shape) of an INT4 cache."""
    groups = (batch, kv_heads, max_tokens, head_dim // group_size)
    k_scales = groups if granularity == "token" else (batch, kv_heads, head_dim)
    return (batch, kv_heads, max_tokens, head_dim // 2), k_scales, groups


def dequantize(packed: torch.Tensor, scales: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """fp32 ``[B, Hkv, T, D]`` of a packed INT4 cache and its scales."""
    nib = ti.unpack_nibbles(packed)
    if per_channel:
        return ti.dequantize_int4(nib, scales.unsqueeze(2))
    return ti.int4_dequantize_groups(nib, scales, None)


def check_inputs(q, k_cache, v_cache, k_scales, v_scales, granularity: str, group_size: int) -> None:
    b, _, d = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != torch.uint8 or c.dim() != 4 or c.shape[0] != b or c.shape[3] * 2 != d:
            raise ValueError(f"{name} must be uint8 [B = {b}, Hkv, T_max, D / 2 = {d // 2}] (bits=4: two values a "
                             f"byte), got {c.dtype} {tuple(c.shape)}")
    _, kv_shape, v_shape = shapes(b, k_cache.shape[1], d, k_cache.shape[2], granularity, group_size)
    for name, s, want in (("k_scales", k_scales, kv_shape), ("v_scales", v_scales, v_shape)):
        if s.dtype != torch.float32 or tuple(s.shape) != want:
            raise ValueError(f"{name} must be float32 {want} for bits=4, granularity={granularity!r}, "
                             f"group_size={group_size}, got {s.dtype} {tuple(s.shape)}")


__all__ = ["BITS", "CUDA_GROUPS", "DEFAULT_GROUP", "check_bits", "check_device", "check_inputs", "dequantize", "shapes"]
