"""End to end: what kvpack's INT8 cache buys a real model's decode step (transformers, one GPU).

A model of a real shape (``data/models/<name>.json``: Llama-3.1-8B's config) with random bf16
weights: a decode step's time does not depend on the weights' values, only on their shapes, and no
weights can be downloaded here. Each method's cache is filled to context T **directly**, with
random N(0, 1) K/V of the right shape written through the cache's own write path (not by a
prefill: the step's time depends on what the cache holds, not on how it got there), then decode
steps are timed, one new token per sequence, with CUDA events, every method in the same job and
the device-to-device copy bandwidth measured in that job too.

Methods (``METHODS``):

* ``dynamic_sdpa``: transformers' ``DynamicCache`` + SDPA, eager (the default of ``generate()``);
* ``static_sdpa_compiled``: ``StaticCache`` + SDPA under ``torch.compile(mode="reduce-overhead",
  fullgraph=True)``, as ``generate()`` compiles a static cache (transformers' fastest path);
* ``quantized_hqq_int8``, ``quantized_fp8``, ``quantized_quanto_int4``: transformers'
  ``QuantizedCache`` (it dequantizes the whole cache on every step), eager;
* ``fp16_graph``: fp16 done right, the honest baseline: the same hand-captured CUDA graph of the
  step as kvpack's, over a ``StaticCache``, attention by the fastest SDPA backend (flash, cuDNN,
  efficient, each captured and timed) over exactly the T + 1 cached tokens, GQA without copies;
* ``kvpack_{token,channel}_{eager,graph}``: ``kvpack.hf.KVPackCache`` with the "kvpack" backend,
  eager, and as a captured CUDA graph;
* ``kvpack_int4_graph``: the same with ``bits=4`` (packed nibbles, a scale per 32 channels of a
  token; issue 17), captured.

Graph methods replay one captured step at context T (each replay is rewound to T outside the
timed window); eager and compiled methods grow the cache by one token per step (T to T + steps).
Every row carries its byte bound: the weights a step reads (every parameter but the embedding
table, of which it reads one row per sequence) plus the cache's stored bytes, at the copy rate.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import bench
from .decode_step import SDPA_BACKENDS, _is_oom, _sdpa_backend, decode_bytes, measure_copy

MODELS = Path(__file__).resolve().parents[2] / "data" / "models"
GRAPH_METHODS = ("kvpack_token_graph", "kvpack_channel_graph", "fp16_graph", "kvpack_int4_graph")
METHODS = ("kvpack_token_graph", "kvpack_channel_graph", "fp16_graph", "kvpack_int4_graph", "kvpack_token_eager",
           "kvpack_channel_eager",
           "dynamic_sdpa", "quantized_fp8", "quantized_hqq_int8", "quantized_quanto_int4", "static_sdpa_compiled")
DEFAULTS = {"model": "llama-3.1-8b", "dtype": "bfloat16", "T": [4096, 32768], "batch": [1, 8, 32],
            "methods": [m for m in METHODS if m != "quantized_quanto_int4"],
            "capacity_T": [32768], "capacity_methods": list(GRAPH_METHODS), "warmup": 3, "repeats": 20,
            "eager_repeats": 5, "fill_chunk_tokens": 8192, "reserve_bytes": 3 << 30, "seed": 0,
            "copy_bytes": 1 << 30, "compiled_points": [[4096, 1], [32768, 8]], "deadline": None, "points": None}
FP16_ATTN = "kvpack_e2e_fp16_sdpa"  # the fp16 baseline's attention backend (registered by this module)


# --- the model --------------------------------------------------------------------------------------

def load_model_config(name: str):
    """A transformers config from data/models/<name>.json (the architecture of a published model)."""
    import transformers

    path = MODELS / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in MODELS.glob("*.json"))
        raise ValueError(f"e2e.model: no data/models/{name}.json (known: {known})")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return transformers.AutoConfig.for_model(**fields)


def build_model(config, dtype: torch.dtype, device: str, seed: int = 0):
    """The model with random weights, made on the device (no CPU copy of 16 GB), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    return model.eval()


def weights_read_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table, of
    which it reads one row per sequence (the output head is read whole, tied or not)."""
    emb = model.get_input_embeddings().weight
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    tied = model.get_output_embeddings().weight is emb
    return rest + (emb.numel() * emb.element_size() if tied else 0) + batch * emb.shape[1] * emb.element_size()


def model_summary(model) -> dict:
    import kvpack.hf as kh

    shape = kh.model_shape(model.config)
    return {**shape, "params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def cache_bytes(method: str, shape: dict, batch: int, tokens: int) -> int:
    """Bytes a method's cache holds (and a step must read) for ``tokens`` per sequence, every layer."""
    layers, hkv, d = shape["layers"], shape["kv_heads"], shape["head_dim"]
    b = decode_bytes(batch, hkv, tokens, d, "channel" if "channel" in method else "token")
    if method.startswith("kvpack"):
        return layers * b["cache_int4_bytes" if "int4" in method else "cache_int8_bytes"]
    elems = 2 * layers * batch * hkv * tokens * d
    if method in ("quantized_hqq_int8", "quantized_fp8"):
        return elems  # one byte a value (their scales and zero points not counted)
    if method == "quantized_quanto_int4":
        return elems // 2
    return layers * b["cache_fp16_bytes"]


# --- caches and their fill --------------------------------------------------------------------------

def make_cache(method: str, model, batch: int, max_len: int):
    import transformers

    import kvpack.hf as kh

    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    if method.startswith("kvpack"):
        gran = "channel" if "channel" in method else "token"
        return kh.KVPackCache(model.config, batch, max_len, granularity=gran, device=dev, dtype=dtype,
                              bits=4 if "int4" in method else 8)
    if method in ("fp16_graph", "static_sdpa_compiled"):
        cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
        shape = kh.model_shape(model.config)
        cache.early_initialization(batch, shape["kv_heads"], shape["head_dim"], dtype, dev)
        return cache
    if method == "dynamic_sdpa":
        return transformers.DynamicCache(config=model.config)
    backend, nbits = {"quantized_hqq_int8": ("hqq", 8), "quantized_quanto_int4": ("quanto", 4),
                      "quantized_fp8": ("fp8", None)}[method]
    return transformers.QuantizedCache(backend, model.config, **({"nbits": nbits} if nbits else {}))


def fill(method: str, cache, model, batch: int, T: int, gen: torch.Generator, chunk: int) -> None:
    """Write T random N(0, 1) K/V rows per sequence into every layer, through the cache's own write
    path (kvpack: quantized on write; channel scales calibrated on the first chunk). Caches that
    concatenate on every update (Dynamic, Quantized) take the T rows in one update."""
    import kvpack.hf as kh

    shape = kh.model_shape(model.config)
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    step = chunk if method.startswith("kvpack") or method in ("fp16_graph", "static_sdpa_compiled") else T
    for layer in range(shape["layers"]):
        for start in range(0, T, step):
            n = min(step, T - start)
            k = torch.randn(batch, shape["kv_heads"], n, shape["head_dim"], device=dev, dtype=dtype, generator=gen)
            v = torch.randn(batch, shape["kv_heads"], n, shape["head_dim"], device=dev, dtype=dtype, generator=gen)
            if method.startswith("kvpack"):
                cache.layers[layer].write(k, v)
            else:
                cache.update(k, v, layer)
            del k, v


# --- the fp16 baseline's attention ----------------------------------------------------------------

class _Fp16Context:
    """Tokens the fp16 baseline attends over in a decode step (set before capture) and its backend."""

    tokens: int | None = None
    backend: str | None = None


FP16 = _Fp16Context()


def fp16_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """fp16 done right: a decode step attends over exactly the cached tokens (a static slice of the
    StaticCache, no mask), GQA read in place (enable_gqa, no repeated K/V), by the SDPA backend under
    test; anything else is transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or FP16.tokens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k, v = key[:, :, :FP16.tokens], value[:, :, :FP16.tokens]
    gqa = {"enable_gqa": True} if query.shape[1] != k.shape[1] else {}
    with _sdpa_backend(FP16.backend) if FP16.backend else nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scaling, **gqa)
    return out.transpose(1, 2), None


def register_fp16_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FP16_ATTN, fp16_decode_attention)


# --- timing -----------------------------------------------------------------------------------------

def _rewinder(method: str, cache, T: int):
    """Put a filled cache back at context T: before each graph replay (and each warm-up step)."""
    if method.startswith("kvpack"):
        def rewind():
            for layer in cache.layers:
                layer.kv.device_lengths.fill_(T)
                layer.cumulative_length.fill_(T)
                layer.kv._host_lengths = [T] * layer.batch_size
                layer.seen, layer.stale = T, False
    else:
        def rewind():
            for layer in cache.layers:
                layer.cumulative_length.fill_(T)
    return rewind


def _time(fn, warmup: int, repeats: int, before=None, cuda: bool = True) -> dict:
    """CUDA events around each call (bench.time_cuda); ``before`` runs outside the timed window.
    On the CPU (tests of this module), perf_counter."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    if not cuda:
        return bench.time_cpu(fn, 0, repeats).summary()
    return bench.time_cuda(fn, 0, repeats, before).summary()


def _step_inputs(model, batch: int, T: int, gen):
    dev = next(model.parameters()).device
    ids = torch.randint(1, model.config.vocab_size, (batch, 1), device=dev, generator=gen)
    pos = torch.full((batch, 1), T, dtype=torch.long, device=dev)
    return ids, pos


def _graph_step(model, cache, ids, pos, rewind, cache_kw: str):
    """Capture one decode step (after warm-up steps on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            rewind()
            model(input_ids=ids, position_ids=pos, **{cache_kw: cache})
    torch.cuda.current_stream().wait_stream(s)
    rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(input_ids=ids, position_ids=pos, **{cache_kw: cache})
    return graph


def time_method(method: str, model, batch: int, T: int, settings: dict, gen) -> dict:
    """Fill ``method``'s cache to T for ``batch`` sequences and time decode steps; one row's timings."""
    import kvpack.hf as kh

    cache_kw = kh.cache_kwarg()
    dev = next(model.parameters()).device
    graph = method in GRAPH_METHODS
    warmup, repeats = int(settings["warmup"]), int(settings["repeats"])
    if method.endswith("_eager") or method.startswith(("dynamic", "quantized")):
        repeats = int(settings["eager_repeats"])
    attn = "kvpack" if method.startswith("kvpack") else (FP16_ATTN if method == "fp16_graph" else "sdpa")
    model.set_attn_implementation(attn)
    cache = make_cache(method, model, batch, T + (1 if graph else warmup + repeats + 2))
    fill(method, cache, model, batch, T, gen, int(settings["fill_chunk_tokens"]))
    ids, pos = _step_inputs(model, batch, T, gen)
    out: dict = {}
    if dev.type != "cuda" and (graph or method == "static_sdpa_compiled"):
        raise NotImplementedError("CUDA graphs need a CUDA GPU")
    if graph:
        rewind = _rewinder(method, cache, T)
        backends = SDPA_BACKENDS if method == "fp16_graph" else (None,)
        per_backend = {}
        for backend in backends:
            FP16.tokens, FP16.backend = (T + 1, backend) if method == "fp16_graph" else (None, None)
            try:
                g = _graph_step(model, cache, ids, pos, rewind, cache_kw)
                per_backend[backend] = _time(g.replay, warmup, repeats, rewind)
            except RuntimeError as e:  # a backend that does not take the shape
                if _is_oom(e):
                    raise
                out.setdefault("backend_skipped", {})[backend] = str(e).splitlines()[0][:200]
            finally:
                FP16.tokens = FP16.backend = None
        if not per_backend:
            raise RuntimeError(f"no SDPA backend ran: {out.get('backend_skipped')}")
        best = min(per_backend, key=lambda b: per_backend[b]["median_ms"])
        out.update(per_backend[best])
        if method == "fp16_graph":
            out["sdpa_backend"] = best
            out["backend_median_ms"] = {b: t["median_ms"] for b, t in per_backend.items()}
    else:
        fwd = model.forward
        if method == "static_sdpa_compiled":
            t0 = time.perf_counter()
            fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            with torch.no_grad():
                fwd(input_ids=ids, position_ids=pos, **{cache_kw: cache})
                pos.add_(1)
            torch.cuda.synchronize(dev)  # (the compiled path runs on CUDA only)
            out["compile_s"] = time.perf_counter() - t0

        def step():
            with torch.no_grad():
                fwd(input_ids=ids, position_ids=pos, **{cache_kw: cache})
            pos.add_(1)

        out.update(_time(step, warmup, repeats, cuda=dev.type == "cuda"))
    return out  # the cache goes with this frame


def _release() -> None:
    """Drop what a method left on the device: compiled graphs and their CUDA-graph pools, caches."""
    if not torch.cuda.is_available():
        gc.collect()
        return
    torch._dynamo.reset()
    from torch._inductor import cudagraph_trees

    cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache()


def method_row(method: str, model, batch: int, T: int, settings: dict, copy: dict | None, shape: dict) -> dict:
    """One method at one (T, batch): timings, tokens/s, peak memory, bytes and the byte bound; a
    method that does not fit or cannot run here is a skipped row with the reason."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(int(settings["seed"]))
    stored = cache_bytes(method, shape, batch, T)
    weights = weights_read_bytes(model, batch)
    row = {"method": method, "T": T, "batch": batch, "status": "ok", "skip_reason": "", "cache_bytes": stored,
           "weights_read_bytes": weights, "bytes_read": weights + stored,
           "fp16_bytes_read": weights + cache_bytes("fp16_graph", shape, batch, T)}
    if copy:
        row["copy_gbps"] = copy["copy_gbps"]
        row["byte_bound_ms"] = row["bytes_read"] / (copy["copy_gbps"] * 1e6)
        row["fp16_byte_bound_ms"] = row["fp16_bytes_read"] / (copy["copy_gbps"] * 1e6)
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        t = time_method(method, model, batch, T, settings, gen)
    except (torch.cuda.OutOfMemoryError, RuntimeError, ImportError, ValueError, NotImplementedError) as e:
        expected = (not isinstance(e, RuntimeError) or isinstance(e, NotImplementedError) or _is_oom(e)
                    or "no SDPA backend" in str(e))
        if not expected:  # a bug, not a method that cannot run here
            raise
        row.update(status="skipped", skip_reason=f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300])
        _release()
        return row
    finally:
        row["seconds"] = time.perf_counter() - t0
    row["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if on_gpu else None
    for k, v in t.items():
        row[f"step_{k}" if k.endswith("_ms") else k] = v
    row["tokens_per_s"] = batch / (row["step_median_ms"] * 1e-3)
    if copy:
        row["fraction_of_bound"] = row["byte_bound_ms"] / row["step_median_ms"]
    _release()
    return row


def largest_batch(method: str, model, T: int, settings: dict, copy, shape: dict) -> dict:
    """The largest batch at context T that ``method`` runs: predicted from the free memory and the
    cache's bytes per sequence, then confirmed by running it (fewer sequences after an out-of-memory)."""
    _release()
    free, _total = torch.cuda.mem_get_info()
    per_seq = cache_bytes(method, shape, 1, T + 1)
    guess = max(1, int((free - int(settings["reserve_bytes"])) // per_seq))
    tried = []
    batch = guess
    while batch >= 1 and len(tried) < 5:
        row = method_row(method, model, batch, T, settings, copy, shape)
        tried.append(batch)
        if row["status"] == "ok":
            row.update(capacity=True, capacity_tried=tried, capacity_predicted=guess)
            return row
        if "OutOfMemory" not in row["skip_reason"] and "out of memory" not in row["skip_reason"]:
            break
        batch -= max(1, batch // 16)
    return {**row, "capacity": True, "capacity_tried": tried, "capacity_predicted": guess}


def run_e2e_job(settings: dict, device: str, provenance: dict, T: int | None = None, log=None,
                model=None) -> dict:
    """The end-to-end record (kind 'e2e', docs/records.md) at one context T (all of settings['T']
    when None): every method at every batch, in one job, beside the copy bandwidth of this job, and
    the largest batch each capacity method runs if T is a capacity_T.

    ``model``: a model to use instead of building settings['model'] (a test's tiny model: then the
    job runs on that model's device, the CPU included, where graph methods are skipped rows)."""
    s = {**DEFAULTS, **settings}
    Ts = [int(T)] if T is not None else [int(t) for t in s["T"]]
    record = {"kind": "e2e", "workload": {"name": "end-to-end decode", "model": s["model"], "T": Ts,
                                           **{k: s[k] for k in ("batch", "methods", "warmup", "repeats",
                                                                "eager_repeats", "dtype", "seed")}},
              "provenance": provenance, "rows": []}
    if device != "cuda" and model is None:
        record["copy"] = None
        record["rows"] = [{"method": m, "T": t, "batch": b, "status": "skipped",
                           "skip_reason": "needs a CUDA GPU (a decode step of an 8B model)"}
                          for t in Ts for b in s["batch"] for m in s["methods"]]
        return record
    import kvpack.hf

    register_fp16_attention()
    if model is None:
        model = build_model(load_model_config(s["model"]), getattr(torch, s["dtype"]), "cuda", int(s["seed"]))
    shape = kvpack.hf.model_shape(model.config)
    record["model"] = {"name": s["model"], **model_summary(model)}
    copy = measure_copy(s, device) if device == "cuda" else None
    record["copy"] = copy
    points = [(int(a), int(b)) for a, b in s["points"]] if s.get("points") else \
        [(t, int(b)) for t in Ts for b in s["batch"]]
    capacity = [t for t in dict.fromkeys(t for t, _ in points) if t in [int(x) for x in s["capacity_T"]]]
    late = {"status": "skipped", "skip_reason": "not run: the run's time limit was reached"}
    for t, batch in points:
        for method in s["methods"]:
            if method == "static_sdpa_compiled" and not compiled_here(s, t, batch):
                row = {"method": method, "T": t, "batch": batch, "status": "skipped",
                       "skip_reason": "not in e2e.compiled_points (each shape compiles anew, a minute or more)"}
            elif s["deadline"] is not None and time.time() > s["deadline"]:
                row = {"method": method, "T": t, "batch": batch, **late}
            else:
                row = method_row(method, model, batch, t, s, copy, shape)
            record["rows"].append(row)
            if log:
                log(row)
    for t in capacity if device == "cuda" else ():
        for method in s["capacity_methods"]:
            if s["deadline"] is not None and time.time() > s["deadline"]:
                row = {"method": method, "T": t, "batch": 0, "capacity": True, **late}
            else:
                row = largest_batch(method, model, t, s, copy, shape)
            record["rows"].append(row)
            if log:
                log(row)
    del model
    _release()
    return record


def compiled_here(settings: dict, T: int, batch: int) -> bool:
    """Whether static_sdpa_compiled runs at (T, batch): every point unless compiled_points lists some."""
    points = settings.get("compiled_points")
    return points is None or [T, batch] in [[int(a), int(b)] for a, b in points]


def record_name(model: str, T: int) -> str:
    """The file of one e2e record: ``<model>_T<T>.json``."""
    return f"{model}_T{T}.json"


def speedups(rows: list[dict]) -> list[dict]:
    """Per (T, batch): each ok row's step time against fp16_graph, the best transformers path
    (dynamic_sdpa, static_sdpa_compiled) and the best QuantizedCache, from the same job's rows."""
    out = []
    points = {}
    for r in rows:
        if r.get("status") == "ok" and not r.get("capacity"):
            points.setdefault((r["T"], r["batch"]), {})[r["method"]] = r["step_median_ms"]
    for (t, b), ms in points.items():
        hf = [ms[m] for m in ("dynamic_sdpa", "static_sdpa_compiled") if m in ms]
        quant = [ms[m] for m in ms if m.startswith("quantized")]
        for m, v in ms.items():
            out.append({"T": t, "batch": b, "method": m, "step_median_ms": v,
                        "vs_fp16_graph": ms["fp16_graph"] / v if "fp16_graph" in ms else math.nan,
                        "vs_best_transformers": min(hf) / v if hf else math.nan,
                        "vs_quantized_cache": min(quant) / v if quant else math.nan})
    return out


__all__ = [
    "DEFAULTS",
    "FP16_ATTN",
    "GRAPH_METHODS",
    "METHODS",
    "build_model",
    "cache_bytes",
    "compiled_here",
    "fill",
    "fp16_decode_attention",
    "largest_batch",
    "load_model_config",
    "make_cache",
    "method_row",
    "model_summary",
    "record_name",
    "register_fp16_attention",
    "run_e2e_job",
    "speedups",
    "time_method",
    "weights_read_bytes",
]
