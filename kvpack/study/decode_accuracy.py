"""How accurate fused INT8 decoding is: ``kvpack.KVCache`` (quantized on append) attended with
``kvpack.decode_attention``, against attention over the unquantized cache.

    rows = decode_accuracy(settings, device="cpu")     # one row per K/V source x granularity
    record = run_decode_accuracy_job(settings, "cuda", provenance)

The K/V sources reuse the accuracy study's generators (kvpack.study.workloads, kvpack.study.realmodel):

* ``uniform``: K, V uniform in [-1, 1] (the paper's data), queries the same;
* ``outlier_keys``: N(0, 1) with a few whole channels 10-50x larger (LLM-like keys; V drawn the same
  way, as in the format study), gaussian queries;
* ``real_model``: all-MiniLM-L6-v2's K and V of every layer on corpus sentences, each sentence a
  sequence and each layer's last-token query its decode query (its heads have D = 32; the kernel takes
  64, 128 or 256, so K, V and q are padded with zero channels to 64, which changes no score, no scale
  and no output channel: the rows measure the model's heads exactly).

The unquantized cache is the fp16 K/V (the cache a model would keep). Per row:

* ``max_abs_error``, ``rel_l2_error``: the fused output against float64 attention over the
  unquantized cache (kvpack.reference.attention_decode); ``fp16_sdpa_*`` the same for fp16
  ``scaled_dot_product_attention`` over the unquantized cache (fp16's own rounding, for scale);
  ``kernel_vs_int8_reference_max_abs``: the fused output against float64 attention over the
  dequantized int8 cache (the kernel's own rounding, apart from the quantization's);
* ``top1_agreement``: the fraction of (sequence, query head) pairs whose most-attended token is the
  same with the int8 cache as with the unquantized one. The fused kernel does not return its
  attention weights, so the int8 side's weights are computed in float64 from the dequantized cache
  (the values the kernel reads, kvpack.reference.dequantize_cache).

``path`` says what computed the int8 output: the CUDA kernel on a GPU, the extension's CPU op on a CPU.

Each source is measured at ``bits`` 8 and 4 (issue 17): the INT4 cache with the default grouping (a
scale per 32 channels of a token; keys per channel with granularity "channel"), the same metrics, the
INT4 side's scores from its dequantized cache (kvpack.int4.dequantize). The ``int8_reference_*`` and
``kernel_vs_*`` columns then compare with the dequantized INT4 cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import int4, reference
from ..cache import KVCache
from ..decode_attention import decode_attention
from . import workloads

DISTRIBUTIONS = ("uniform", "outlier_keys", "real_model")
GRANULARITIES = ("token", "channel")
DEFAULTS = {"distributions": list(DISTRIBUTIONS), "granularities": list(GRANULARITIES), "T": 1024, "batch": 4,
            "heads": [8, 2], "head_dim": 128, "real_model_sentences": 32, "seed": 0, "bits": [8, 4]}
INT4_GROUP = 32  # the INT4 cache's default grouping (docs/int4.md)
REAL_MODEL_PAD = 64  # the smallest head dimension the fused kernel takes


def path_name(device: str) -> str:
    return ("fused CUDA kernel (kvpack.decode_attention)" if torch.device(device).type == "cuda"
            else "CPU op of kvpack.decode_attention")


def synthetic_kv(distribution: str, batch: int, q_heads: int, kv_heads: int, T: int, D: int, seed: int = 0):
    """(q [B, Hq, D], K, V [B, Hkv, T, D]) in fp16 from the accuracy study's generators, on the CPU."""
    rows = batch * kv_heads * T
    K = workloads.generate(distribution, rows, D, seed=seed).reshape(batch, kv_heads, T, D)
    V = workloads.generate(distribution, rows, D, seed=seed + 1).reshape(batch, kv_heads, T, D)
    q = workloads.queries(distribution, batch * q_heads, D, seed=seed + 2).reshape(batch, q_heads, D)
    return q.half(), K.half(), V.half()


def _scores(q64: np.ndarray, k64: np.ndarray, sm_scale: float) -> np.ndarray:
    """float64 scores [B, Hq, T] of each query head against its KV head."""
    group = q64.shape[1] // k64.shape[1]
    k_rep = np.repeat(k64, group, axis=1)
    return np.einsum("bhd,bhtd->bht", q64, k_rep) * sm_scale


def _dequantized(cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """float64 K and V of a quantized cache: the values its kernels read."""
    if cache.bits == 8:
        return (reference.dequantize_cache(cache.k_cache, cache.k_scales, cache.granularity),
                reference.dequantize_cache(cache.v_cache, cache.v_scales, cache.granularity))
    per_channel = cache.granularity == "channel"
    k = int4.dequantize(cache.k_cache.cpu(), cache.k_scales.cpu(), per_channel)
    v = int4.dequantize(cache.v_cache.cpu(), cache.v_scales.cpu(), False)
    return k.double().numpy(), v.double().numpy()


def measure(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, granularity: str, device: str = "cpu",
            sm_scale: float | None = None, bits: int = 8) -> dict:
    """The errors of fused INT8 (or INT4: ``bits=4``) decoding of one batch (q [B, Hq, D], K/V [B, Hkv, T,
    D], fp16), with their sums kept so that several batches combine (:func:`combine`)."""
    B, Hkv, T, D = K.shape
    dev = torch.device(device)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    cache = KVCache(B, Hkv, D, T, granularity=granularity, device=dev, dtype=torch.float16, bits=bits,
                    group_size=INT4_GROUP)
    cache.append(K.to(dev), V.to(dev))  # one append: channel scales calibrate on the whole cache
    out = decode_attention(q.to(dev), cache.k_cache, cache.v_cache, cache.k_scales, cache.v_scales,
                           cache.device_lengths, granularity=granularity, sm_scale=scale, bits=bits,
                           group_size=INT4_GROUP).double().cpu().numpy()
    exact = reference.attention_decode(q, K, V, sm_scale=scale)
    k_hat, v_hat = _dequantized(cache)
    int8_ref = reference.attention_decode(q, k_hat, v_hat, sm_scale=scale)
    gqa = {"enable_gqa": True} if q.shape[1] != Hkv else {}
    qd, Kd, Vd = q.to(dev).unsqueeze(2), K.to(dev), V.to(dev)
    try:
        sdpa = F.scaled_dot_product_attention(qd, Kd, Vd, scale=scale, **gqa)
    except RuntimeError:  # a CPU without fp16 SDPA: fp32 math, rounded to fp16 at the end
        sdpa = F.scaled_dot_product_attention(qd.float(), Kd.float(), Vd.float(), scale=scale, **gqa).half()
    sdpa = sdpa.squeeze(2).double().cpu().numpy()
    q64 = q.double().numpy()
    top_exact = _scores(q64, K.double().numpy(), scale).argmax(-1)
    top_int8 = _scores(q64, k_hat, scale).argmax(-1)
    return {"queries": int(top_exact.size), "agree": int((top_exact == top_int8).sum()),
            "err_sq": float(((out - exact) ** 2).sum()), "ref_sq": float((exact ** 2).sum()),
            "max_abs": float(np.abs(out - exact).max()), "sdpa_err_sq": float(((sdpa - exact) ** 2).sum()),
            "sdpa_max_abs": float(np.abs(sdpa - exact).max()),
            "int8_ref_max_abs": float(np.abs(int8_ref - exact).max()),
            "kernel_max_abs": float(np.abs(out - int8_ref).max()),
            "tokens": int(B * T), "ref_max_abs": float(np.abs(exact).max())}


def combine(parts: list[dict]) -> dict:
    """One row's metrics from the sums of :func:`measure` over several batches."""
    s = {k: sum(p[k] for p in parts) for k in ("queries", "agree", "err_sq", "ref_sq", "sdpa_err_sq", "tokens")}
    ref = math.sqrt(s["ref_sq"]) or 1.0
    return {
        "queries": s["queries"], "tokens": s["tokens"],
        "max_abs_error": max(p["max_abs"] for p in parts),
        "rel_l2_error": math.sqrt(s["err_sq"]) / ref,
        "fp16_sdpa_max_abs_error": max(p["sdpa_max_abs"] for p in parts),
        "fp16_sdpa_rel_l2_error": math.sqrt(s["sdpa_err_sq"]) / ref,
        "int8_reference_max_abs_error": max(p["int8_ref_max_abs"] for p in parts),
        "kernel_vs_int8_reference_max_abs": max(p["kernel_max_abs"] for p in parts),
        "top1_agreement": s["agree"] / s["queries"],
        "output_max_abs": max(p["ref_max_abs"] for p in parts),
    }


def _pad(x: torch.Tensor, D: int) -> torch.Tensor:
    return F.pad(x, (0, D - x.shape[-1])) if x.shape[-1] < D else x


def real_model_batches(n_sentences: int):
    """[(q [B, H, 64], K, V [B, H, L, 64])] fp16, one per (layer, bucket of equal-length sentences):
    all-MiniLM-L6-v2's real heads, zero-padded from 32 to 64 channels. Raises ModelUnavailable."""
    from . import realmodel

    model, tokenizer = realmodel.load_model("cpu")
    sentences = realmodel.read_corpus()[:n_sentences]
    captured = realmodel.capture(model, tokenizer, sentences)
    out = []
    for layer in sorted(captured):
        for q, K, V in zip(*(captured[layer][r] for r in ("query", "key", "value"))):
            D = max(REAL_MODEL_PAD, q.shape[-1])
            out.append((layer, _pad(q[:, :, -1, :], D).half(), _pad(K, D).half(), _pad(V, D).half(), q.shape[-1]))
    return out


def _bits_cols(bits: int) -> dict:
    return {"bits": int(bits), "int4_group": INT4_GROUP if int(bits) == 4 else None}


def decode_accuracy(settings: dict | None = None, device: str = "cpu") -> list[dict]:
    """One row per K/V source x granularity (see the module's docstring)."""
    s = {**DEFAULTS, **(settings or {})}
    hq, hkv = (int(h) for h in s["heads"])
    rows = []
    for dist in s["distributions"]:
        base = {"distribution": dist, "path": path_name(device), "device": torch.device(device).type}
        if dist == "real_model":
            from . import realmodel

            ok, why = realmodel.model_status()
            if not ok:
                rows += [{**base, **_bits_cols(b), "granularity": g, "status": "skipped", "skip_reason": why}
                         for b in s["bits"] for g in s["granularities"]]
                continue
            batches = real_model_batches(int(s["real_model_sentences"]))
            head_dim = batches[0][4]
            for bits, g in ((b, g) for b in s["bits"] for g in s["granularities"]):
                # sm_scale of the model's own heads (1/sqrt(32)), not of the zero-padded width
                parts = [measure(q, K, V, g, device, sm_scale=1.0 / math.sqrt(d), bits=bits) for _, q, K, V, d in batches]
                lengths = sorted({int(b[2].shape[2]) for b in batches})
                rows.append({**base, **_bits_cols(bits), "granularity": g, "status": "ok", "skip_reason": "",
                             "batch": sum(int(b[1].shape[0]) for b in batches if b[0] == batches[0][0]),
                             "q_heads": int(batches[0][1].shape[1]),
                             "kv_heads": int(batches[0][2].shape[1]), "head_dim": head_dim,
                             "T": f"{lengths[0]}-{lengths[-1]}", "layers": len({b[0] for b in batches}),
                             "sentences": int(s["real_model_sentences"]), **combine(parts)})
            continue
        q, K, V = synthetic_kv(dist, int(s["batch"]), hq, hkv, int(s["T"]), int(s["head_dim"]), int(s["seed"]))
        for bits, g in ((b, g) for b in s["bits"] for g in s["granularities"]):
            rows.append({**base, **_bits_cols(bits), "granularity": g, "status": "ok", "skip_reason": "",
                         "batch": int(s["batch"]), "q_heads": hq, "kv_heads": hkv, "head_dim": int(s["head_dim"]),
                         "T": str(int(s["T"])), **combine([measure(q, K, V, g, device, bits=bits)])})
    return rows


def run_decode_accuracy_job(settings: dict, device: str, provenance: dict) -> dict:
    """The decode accuracy record (kind 'decode_accuracy', docs/records.md)."""
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
    return {"kind": "decode_accuracy", "workload": {"name": "decode accuracy", **s, "path": path_name(device)},
            "provenance": provenance, "rows": decode_accuracy(s, device)}


__all__ = ["DEFAULTS", "DISTRIBUTIONS", "combine", "decode_accuracy", "measure", "path_name", "real_model_batches",
           "run_decode_accuracy_job", "synthetic_kv"]
