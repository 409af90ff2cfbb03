"""KV-cache formats compared on the same data (issue 6): the paper's INT8 per-channel and the
formats the KV-quantization literature uses instead, each a quantize -> dequantize roundtrip.

    fmt = get_format("int8_group64")
    x_hat = fmt.roundtrip(x)                 # x: [..., T, D] fp32/fp16/bf16 -> same shape and dtype
    fmt.bytes_per_element(T, D)              # storage of one [T, D] matrix per element, scales included

Every [T, D] matrix (the trailing two dimensions; T tokens, D head dimension) is quantized on its
own, so a batch of heads [B, H, T, D] goes through in one call. The INT8 formats go through the
public API (``kvpack.quantize`` / ``kvpack.dequantize``, the tensor's device default variant:
``cpu_torch`` on CPU), so they share its arithmetic: scale = fp32(absmax / 127), round half to even,
clamp to [-127, 127], fp32 reconstruction cast to the input dtype.

FORMATS (8-bit payload each; bytes per element = 1 + fp32 scales / elements):

  int8_channel         one scale per channel (column) over all T tokens: the paper's.  1 + 4/T
  int8_token           one scale per token (row) over the D channels.                  1 + 4/D
  int8_group64         one scale per (group of 64 consecutive tokens, channel), as KIVI
                       quantizes keys (arXiv 2402.02750). A last partial group gets its own
                       scale. ``int8_group{G}`` works for any G (get_format).          1 + 4 ceil(T/G)/T
  fp8_e4m3             one per-tensor scale amax / 448, x / scale cast to float8_e4m3fn and
                       back (3 mantissa bits: relative error <= 2^-4 in the normal range). 1 + 4/(T D)
  int8_token_hadamard  per-token INT8 after an orthogonal rotation of the head dimension by the
                       normalized Walsh-Hadamard matrix (QuaRot, arXiv 2404.00456): x -> x H,
                       quantize per token, dequantize, -> x_hat H^T. For D not a power of two the
                       rotation is block-diagonal, blocks of the largest power of two dividing D
                       (D=96: three 32x32 blocks; odd D: no rotation). Rotation in fp32.  1 + 4/D

INT4 formats (issue 17; half a byte per value, kvpack/torch_impl.py's arithmetic, fp32 metadata):

  int4_token_g{G}       symmetric, one scale absmax / 7 per group of G consecutive channels of a
                        token (G = 32, 64, 128; a G past D is D).                       0.5 + 4/G
  int4_token_g{G}_asym  asymmetric, (scale = (max - min) / 15, min) per group.           0.5 + 8/G
  int4_channel          symmetric, one scale per channel over all T tokens (KIVI's keys). 0.5 + 4/T
  int4_channel_asym     asymmetric per channel.                                           0.5 + 8/T

Two key transforms before the token groups, by name through get_format (not in FORMATS; the INT4
study, tools/int4_study.py, compares them), each exact on q . k when the query gets its inverse:

  int4_token_g{G}_hadamard  int4_token_g{G} of x H, then x_hat H^T (the rotation of
                            int8_token_hadamard): outlier channels spread over the row.   0.5 + 4/G
  int4_token_g{G}_smooth    int4_token_g{G} of x / s, then x_hat s, with one factor per channel
                            s_d = sqrt(max_t |x[t, d]|) (SmoothQuant's migration, alpha = 1/2,
                            arXiv 2211.10438; the query takes q s): a large channel is shrunk
                            before it shares a group.                         0.5 + 4/G + 4/T

``identity`` (not in FORMATS) returns its input unchanged: the unquantized baseline, stored at
the input's own element size.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import ops, torch_impl

SCALE_BYTES = 4  # fp32 scales, as kvpack.quantize returns them
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
DEFAULT_GROUP = 64


# --- the roundtrips -------------------------------------------------------------------------------

def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., T, D] (at least 2-D), got shape {tuple(x.shape)}")
    if x.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x.reshape(-1, x.shape[-2], x.shape[-1])  # [B, T, D]


def _int8_2d(x2d: torch.Tensor, granularity: str, dtype) -> torch.Tensor:
    q, s = ops.quantize(x2d, granularity=granularity)
    return ops.dequantize(q, s, granularity=granularity, dtype=dtype)


def int8_token_groups(x: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """INT8 with one scale per (group of ``group`` consecutive tokens, channel) of each [T, D] matrix.

    ``group=None`` (or >= T) is per-channel. The groups become the columns of one 2-D matrix,
    quantized per channel by kvpack.quantize; zero padding of a last partial group changes no scale.
    """
    xb = _as_batch(x)
    B, T, D = xb.shape
    G = T if group is None or group >= T else int(group)
    n = -(-T // G)
    if n * G != T:
        xb = torch.nn.functional.pad(xb, (0, 0, 0, n * G - T))
    cols = xb.reshape(B, n, G, D).permute(2, 0, 1, 3).reshape(G, B * n * D)  # column = (b, group, channel)
    y = _int8_2d(cols, "channel", x.dtype)
    y = y.reshape(G, B, n, D).permute(1, 2, 0, 3).reshape(B, n * G, D)[:, :T]
    return y.reshape(x.shape)


def int8_channel(x: torch.Tensor) -> torch.Tensor:
    """INT8 per channel (the paper's): one scale per column of each [T, D] matrix."""
    return int8_token_groups(x, None)


def int8_token(x: torch.Tensor) -> torch.Tensor:
    """INT8 per token: one scale per row of each [T, D] matrix."""
    xb = _as_batch(x)
    return _int8_2d(xb.reshape(-1, xb.shape[-1]), "token", x.dtype).reshape(x.shape)


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 with one fp32 scale per [T, D] matrix: scale = amax / 448, fp8(x / scale) * scale."""
    xb = _as_batch(x).float()
    scale = torch.amax(torch.abs(xb), dim=(1, 2), keepdim=True) / FP8_MAX
    safe = torch.where(scale == 0, 1.0, scale)
    # x / scale can round a hair above 448; the clamp keeps the cast on the finite range
    code = torch.clamp(xb / safe, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    y = torch.where(scale == 0, 0.0, code.float() * scale)
    return y.to(x.dtype).reshape(x.shape)


def int4_token_groups(x: torch.Tensor, group: int, symmetric: bool = True) -> torch.Tensor:
    """INT4 per (token, group of ``group`` consecutive channels) of each [T, D] matrix, roundtripped."""
    xb = _as_batch(x)
    g = min(int(group), xb.shape[-1])
    nib, scale, lo = torch_impl.int4_quantize_groups(xb, g, symmetric)
    return torch_impl.int4_dequantize_groups(nib, scale, lo, x.dtype).reshape(x.shape)


def int4_channel(x: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """INT4 per channel over all T tokens of each [T, D] matrix (KIVI's grouping for keys), roundtripped."""
    xb = _as_batch(x)
    t = xb.transpose(1, 2)  # [B, D, T]: a channel's T values are one group
    nib, scale, lo = torch_impl.int4_quantize_groups(t, t.shape[-1], symmetric)
    return torch_impl.int4_dequantize_groups(nib, scale, lo, x.dtype).transpose(1, 2).reshape(x.shape)


def int4_token_groups_hadamard(x: torch.Tensor, group: int) -> torch.Tensor:
    """int4_token_groups of x H (H: :func:`hadamard_matrix`), then the inverse rotation."""
    xb = _as_batch(x)
    h = hadamard_matrix(xb.shape[-1], x.device)
    y = int4_token_groups(xb.float() @ h, group) @ h.T
    return y.to(x.dtype).reshape(x.shape)


def smoothing_factors(x: torch.Tensor) -> torch.Tensor:
    """Per channel of each [T, D] matrix, sqrt(max_t |x[t, d]|) ([..., 1, D]; 1 for an all-zero channel)."""
    a = x.float().abs().amax(dim=-2, keepdim=True)
    return torch.where(a > 0, a.sqrt(), torch.ones_like(a))


def int4_token_groups_smooth(x: torch.Tensor, group: int) -> torch.Tensor:
    """int4_token_groups of x / s (s: :func:`smoothing_factors`), times s."""
    xb = _as_batch(x).float()
    s = smoothing_factors(xb)
    y = int4_token_groups(xb / s, group) * s
    return y.to(x.dtype).reshape(x.shape)


def hadamard_block_size(D: int) -> int:
    """The block of the rotation: the largest power of two dividing D (D itself when a power of two)."""
    return D & -D


@functools.lru_cache(maxsize=32)
def _hadamard_cpu(D: int) -> torch.Tensor:
    n = hadamard_block_size(D)
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(n)
    return torch.block_diag(*([h] * (D // n))).float()


def hadamard_matrix(D: int, device="cpu") -> torch.Tensor:
    """The normalized (orthogonal, symmetric) block Walsh-Hadamard matrix [D, D] in fp32."""
    return _hadamard_cpu(int(D)).to(device)


def int8_token_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Per-token INT8 of x H (H: :func:`hadamard_matrix`), then the inverse rotation (H^T = H^-1)."""
    xb = _as_batch(x)
    D = xb.shape[-1]
    h = hadamard_matrix(D, x.device)
    rot = (xb.float().reshape(-1, D) @ h)
    y = _int8_2d(rot, "token", torch.float32) @ h.T
    return y.to(x.dtype).reshape(x.shape)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# --- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """A KV format: ``roundtrip(x) -> x_hat`` and its storage per element (scales included)."""

    name: str
    description: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    scale_count: Callable[[int, int], int] = field(repr=False)  # fp32 scales per [T, D] matrix
    payload_bytes: float | None = 1.0  # None: the input's own element size (identity)
    granularity: str = ""
    meta_per_scale: int = 1  # fp32 values stored per scale (2: an asymmetric format's scale and min)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def bytes_per_element(self, T: int, D: int, dtype=torch.float16) -> float:
        """Bytes per stored element of one [T, D] matrix: payload + fp32 scales / (T D).

        ``dtype`` matters only for ``identity`` (the unquantized cache, default fp16)."""
        payload = torch.empty((), dtype=dtype).element_size() if self.payload_bytes is None else self.payload_bytes
        return payload + SCALE_BYTES * self.meta_per_scale * self.scale_count(T, D) / (T * D)

    def bits_per_element(self, T: int, D: int, dtype=torch.float16) -> float:
        return 8.0 * self.bytes_per_element(T, D, dtype)


def group_format(G: int) -> Format:
    if int(G) != G or G < 1:
        raise ValueError(f"group size must be a positive integer, got {G}")
    G = int(G)
    return Format(f"int8_group{G}", f"INT8, one scale per (group of {G} tokens, channel), as KIVI for keys",
                  functools.partial(int8_token_groups, group=G), lambda T, D: -(-T // G) * D, 1.0, f"group{G}")


def int4_format(name: str) -> Format | None:
    """An INT4 format by name (int4_token_g{G}[_asym], int4_channel[_asym]), or None."""
    m = re.fullmatch(r"int4_token_g(\d+)(_asym)?", str(name))
    if m:
        G, sym = int(m.group(1)), m.group(2) is None
        if G < 2 or G % 2:
            raise ValueError(f"INT4 group size must be a positive even integer, got {G}")
        kind = "symmetric" if sym else "asymmetric (scale, min)"
        return Format(name, f"INT4 {kind}, one group per {G} channels of a token",
                      functools.partial(int4_token_groups, group=G, symmetric=sym),
                      lambda T, D, G=G: T * -(-D // min(G, D)), 0.5, f"token_g{G}", 1 if sym else 2)
    m = re.fullmatch(r"int4_token_g(\d+)_(hadamard|smooth)", str(name))
    if m:
        G, how = int(m.group(1)), m.group(2)
        if G < 2 or G % 2:
            raise ValueError(f"INT4 group size must be a positive even integer, got {G}")
        if how == "hadamard":
            return Format(name, f"INT4 symmetric, groups of {G} channels, after a Walsh-Hadamard rotation",
                          functools.partial(int4_token_groups_hadamard, group=G),
                          lambda T, D, G=G: T * -(-D // min(G, D)), 0.5, f"token_g{G}")
        return Format(name, f"INT4 symmetric, groups of {G} channels, channels smoothed by sqrt(absmax)",
                      functools.partial(int4_token_groups_smooth, group=G),
                      lambda T, D, G=G: T * -(-D // min(G, D)) + D, 0.5, f"token_g{G}")
    m = re.fullmatch(r"int4_channel(_asym)?", str(name))
    if m:
        sym = m.group(1) is None
        kind = "symmetric" if sym else "asymmetric (scale, min)"
        return Format(name, f"INT4 {kind}, one group per channel over all tokens (KIVI's keys)",
                      functools.partial(int4_channel, symmetric=sym), lambda T, D: D, 0.5, "channel", 1 if sym else 2)
    return None


INT4_FORMATS = tuple(f"int4_token_g{G}{a}" for G in (32, 64, 128) for a in ("", "_asym")) + ("int4_channel",
                                                                                            "int4_channel_asym")

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("int8_channel", "INT8, one scale per channel (the paper's)", int8_channel, lambda T, D: D, 1.0, "channel"),
        Format("int8_token", "INT8, one scale per token", int8_token, lambda T, D: T, 1.0, "token"),
        group_format(DEFAULT_GROUP),
        Format("fp8_e4m3", "FP8 e4m3 with one per-tensor scale amax/448", fp8_e4m3, lambda T, D: 1, 1.0, "tensor"),
        Format("int8_token_hadamard", "INT8 per token after a Walsh-Hadamard rotation of the head dimension",
               int8_token_hadamard, lambda T, D: T, 1.0, "token"),
        *(int4_format(n) for n in INT4_FORMATS),
    )
}
IDENTITY = Format("identity", "unquantized (the input itself)", identity, lambda T, D: 0, None, "none")
PAPER_FORMAT = "int8_channel"


def get_format(name) -> Format:
    """A Format by name: FORMATS, 'identity', or 'int8_group{G}' for any group size G."""
    if isinstance(name, Format):
        return name
    if name in FORMATS:
        return FORMATS[name]
    if name == "identity":
        return IDENTITY
    m = re.fullmatch(r"int8_group(\d+)", str(name))
    if m:
        return group_format(int(m.group(1)))
    fmt = int4_format(name)
    if fmt is not None:
        return fmt
    raise ValueError(f"unknown format {name!r}; known: {sorted(FORMATS)} + 'identity' + 'int8_group<G>' + "
                     "'int4_token_g<G>[_asym|_hadamard|_smooth]'")


# --- the study: every format on the same data -----------------------------------------------------

ROLES = ("key", "value", "both")  # which of K, V is quantized (the other stays exact)
DEFAULT_DISTRIBUTIONS = ("uniform", "gaussian", "student_t", "outlier_keys")
DEFAULT_DS = (64, 128, 256)
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
STUDY_DEFAULTS = {"T": 2048, "n_queries": 32, "topk": 8, "seed": 0}
# "Equal bytes": formats at most 8 + 1 bits per element (one fp32 scale per 32 values: per-token
# INT8 at D=32, MiniLM's head dimension; KIVI's group of 32) compete; every default format fits.
BYTES_BUDGET = 1.125
WIN_METRIC = "output_rel_error"


def _rel_l2(pairs) -> tuple[float, float]:
    """Relative L2 error and max-abs error of several (x, x_hat) pairs taken together."""
    from . import metrics

    err2 = sum(metrics.l2_error(x, y) ** 2 for x, y in pairs)
    ref2 = sum(float(torch.sum(torch.square(x.double()))) for x, _ in pairs)
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else 0.0
    return rel, max(metrics.max_abs_error(x, y) for x, y in pairs)


def format_rows(K: torch.Tensor, V: torch.Tensor, q: torch.Tensor, formats, topk: int = 8,
                paper_query: torch.Tensor | None = None) -> list[dict]:
    """One row per format x role: every attention metric of quantizing K, V, or both (float64).

    ``surrogate_score_error`` is the paper's surrogate with the paper's one query (uniform in
    [-1, 1], kvpack.study.workloads.query) unless ``paper_query`` gives another, on the quantized tensor
    (K for the roles key and both, V for value).
    """
    from . import attention_error, workloads

    T, D = K.shape
    dtype = K.dtype
    if paper_query is None:
        paper_query = workloads.query(D, device=K.device)
    pq = paper_query.reshape(1, D)
    K, V, q = K.double(), V.double(), q.double()  # widened once (exact); every metric works in float64
    rows = []
    for name in formats:
        fmt = get_format(name)
        K_hat, V_hat = fmt.roundtrip(K.to(dtype)).double(), fmt.roundtrip(V.to(dtype)).double()
        for role in ROLES:
            kh = K_hat if role in ("key", "both") else None
            vh = V_hat if role in ("value", "both") else None
            pairs = [(K, K_hat)] * (kh is not None) + [(V, V_hat)] * (vh is not None)
            rel, mx = _rel_l2(pairs)
            surrogate_x, surrogate_hat = (V, V_hat) if role == "value" else (K, K_hat)
            rows.append({
                "format": fmt.name, "role": role, "granularity": fmt.granularity,
                "bytes_per_element": fmt.bytes_per_element(T, D, dtype),
                **attention_error.attention_errors(q, K, V, kh, vh, k=topk),
                "surrogate_score_error": attention_error.surrogate_score_error(surrogate_x, surrogate_hat, pq),
                "rel_l2_error": rel, "max_abs_error": mx,
            })
    return rows


def compare_formats(distributions=DEFAULT_DISTRIBUTIONS, formats=tuple(FORMATS), Ds=DEFAULT_DS, T: int = 2048,
                    dtypes=DEFAULT_DTYPES, seed: int = 0, *, n_queries: int = 32, topk: int = 8,
                    device="cpu"):
    """The format study: one row per distribution x format x D x dtype x role (key, value, both).

    Per (distribution, D, dtype): K from ``seed``, V from ``seed + 1`` (same distribution),
    ``n_queries`` fp32 queries from ``seed + 2`` (kvpack.study.workloads.queries: the same family).
    Columns: the settings, ``bytes_per_element`` and every metric of :func:`format_rows`.
    """
    import pandas as pd

    from . import workloads

    out = []
    for dist in distributions:
        for D in Ds:
            q = workloads.queries(dist, n_queries, D, seed=seed + 2, device=device)
            for dtype in dtypes:
                K = workloads.generate(dist, T, D, seed=seed, dtype=dtype, device=device)
                V = workloads.generate(dist, T, D, seed=seed + 1, dtype=dtype, device=device)
                for r in format_rows(K, V, q, formats, topk):
                    out.append({"distribution": dist, "T": T, "D": int(D), "dtype": str(dtype), "seed": seed,
                                "n_queries": n_queries, "topk": topk, **r})
    return pd.DataFrame(out)


def _geomean(s) -> float:
    import numpy as np

    v = np.asarray(s, dtype=np.float64)
    return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300))))) if len(v) else math.nan


def format_winners(df, metric: str = WIN_METRIC, max_bytes_per_element: float = BYTES_BUDGET):
    """Which format wins for keys and which for values: the lowest ``metric`` (geometric mean over
    D and dtype, and over distributions for the 'all' row) among formats within the byte budget.

    One row per role (key, value) x distribution (each, then 'all'): winner, runner-up, the paper's
    INT8 per-channel and how many times its error the winner's is (``paper_over_winner``).
    """
    import pandas as pd

    rows = []
    df = df[df["role"].isin(["key", "value"])]
    fits = df.groupby("format")["bytes_per_element"].max() <= max_bytes_per_element + 1e-12
    excluded = sorted(fits.index[~fits])
    for role in ("key", "value"):
        sub = df[(df["role"] == role) & df["format"].isin(fits.index[fits])]
        for dist in [*sub["distribution"].unique(), "all"]:
            cell = sub if dist == "all" else sub[sub["distribution"] == dist]
            if cell.empty:
                continue
            agg = cell.groupby("format").agg(err=(metric, _geomean), bpe=("bytes_per_element", "max")).sort_values("err")
            paper = agg["err"].get(PAPER_FORMAT, math.nan)
            w = agg.index[0]
            rows.append({
                "role": role, "distribution": dist, "metric": metric,
                "winner": w, f"winner_{metric}": agg["err"].iloc[0], "winner_bytes_per_element": agg["bpe"].iloc[0],
                "runner_up": agg.index[1] if len(agg) > 1 else "",
                f"runner_up_{metric}": agg["err"].iloc[1] if len(agg) > 1 else math.nan,
                f"{PAPER_FORMAT}_{metric}": paper,
                "paper_over_winner": paper / agg["err"].iloc[0] if agg["err"].iloc[0] > 0 else math.nan,
                "ranking": " < ".join(agg.index),
                "formats_over_budget": ", ".join(excluded),
            })
    return pd.DataFrame(rows)


def format_summary(df, metric: str = WIN_METRIC):
    """The format-by-distribution table: geometric mean of ``metric`` over D and dtype, per role,
    one column per format (rows: role, distribution)."""
    sub = df[df["role"].isin(["key", "value", "both"])]
    t = sub.groupby(["role", "distribution", "format"])[metric].agg(_geomean).unstack("format")
    order = [f for f in [*FORMATS, *sorted(set(t.columns) - set(FORMATS))] if f in t.columns]
    return t[order].reset_index()


# --- workflow jobs, tables and the report's summary -----------------------------------------------

# The workflow's config block (config key ``accuracy_study``); every key has this default.
STUDY_CONFIG_DEFAULTS = {
    "formats": True,  # run the synthetic format study
    "real_model": False,  # run the real-model study (needs the [model] extra)
    "distributions": list(DEFAULT_DISTRIBUTIONS),
    "format_names": list(FORMATS),
    "Ds": list(DEFAULT_DS),
    "T": 2048,
    "dtypes": list(DEFAULT_DTYPES),
    "n_queries": 32,
    "topk": 8,
    "seed": None,  # None: the run's seed
    "bytes_budget": BYTES_BUDGET,
    "real_model_max_sentences": None,  # None: the whole corpus
    "real_model_attention_sentences": 128,
}

FORMATS_TABLE_NAMES = ("formats", "formats_summary", "formats_winners")
PROVENANCE_COLUMNS = ("device_slug", "device_name", "torch", "git_commit", "date")


def study_settings(config: dict) -> dict:
    """The accuracy_study block of a workflow config, defaults filled (seed: the run's seed)."""
    s = {**STUDY_CONFIG_DEFAULTS, **(config.get("accuracy_study") or {})}
    if s["seed"] is None:
        s["seed"] = int(config.get("seed", 0))
    unknown = set(s) - set(STUDY_CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"accuracy_study: unknown keys {sorted(unknown)}; known: {sorted(STUDY_CONFIG_DEFAULTS)}")
    for name in s["format_names"]:
        get_format(name)  # fails early, with the known names
    return s


def run_formats_job(distribution: str, settings: dict, provenance: dict) -> dict:
    """One raw record (kind 'formats'): the study of every format on one distribution, on the CPU."""
    s = {**STUDY_CONFIG_DEFAULTS, **settings}
    df = compare_formats([distribution], s["format_names"], s["Ds"], int(s["T"]), s["dtypes"], int(s["seed"] or 0),
                         n_queries=int(s["n_queries"]), topk=int(s["topk"]), device="cpu")
    return {"kind": "formats",
            "workload": {"distribution": distribution, "T": int(s["T"]), "Ds": list(s["Ds"]),
                         "dtypes": list(s["dtypes"]), "seed": int(s["seed"] or 0)},
            "provenance": provenance, "settings": s, "rows": df.to_dict(orient="records")}


def formats_table(record_paths):
    """Every row of the formats records, with the provenance of its record."""
    import pandas as pd

    from . import records

    frames = []
    for p in sorted(map(str, record_paths)):
        r = records.read_record(p)
        df = pd.DataFrame(r["rows"])
        for c in PROVENANCE_COLUMNS:
            df[c] = r["provenance"].get(c)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_formats_tables(record_paths, outdir, bytes_budget: float = BYTES_BUDGET) -> dict:
    """formats.csv (every row), formats_summary.csv (format x distribution) and formats_winners.csv."""
    df = formats_table(record_paths)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tables = {"formats": df, "formats_summary": format_summary(df),
              "formats_winners": format_winners(df, max_bytes_per_element=bytes_budget)}
    paths = {}
    for name, t in tables.items():
        paths[name] = outdir / f"{name}.csv"
        t.to_csv(paths[name], index=False)
    return paths


# The verdict on the paper's "minimal impact on downstream model behavior", from the real model:
# INT8 per-channel must keep the sentence embeddings at cosine >= 0.99 on average (a 1% change of
# direction, well inside the gap between related and unrelated sentences for this model) AND leave
# the nearest neighbour of >= 95% of the sentences unchanged (retrieval, the model's use).
VERDICT_THRESHOLDS = {"mean_cosine": 0.99, "top1_agreement": 0.95}
CLAIM = "INT8 per-channel KV quantization has minimal impact on downstream model behavior"


def _read_csv(path):
    import pandas as pd

    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return None
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        return None
    if "skip_reason" in df:
        df["skip_reason"] = df["skip_reason"].astype(object).where(df["skip_reason"].notna(), "")
    return df


def realmodel_verdict(realmodel, thresholds=VERDICT_THRESHOLDS) -> dict:
    """'reproduced' / 'not reproduced' / 'not tested' for the paper's downstream claim, with numbers."""
    base = {"claim": CLAIM, "thresholds": dict(thresholds), "format": PAPER_FORMAT}
    if realmodel is None or realmodel.empty:
        return {**base, "verdict": "not tested", "reason": "the real-model study did not run "
                "(accuracy_study.real_model is false, or its tables are missing)"}
    row = realmodel[realmodel["format"] == PAPER_FORMAT] if "format" in realmodel else realmodel.iloc[:0]
    if row.empty or row.iloc[0].get("status", "ok") != "ok":
        skipped = realmodel[realmodel["status"] != "ok"] if "status" in realmodel else realmodel.iloc[:0]
        reason = (row.iloc[0]["skip_reason"] if not row.empty else
                  skipped.iloc[0]["skip_reason"] if not skipped.empty else f"no {PAPER_FORMAT} row in the table")
        return {**base, "verdict": "not tested", "reason": reason}
    r = row.iloc[0]
    numbers = {k: float(r[k]) for k in thresholds}
    passed = all(numbers[k] >= v for k, v in thresholds.items())
    text = (f"{PAPER_FORMAT} on {r['model']} ({int(r['sentences'])} sentences, K and V of all "
            f"{int(r['layers'])} layers quantized): mean cosine {numbers['mean_cosine']:.5f} "
            f"(>= {thresholds['mean_cosine']}), top-1 retrieval agreement {numbers['top1_agreement']:.3f} "
            f"(>= {thresholds['top1_agreement']})")
    return {**base, "verdict": "reproduced" if passed else "not reproduced", "numbers": numbers, "text": text}


def report_summary(tables_dir) -> dict:
    """What the report shows of the accuracy study, from the CSVs in ``tables_dir``.

    Keys: ``formats_summary`` (format x distribution, geometric-mean attention-output relative
    error per role), ``winners`` (the full winners table), ``key_winner`` / ``value_winner`` (the
    'all distributions' rows as dicts), ``realmodel``, ``realmodel_stats``, ``realmodel_attention``
    (mean over layers per format x role), ``verdict`` (:func:`realmodel_verdict`) and ``notes``
    (what was skipped, and why). Missing tables give None and a note.
    """
    d = Path(tables_dir)
    t = {n: _read_csv(d / f"{n}.csv") for n in (*FORMATS_TABLE_NAMES, "realmodel", "realmodel_stats",
                                                 "realmodel_attention")}
    notes = []
    winners = t["formats_winners"]
    picks = {}
    if winners is None or winners.empty:
        notes.append("format study: no tables (accuracy_study.formats is false, or the rule has not run)")
    else:
        for role in ("key", "value"):
            w = winners[(winners["role"] == role) & (winners["distribution"] == "all")]
            picks[role] = w.iloc[0].to_dict() if not w.empty else None
    rm = t["realmodel"]
    if rm is not None and "status" in rm and (rm["status"] != "ok").any():
        notes.append("real model skipped: " + str(rm.loc[rm["status"] != "ok", "skip_reason"].iloc[0]))
        rm_ok = None
    else:
        rm_ok = rm
    if rm is None:
        notes.append("real model: no tables (accuracy_study.real_model is false, or the rule has not run)")
    att = t["realmodel_attention"]
    att_summary = None
    if att is not None and "format" in att:
        att_summary = att.groupby(["format", "role"], sort=False).mean(numeric_only=True).drop(
            columns=["layer"], errors="ignore").reset_index()
    return {
        "formats_summary": t["formats_summary"],
        "winners": winners,
        "key_winner": picks.get("key"),
        "value_winner": picks.get("value"),
        "realmodel": rm_ok,
        "realmodel_stats": t["realmodel_stats"] if rm_ok is not None else None,
        "realmodel_attention": att_summary if rm_ok is not None else None,
        "verdict": realmodel_verdict(rm),
        "notes": notes,
    }
