"""What an INT8 KV cache costs, or saves, per decode step.

One decode step reads the whole KV cache once: one query token per sequence attends over the T
tokens cached for it. Three ways to run it, measured side by side in one job on one warm GPU:

* ``sdpa_<backend>``: fp16 ``scaled_dot_product_attention`` over the fp16 cache, once per SDPA
  backend that runs the shape (flash, cuDNN, efficient; grouped-query attention through
  ``enable_gqa``), each timed; the fastest of them (``sdpa_best``) is the baseline every ratio uses,
  since torch's default choice is not always the fastest;
* ``dequant_sdpa``: the paper's path: dequantize the int8 cache to fp16 with our ``fast`` kernel,
  then the fastest SDPA backend (today's "negligible overhead" claim);
* ``fused``: ``kvpack.decode_attention``, fused attention over the int8 cache (kernels/decode_attention.cu);
* ``paged_p<P>``: ``kvpack.paged_decode_attention`` over a paged copy of the same int8 cache (pages
  of P tokens in a shuffled order, block tables per sequence), one row per page size;
* ``int4``: ``kvpack.decode_attention(bits=4)``, fused attention over an INT4 cache of the same
  K and V (packed nibbles, a scale per ``int4_group`` channels of a token; kernels/decode_int4.cu).

Each row also carries the byte bounds: the bytes each fused kernel must read (int8 or packed int4 K
and V and their scales) at the device-to-device copy bandwidth measured in the same job.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from .. import ops
from ..cache import KVCache
from ..decode_attention import decode_attention
from . import bench

SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def _uniform(shape, dtype, device, gen) -> torch.Tensor:
    """Seeded uniform [-1, 1) values made in place in ``dtype`` (no fp32 temporary of a 60 GB cache)."""
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-1.0, 1.0, generator=gen)


def decode_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, granularity: str = "token",
                 int4_group: int = 32) -> dict:
    """Bytes one decode step must read: the fp16 cache, the int8 cache with its fp32 scales, and the
    INT4 cache (packed nibbles, an fp32 scale per ``int4_group`` channels of a token; keys per channel
    with granularity "channel")."""
    elems = batch * kv_heads * tokens * head_dim
    scales = batch * kv_heads * (tokens if granularity == "token" else head_dim)
    groups = batch * kv_heads * tokens * (head_dim // int4_group)
    k4_scales = groups if granularity == "token" else batch * kv_heads * head_dim
    return {"cache_fp16_bytes": 2 * elems * 2, "cache_int8_bytes": 2 * elems + 2 * 4 * scales,
            "cache_int4_bytes": elems + 4 * (groups + k4_scales)}


def decode_point(T: int, batch: int = 1, q_heads: int = 32, kv_heads: int = 32, head_dim: int = 128, *,
                 granularity: str = "token", device: str = "cuda", warmup: int = 3, repeats: int = 20,
                 seed: int = 0, copy: dict | None = None, methods=("sdpa", "dequant_sdpa", "fused", "int4"),
                 extra_splits=(), page_sizes=(), int4_group: int = 32) -> dict:
    """Time one decode step three ways at one shape; returns one record row (medians, p10/p90).

    ``extra_splits``: also time the fused kernel with these split counts (rows ``fused_s<n>``), to
    check the planner's choice against its neighbours."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    row = {"T": T, "batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "granularity": granularity, "dtype": "float16",
           **decode_bytes(batch, kv_heads, T, head_dim, granularity, int4_group)}
    if "int4" in methods:
        row["int4_group"] = int4_group
    if copy is not None:
        row["copy_gbps"] = copy["copy_gbps"]
        row["int8_byte_bound_ms"] = row["cache_int8_bytes"] / (copy["copy_gbps"] * 1e6)
        row["int4_byte_bound_ms"] = row["cache_int4_bytes"] / (copy["copy_gbps"] * 1e6)
        row["fp16_byte_bound_ms"] = row["cache_fp16_bytes"] / (copy["copy_gbps"] * 1e6)
    skipped = {}
    timings = {}
    on_gpu = dev.type == "cuda"
    flush = bench._L2Flusher(dev) if on_gpu else None

    def timed(name, fn):
        try:
            warnings.filterwarnings("ignore", message=".*(not used because|require query, key and value|runtime disabled)")
            fn()  # a first call outside the timing: loads, plans, and raises if the backend can't run
            t = (bench.time_cuda(fn, warmup, repeats, flush) if on_gpu
                 else bench.time_cpu(fn, 1, min(repeats, 5))).summary()
        except torch.cuda.OutOfMemoryError as e:
            skipped[name] = f"out of GPU memory: {str(e).splitlines()[0]}"[:200]
            return
        except RuntimeError as e:  # an SDPA backend that does not take this shape
            skipped[name] = str(e).splitlines()[0][:200]
            return
        timings[name] = t

    q = _uniform((batch, q_heads, 1, head_dim), torch.float16, dev, gen)
    k = _uniform((batch, kv_heads, T, head_dim), torch.float16, dev, gen)
    v = _uniform((batch, kv_heads, T, head_dim), torch.float16, dev, gen)
    gqa = {"enable_gqa": True} if q_heads != kv_heads else {}
    cache = KVCache(batch, kv_heads, head_dim, T, granularity=granularity, device=dev, dtype=torch.float16)
    cache.append(k, v)  # the write path: quantized on write
    q3 = q.view(batch, q_heads, head_dim)

    if "sdpa" in methods:
        for backend in SDPA_BACKENDS:
            with _sdpa_backend(backend) if on_gpu else nullcontext():
                timed(f"sdpa_{backend}", lambda: F.scaled_dot_product_attention(q, k, v, **gqa))
    ran = [b for b in SDPA_BACKENDS if f"sdpa_{b}" in timings]
    best = min(ran, key=lambda b: timings[f"sdpa_{b}"]["median_ms"]) if ran else None
    reference = None
    if best is not None:
        with _sdpa_backend(best) if on_gpu else nullcontext():
            reference = F.scaled_dot_product_attention(q, k, v, **gqa).view(batch, q_heads, head_dim)

    if "dequant_sdpa" in methods and best is not None:
        rows2d = batch * kv_heads * T

        def dequant_sdpa():
            kk = ops.dequantize(cache.k_cache.view(rows2d, head_dim), cache.k_scales.view(-1), "fast" if on_gpu
                                else None, "token", torch.float16).view(batch, kv_heads, T, head_dim)
            vv = ops.dequantize(cache.v_cache.view(rows2d, head_dim), cache.v_scales.view(-1), "fast" if on_gpu
                                else None, "token", torch.float16).view(batch, kv_heads, T, head_dim)
            with _sdpa_backend(best) if on_gpu else nullcontext():
                return F.scaled_dot_product_attention(q, kk, vv, **gqa)

        if granularity == "token":
            timed("dequant_sdpa", dequant_sdpa)

    if "fused" in methods:
        lengths = cache.device_lengths

        def fused():
            return decode_attention(q3, cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales, lengths,
                                    granularity=granularity, check_lengths=False)

        timed("fused", fused)
        for n in extra_splits:
            timed(f"fused_s{n}", partial(decode_attention, q3, cache.k_cache, cache.v_cache, cache.k_scales,
                                         cache.v_scales, lengths, granularity=granularity, check_lengths=False,
                                         splits=int(n)))
        if reference is not None and "fused" in timings:
            diff = (fused().float() - reference.float()).abs()
            row["fused_vs_sdpa_max_abs"] = float(diff.max())
        if on_gpu:
            from ..decode_attention import decode_splits

            row["fused_splits"] = decode_splits(q3, cache.k_cache, granularity)
    if "int4" in methods:
        _int4_rows(row, timed, skipped, k, v, q3, granularity, int4_group, reference,
                   page_sizes if "fused" in methods else (), gen)

    if "fused" in methods and page_sizes and "fused" in timings:
        del k, v  # the fp16 cache: room for the paged copy
        fused_out = fused()
        for size in page_sizes:
            _paged_rows(row, timed, cache, q3, granularity, int(size), fused_out, gen, row.get("fused_splits", 0))

    for name, s in timings.items():
        row[f"{name}_median_ms"] = s["median_ms"]
        row[f"{name}_p10_ms"] = s["p10_ms"]
        row[f"{name}_p90_ms"] = s["p90_ms"]
        if name.startswith("paged_p") and "fused" in timings:
            row[f"{name}_vs_fused"] = timings["fused"]["median_ms"] / s["median_ms"]
        if name.startswith("int4_paged_p") and "int4" in timings:
            row[f"{name}_vs_int4"] = timings["int4"]["median_ms"] / s["median_ms"]
    if best is not None:
        base = row[f"sdpa_{best}_median_ms"]
        row["sdpa_best"] = best
        row["sdpa_best_median_ms"] = base
        for name in ("dequant_sdpa", "fused", "int4"):
            if f"{name}_median_ms" in row:
                row[f"{name}_speedup_vs_sdpa"] = base / row[f"{name}_median_ms"]
    if "fused_median_ms" in row and "int8_byte_bound_ms" in row:
        row["fused_fraction_of_int8_bound"] = row["int8_byte_bound_ms"] / row["fused_median_ms"]
    if "int4_median_ms" in row and "int4_byte_bound_ms" in row:
        row["int4_fraction_of_int4_bound"] = row["int4_byte_bound_ms"] / row["int4_median_ms"]
    if "int4_median_ms" in row and "fused_median_ms" in row:
        row["int4_vs_fused"] = row["fused_median_ms"] / row["int4_median_ms"]
    if skipped:
        row["skipped"] = skipped
    row["status"] = "ok" if timings else "skipped"
    return row  # the caller empties the CUDA cache once this frame's tensors are gone


def _int4_rows(row: dict, timed, skipped: dict, k, v, q3, granularity: str, group: int, reference,
               page_sizes=(), gen=None) -> None:
    """Time decode_attention(bits=4) over an INT4 cache of the same K and V (row ``int4``), and record
    its largest difference from fp16 SDPA over the unquantized cache; then the paged INT4 kernel over
    a shuffled paged copy of that cache at each page size (rows ``int4_paged_p<P>``)."""
    batch, kv_heads, t, d = k.shape
    try:
        c4 = KVCache(batch, kv_heads, d, t, granularity=granularity, device=k.device, dtype=torch.float16, bits=4,
                     group_size=group)
        c4.append(k, v)
    except torch.cuda.OutOfMemoryError as e:
        skipped["int4"] = f"out of GPU memory: {str(e).splitlines()[0]}"[:200]
        return

    def int4():
        return decode_attention(q3, c4.k_cache, c4.v_cache, c4.k_scales, c4.v_scales, c4.device_lengths,
                                granularity=granularity, bits=4, group_size=group)

    timed("int4", int4)
    if reference is not None and "int4" not in skipped:
        row["int4_vs_sdpa_max_abs"] = float((int4().float() - reference.float()).abs().max())
    if page_sizes and "int4" not in skipped:
        from ..decode_attention import decode_splits

        # the contiguous kernel's result at an explicit split count, which the paged one then uses
        splits = decode_splits(q3, c4.k_cache, granularity) if q3.is_cuda else 0
        out = decode_attention(q3, c4.k_cache, c4.v_cache, c4.k_scales, c4.v_scales, c4.device_lengths,
                               granularity=granularity, bits=4, group_size=group, splits=splits)
        try:
            for size in page_sizes:
                _paged_rows(row, timed, c4, q3, granularity, int(size), out, gen, splits, "int4")
        except torch.cuda.OutOfMemoryError as e:  # the paged copy
            skipped["int4_paged"] = f"out of GPU memory: {str(e).splitlines()[0]}"[:200]


def paged_copy(cache: KVCache, page_size: int, gen: torch.Generator | None = None, *, shuffle: bool = True) -> dict:
    """The same cache (int8, or INT4: ``cache.bits``) in pages of ``page_size`` tokens (T_max a multiple
    of it): pages ``[B * T_max / P, Hkv, P, row]`` in a shuffled order (``gen``; in token order with
    ``shuffle=False``), token scales in the pages' layout, block tables int32 ``[B, T_max / P]`` and the
    cache's lengths: what paged_decode_attention reads (kvpack/paged.py's layout)."""
    b, hkv, t, _ = cache.k_cache.shape
    if t % page_size:
        raise ValueError(f"T_max = {t} is not a multiple of page_size = {page_size}")
    n = t // page_size
    perm = (torch.randperm(b * n, device=cache.k_cache.device, generator=gen) if shuffle
            else torch.arange(b * n, device=cache.k_cache.device))
    out = {"block_tables": perm.view(b, n).to(torch.int32).contiguous(), "lengths": cache.device_lengths}

    def paged(x):  # [B, Hkv, T_max, ...] -> [B * T_max / P, Hkv, P, ...], pages shuffled
        rest = x.shape[3:]
        x = x.view(b, hkv, n, page_size, *rest).transpose(1, 2).reshape(b * n, hkv, page_size, *rest)
        pages = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (x may be a strided view: B = 1)
        pages[perm] = x
        return pages

    for name in ("k_cache", "v_cache"):
        out[name.replace("cache", "pages")] = paged(getattr(cache, name))
    for name in ("k_scales", "v_scales"):
        per_token = cache.granularity == "token" or (name == "v_scales" and cache.bits == 4)
        # per channel: per sequence, [B, Hkv, D]
        out[name] = paged(getattr(cache, name)) if per_token else getattr(cache, name)
    return out


def _paged_rows(row: dict, timed, cache: KVCache, q3, granularity: str, page_size: int, fused_out, gen,
                splits: int, contiguous: str = "fused") -> None:
    """Time paged_decode_attention over a shuffled paged copy of ``cache``; record whether it gives
    the contiguous kernel's result bit for bit (with the same split count, the same arithmetic).
    Rows ``paged_p<P>`` (INT8; ``..._equals_fused``) or ``int4_paged_p<P>`` (``..._equals_int4``)."""
    from ..paged import paged_decode_attention

    name = f"paged_p{page_size}" if contiguous == "fused" else f"{contiguous}_paged_p{page_size}"
    fmt = {} if cache.bits == 8 else {"bits": 4, "group_size": cache.group_size}
    p = paged_copy(cache, page_size, gen)
    args = (q3, p["k_pages"], p["v_pages"], p["k_scales"], p["v_scales"], p["block_tables"], p["lengths"])
    timed(name, lambda: paged_decode_attention(*args, granularity=granularity, **fmt))
    same = paged_decode_attention(*args, granularity=granularity, splits=int(splits or 0), **fmt)
    row[f"{name}_equals_{contiguous}"] = bool(torch.equal(same, fused_out))


def append_time(batch: int = 32, kv_heads: int = 8, head_dim: int = 128, max_tokens: int = 4096, *,
                granularity: str = "token", device: str = "cuda", warmup: int = 10, repeats: int = 50,
                seed: int = 0) -> dict:
    """One decode step's write: one new token of K and V for every sequence, quantized on write."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cache = KVCache(batch, kv_heads, head_dim, max_tokens, granularity=granularity, device=dev)
    k = _uniform((batch, kv_heads, 1, head_dim), torch.float16, dev, gen)
    v = _uniform((batch, kv_heads, 1, head_dim), torch.float16, dev, gen)
    cache.append(k, v)  # calibrates (channel)
    calls = warmup + repeats + 2
    if cache.max_tokens - cache.lengths.max() < calls:
        raise ValueError(f"max_tokens = {max_tokens} leaves no room for {calls} appends")
    t = (bench.time_cuda(lambda: cache.append(k, v), warmup, repeats) if dev.type == "cuda"
         else bench.time_cpu(lambda: cache.append(k, v), 1, 5)).summary()
    return {"batch": batch, "kv_heads": kv_heads, "head_dim": head_dim, "granularity": granularity,
            "append_median_ms": t["median_ms"], "append_p10_ms": t["p10_ms"], "append_p90_ms": t["p90_ms"]}


GRID_DEFAULTS = {"T": [4096, 32768, 131072], "batch": [1, 8, 32], "heads": [[32, 32], [32, 8]], "head_dim": 128,
                 "extra_head_dims": {"head_dims": [64, 256], "T": 32768, "batch": 8, "heads": [32, 8]}}
APPEND_DEFAULTS = {"batch": 32, "kv_heads": 8, "head_dim": 128}
POINT_KEYS = ("T", "batch", "q_heads", "kv_heads", "head_dim")


def grid_points(settings: dict) -> list[dict]:
    """The decode grid: T x batch x (Hq, Hkv) at the main head dimension, plus extra head dimensions at one shape.

    One dict {T, batch, q_heads, kv_heads, head_dim} per point, in grid order, each point once."""
    s = {**GRID_DEFAULTS, **settings}
    points = []
    for T in s["T"]:
        for batch in s["batch"]:
            for hq, hkv in s["heads"]:
                points.append({"T": int(T), "batch": int(batch), "q_heads": int(hq), "kv_heads": int(hkv),
                               "head_dim": int(s["head_dim"])})
    extra = {**GRID_DEFAULTS["extra_head_dims"], **(s.get("extra_head_dims") or {})}
    for d in extra.get("head_dims", []):
        hq, hkv = extra["heads"]
        points.append({"T": int(extra["T"]), "batch": int(extra["batch"]), "q_heads": int(hq),
                       "kv_heads": int(hkv), "head_dim": int(d)})
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


def point_name(p: dict) -> str:
    """The file stem of one grid point's record: ``T{T}_B{batch}_H{q_heads}x{kv_heads}_D{head_dim}``."""
    return f"T{p['T']}_B{p['batch']}_H{p['q_heads']}x{p['kv_heads']}_D{p['head_dim']}"


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()  # the CPU allocator raises a plain RuntimeError
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def skipped_point_row(p: dict, granularity: str, reason: str) -> dict:
    """The row of a grid point that could not even be set up (its caches do not fit): status 'skipped'."""
    return {**{k: int(p[k]) for k in POINT_KEYS}, "granularity": granularity, "dtype": "float16",
            **decode_bytes(p["batch"], p["kv_heads"], p["T"], p["head_dim"], granularity),
            "status": "skipped", "skip_reason": reason[:300], "skipped": {"all": reason[:300]}}


def measure_copy(settings: dict, device: str) -> dict | None:
    """The device-to-device copy bandwidth of this job (the byte bounds' denominator); None on the CPU."""
    return bench.copy_bandwidth(device, int(settings.get("copy_bytes", 1 << 30))) if device == "cuda" else None


def decode_point_row(p: dict, settings: dict, device: str, copy: dict | None) -> dict:
    """decode_point at one grid point with the job's settings; a point whose caches cannot be allocated
    at all comes back as a skipped row (decode_point itself records a method that runs out of memory)."""
    granularity = settings.get("granularity", "token")
    try:
        row = decode_point(**{k: int(p[k]) for k in POINT_KEYS}, granularity=granularity, device=device,
                           warmup=int(settings.get("warmup", 3)), repeats=int(settings.get("repeats", 20)),
                           seed=int(settings.get("seed", 0)), copy=copy,
                           page_sizes=[int(x) for x in settings.get("page_sizes", [])],
                           int4_group=int(settings.get("int4_group", 32)))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        where = "GPU" if device == "cuda" else "host"
        row = skipped_point_row(p, granularity, f"out of {where} memory: {str(e).splitlines()[0]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    if row.get("status") != "skipped" and row.get("skipped"):
        row.setdefault("skip_reason", "; ".join(f"{k}: {v}" for k, v in row["skipped"].items()))
    return row


def _workload(settings: dict, **shape) -> dict:
    keep = ("granularity", "warmup", "repeats", "seed", "copy_bytes", "page_sizes", "int4_group")
    return {**shape, **{k: settings[k] for k in keep if k in settings}}


def run_decode_point_job(point: dict, settings: dict, device: str, provenance: dict) -> dict:
    """One grid point's record (kind 'decode', docs/records.md): the copy bandwidth measured in this job,
    then the decode step three ways at this shape; one row."""
    copy = measure_copy(settings, device)
    row = decode_point_row(point, settings, device, copy)
    return {"kind": "decode", "workload": _workload(settings, name="decode step", **{k: int(point[k]) for k in POINT_KEYS}),
            "provenance": provenance, "copy": copy, "rows": [row]}


def run_append_job(settings: dict, device: str, provenance: dict) -> dict:
    """The append of one token to every sequence, one launch (kind 'decode_append'); its own small job:
    it times the write path at one shape of its own, whatever the grid's points are."""
    shape = {**APPEND_DEFAULTS, **(settings.get("append_shape") or {})}
    granularity = settings.get("granularity", "token")
    row = {"status": "ok", "skip_reason": "", **append_time(int(shape["batch"]), int(shape["kv_heads"]),
                                                            int(shape["head_dim"]), granularity=granularity,
                                                            device=device)}
    row["append_median_us"] = row["append_median_ms"] * 1e3
    return {"kind": "decode_append", "workload": _workload(settings, name="decode append", **shape),
            "provenance": provenance, "rows": [row]}


def run_decode_job(settings: dict, device: str, provenance: dict) -> dict:
    """Every grid point (settings['points'], or all of grid_points) in one record of kind 'decode', one
    copy measurement for all (a quick look; the workflow writes one record per point instead)."""
    copy = measure_copy(settings, device)
    rows = [decode_point_row(p, settings, device, copy) for p in settings.get("points") or grid_points(settings)]
    out = {"kind": "decode", "workload": {"name": "decode step", **{k: v for k, v in settings.items() if k != "points"}},
           "provenance": provenance, "copy": copy, "rows": rows}
    if device == "cuda" and settings.get("append", True):
        out["append"] = append_time(device=device)
    return out


__all__ = ["APPEND_DEFAULTS", "GRID_DEFAULTS", "SDPA_BACKENDS", "append_time", "decode_bytes", "decode_point",
           "decode_point_row", "grid_points", "measure_copy", "paged_copy", "point_name", "run_append_job", "run_decode_job",
           "run_decode_point_job", "skipped_point_row"]
