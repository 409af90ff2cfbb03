"""Seeded KV-cache data. The paper's data first: K and the query uniform in [-1, 1].

Every generator takes a seed and draws from its own ``torch.Generator`` on the target device,
so the same (seed, device) gives the same tensor. Values are generated in fp32 and then cast
to the requested dtype (fp16/bf16 rounding of the same fp32 draw).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise TypeError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise TypeError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}") from None


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def uniform(T: int, D: int, seed: int = 0, dtype="float32", device="cpu", low=-1.0, high=1.0) -> torch.Tensor:
    """The paper's KV data: a [T, D] matrix uniform in [low, high) (default [-1, 1])."""
    if T <= 0 or D <= 0:
        raise ValueError(f"T and D must be positive, got T={T}, D={D}")
    x = torch.empty((T, D), dtype=torch.float32, device=device)
    x.uniform_(low, high, generator=_generator(seed, device))
    return x.to(resolve_dtype(dtype))


def query(D: int, seed: int = 1, device="cpu") -> torch.Tensor:
    """The paper's attention query: one fp32 vector uniform in [-1, 1]."""
    q = torch.empty((D,), dtype=torch.float32, device=device)
    return q.uniform_(-1.0, 1.0, generator=_generator(seed, device))


DISTRIBUTIONS = {"uniform": uniform}


def generate(distribution: str, T: int, D: int, seed: int = 0, dtype="float32", device="cpu") -> torch.Tensor:
    try:
        fn = DISTRIBUTIONS[distribution]
    except KeyError:
        raise ValueError(f"unknown distribution {distribution!r}; known: {sorted(DISTRIBUTIONS)}") from None
    return fn(T, D, seed=seed, dtype=dtype, device=device)
