"""The INT4 KV cache's layout, write path and attention on the CPU (issue 17; ``KVCache(bits=4)`` and
``decode_attention(..., bits=4)`` call these). The arithmetic is kvpack/torch_impl.py's INT4
(symmetric, docs/int4.md says why). On CUDA the same layout is written and read by the kernels of
kernels/decode_int4.cu (the ops ``kv_append`` and ``decode_attention`` take a uint8 cache as INT4,
with group size D / v_scales.shape[-1]), for groups of 32, 64 or 128 channels.

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


def _quantize_rows(x: torch.Tensor, group_size: int):
    """[..., D] rows -> (packed [..., D / 2], scales [..., D / group])."""
    nib, scale, _ = ti.int4_quantize_groups(x, group_size, symmetric=True)
    return ti.pack_nibbles(nib), scale


def append(cache, k: torch.Tensor, v: torch.Tensor, n: list[int]) -> None:
    """Write the first n[b] rows of k, v ``[B, Hkv, t, D]`` of each sequence at its length (the caller
    checked the shapes and the room, and set the channel key scales of the sequences it calibrates).
    The CPU path; on CUDA the cache calls the kv_append op."""
    g = cache.group_size
    clipped = 0
    for b, c in enumerate(n):
        if c == 0:
            continue
        start = cache._host_lengths[b]
        sl = slice(start, start + c)
        vp, vs = _quantize_rows(v[b, :, :c], g)
        cache.v_cache[b, :, sl] = vp
        cache.v_scales[b, :, sl] = vs
        if cache.granularity == "token":
            kp, ks = _quantize_rows(k[b, :, :c], g)
            cache.k_scales[b, :, sl] = ks
        else:
            s = cache.k_scales[b].unsqueeze(1)  # [Hkv, 1, D]
            x = k[b, :, :c].float()
            nib = ti.quantize_int4(x, s)
            clipped += int(torch.where(s == 0, x != 0, ~((x / s).abs() < ti.INT4_SYM_QMAX + 0.5)).sum())
            kp = ti.pack_nibbles(nib)
        cache.k_cache[b, :, sl] = kp
    cache.saturated.add_(clipped)
    cache._lengths.copy_(torch.tensor([a + c for a, c in zip(cache._host_lengths, n)], dtype=torch.int32))


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


_CPU_CHUNK = 1024  # tokens a chunk on the CPU path: a chunk's fp32 K or V stays in the caches


def decode_attention(q, k_cache, v_cache, k_scales, v_scales, lengths, granularity: str, sm_scale: float,
                     clamped=None) -> torch.Tensor:
    """softmax(q K^T sm_scale) V over the dequantized INT4 cache, in fp32 (the CPU op's arithmetic for
    INT8: decode_cpu.cpp): lengths clamped to [0, T_max] (0: a zero row), ``clamped`` set where one was."""
    b, hq, d = q.shape
    hkv, t_max = k_cache.shape[1], k_cache.shape[2]
    if lengths is None:
        lens = [t_max] * b
    else:
        raw = lengths.long()
        if clamped is not None and bool(((raw < 1) | (raw > t_max)).any()):
            clamped.fill_(1)
        lens = raw.clamp(0, t_max).tolist()
    # Each sequence over its own length only, its grouped query heads the rows of one GEMM per KV head,
    # dequantized in chunks of _CPU_CHUNK tokens (the INT8 CPU op's way, decode_cpu.cpp): a result depends
    # on its own tokens alone, not on T_max or the batch.
    out = torch.zeros(b, hq, d, dtype=torch.float32)
    channel = granularity == "channel"

    def chunk(cache, scales, per_channel, i, t0, n):  # fp32 [Hkv, n, D]
        sc = scales[i:i + 1] if per_channel else scales[i:i + 1, :, t0:t0 + n]
        return dequantize(cache[i:i + 1, :, t0:t0 + n], sc, per_channel)[0].contiguous()

    for i, n in enumerate(lens):
        if n == 0:
            continue  # attends to nothing: a zero row, as on CUDA
        qi = q[i].float().reshape(hkv, hq // hkv, d)
        starts = range(0, n, _CPU_CHUNK)
        scores = torch.cat([torch.bmm(qi, chunk(k_cache, k_scales, channel, i, t0, min(_CPU_CHUNK, n - t0)).transpose(1, 2))
                            for t0 in starts], dim=-1)
        p = torch.softmax(scores.mul_(sm_scale), dim=-1)                                   # [Hkv, group, n]
        acc = torch.zeros(hkv, hq // hkv, d)
        for t0 in starts:
            m = min(_CPU_CHUNK, n - t0)
            acc.baddbmm_(p[:, :, t0:t0 + m], chunk(v_cache, v_scales, False, i, t0, m))
        out[i] = acc.reshape(hq, d)
    return out.to(q.dtype)


__all__ = ["BITS", "CUDA_GROUPS", "DEFAULT_GROUP", "append", "check_bits", "check_device", "check_inputs", "decode_attention",
           "dequantize", "shapes"]
