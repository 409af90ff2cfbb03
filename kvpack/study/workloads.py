"""Seeded KV-cache data. The paper's data first: K and the query uniform in [-1, 1]; then
distributions closer to real KV caches, for the accuracy study beyond the paper (issue 6).

Every generator takes a seed and draws from its own ``torch.Generator`` on the target device,
so the same (seed, device) gives the same tensor. Values are generated in fp32 and then cast
to the requested dtype (fp16/bf16 rounding of the same fp32 draw). All share the signature
``fn(T, D, seed=0, dtype="float32", device="cpu", **parameters) -> [T, D] tensor``.

DISTRIBUTIONS (name -> generator), with their documented parameters and moments:

  uniform        U[-1, 1): the paper's data. mean 0, variance 1/3, |x| < 1.
  gaussian       N(0, std^2), std=1. mean 0, variance std^2, P(|x| > 3 std) = 0.0027.
  student_t      std * sqrt((nu-2)/nu) * t_nu, nu=3 (integer): heavy-tailed, rescaled to variance
                 std^2 (nu > 2). mean 0, E|x| = std * sqrt((nu-2)/nu) E|t_nu| (= 2 std / pi for
                 nu=3), P(|x| > 5 std) = P(|t_3| > 5 sqrt(3)) = 0.0032 (vs 5.7e-7 for a Gaussian).
  outlier_keys   N(0, std^2) with a handful of outlier channels (columns) scaled by a factor drawn
                 uniform in [10, 50]: n_outliers = max(1, D // 32) channels (4 of D=128), as
                 reported for LLM keys (KIVI, arXiv 2402.02750; KVQuant, arXiv 2401.18079: keys
                 have fixed outlier channels, values do not). The channel layout depends on
                 ``layout_seed`` (default 0), not on ``seed``: every draw of one model-like cache
                 has its outliers in the same channels (:func:`outlier_layout` tells which).

Queries for attention metrics (:func:`queries`) come from the same family with their own seed;
for ``outlier_keys`` they come from its Gaussian base (no outlier channels; see QUERY_FAMILY).
"""

from __future__ import annotations

import math

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


def _check_shape(T: int, D: int) -> None:
    if T <= 0 or D <= 0:
        raise ValueError(f"T and D must be positive, got T={T}, D={D}")


def _normal(shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 1.0, generator=g)


def gaussian(T: int, D: int, seed: int = 0, dtype="float32", device="cpu", std: float = 1.0) -> torch.Tensor:
    """N(0, std^2) entries: mean 0, variance std^2 (the Gaussian picture of activations)."""
    _check_shape(T, D)
    x = _normal((T, D), _generator(seed, device), device) * float(std)
    return x.to(resolve_dtype(dtype))


def student_t_scale(nu: int) -> float:
    """The factor sqrt((nu-2)/nu) that gives a Student-t with nu > 2 degrees of freedom variance 1."""
    if nu <= 2:
        raise ValueError(f"the variance of a Student-t is finite only for nu > 2, got nu={nu}")
    return math.sqrt((nu - 2) / nu)


def student_t_mean_abs(nu: int) -> float:
    """E|t_nu| = 2 sqrt(nu) Gamma((nu+1)/2) / (sqrt(pi) (nu-1) Gamma(nu/2)) (2 sqrt(3)/pi for nu=3)."""
    return 2 * math.sqrt(nu) * math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / (math.sqrt(math.pi) * (nu - 1))


def student_t(T: int, D: int, seed: int = 0, dtype="float32", device="cpu", nu: int = 3, std: float = 1.0) -> torch.Tensor:
    """Heavy-tailed entries: std * sqrt((nu-2)/nu) * t_nu, so mean 0 and variance std^2 (nu > 2).

    t_nu = Z / sqrt(C / nu) with Z standard normal and C chi-square with ``nu`` (an integer)
    degrees of freedom, drawn as a sum of nu squared standard normals: every draw comes from the
    seeded generator. The tails are polynomial, P(|t_nu| > x) ~ x^-nu (nu=3: infinite fourth
    moment), so a few entries are many standard deviations out, as in real activations.
    """
    _check_shape(T, D)
    if int(nu) != nu or nu < 3:
        raise ValueError(f"nu must be an integer >= 3 (finite variance, chi-square as a sum of squares), got {nu}")
    nu = int(nu)
    g = _generator(seed, device)
    z = _normal((T, D), g, device)
    chi2 = torch.zeros((T, D), dtype=torch.float32, device=device)
    for _ in range(nu):
        chi2 += torch.square(_normal((T, D), g, device))
    x = z / torch.sqrt(chi2 / nu) * (student_t_scale(nu) * float(std))
    return x.to(resolve_dtype(dtype))


def outlier_layout(D: int, n_outliers=None, magnitude=(10.0, 50.0), layout_seed: int = 0, device="cpu"):
    """(channels, factors) of :func:`outlier_keys`: which columns are outliers, and their scale factors.

    ``n_outliers`` defaults to max(1, D // 32); the channels are a seeded random choice and the
    factors are uniform in ``magnitude`` (10x to 50x the other channels' std), both from ``layout_seed``.
    """
    n = max(1, D // 32) if n_outliers is None else int(n_outliers)
    if not 0 <= n <= D:
        raise ValueError(f"n_outliers must be in [0, D={D}], got {n}")
    lo, hi = (float(m) for m in magnitude)
    if not 0 < lo <= hi:
        raise ValueError(f"magnitude must be (low, high) with 0 < low <= high, got {magnitude}")
    g = _generator(layout_seed, "cpu")  # on the CPU: the same channels on every device
    channels = torch.randperm(D, generator=g)[:n].sort().values
    factors = torch.empty(n, dtype=torch.float32).uniform_(lo, hi, generator=g)
    return channels.to(device), factors.to(device)


def outlier_keys(T: int, D: int, seed: int = 0, dtype="float32", device="cpu", std: float = 1.0, n_outliers=None,
                 magnitude=(10.0, 50.0), layout_seed: int = 0) -> torch.Tensor:
    """LLM-like keys: N(0, std^2) entries, with a few whole channels (columns) scaled 10-50x.

    Channel c in :func:`outlier_layout` has std ``std * factor_c``; every other channel has std
    ``std``. The layout is fixed by ``layout_seed`` (the same channels for every ``seed``).
    """
    _check_shape(T, D)
    x = _normal((T, D), _generator(seed, device), device) * float(std)
    channels, factors = outlier_layout(D, n_outliers, magnitude, layout_seed, device)
    x[:, channels] *= factors
    return x.to(resolve_dtype(dtype))


DISTRIBUTIONS = {"uniform": uniform, "gaussian": gaussian, "student_t": student_t, "outlier_keys": outlier_keys}

# The distribution the attention queries of a key distribution are drawn from (itself if absent):
# outlier channels are a property of LLM keys; queries with the same 10-50x channels would make
# every score a product of two outliers and every softmax one-hot.
QUERY_FAMILY = {"outlier_keys": "gaussian"}


def generate(distribution: str, T: int, D: int, seed: int = 0, dtype="float32", device="cpu") -> torch.Tensor:
    try:
        fn = DISTRIBUTIONS[distribution]
    except KeyError:
        raise ValueError(f"unknown distribution {distribution!r}; known: {sorted(DISTRIBUTIONS)}") from None
    return fn(T, D, seed=seed, dtype=dtype, device=device)


def queries(distribution: str, n: int, D: int, seed: int = 1, device="cpu") -> torch.Tensor:
    """``n`` fp32 attention queries [n, D] from the family of ``distribution`` (see QUERY_FAMILY)."""
    return generate(QUERY_FAMILY.get(distribution, distribution), n, D, seed=seed, dtype="float32", device=device)
