"""The accuracy job: reconstruction and attention-score errors of every variant on one workload,
with the closed-form predictions beside them and the memory footprint (docs/records.md)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import ops, reference
from . import metrics, workloads

log = logging.getLogger("kvpack.study.accuracy")

DEFAULTS = {"query_seed": 1, "reference_max_elements": 1 << 24, "cpu_serial_max_elements": 1 << 25,
            "granularities": ["channel"], "variants": "all"}


def measure(x: torch.Tensor, x_hat: torch.Tensor, scales: torch.Tensor, query: torch.Tensor, granularity: str) -> dict:
    """Measured errors (float64) and their closed-form predictions for one quantized tensor."""
    return {
        "l2_error": metrics.l2_error(x, x_hat),
        "max_abs_error": metrics.max_abs_error(x, x_hat),
        "attention_score_error": metrics.attention_score_error(x, x_hat, query),
        "predicted_l2_error": metrics.predicted_l2_error(scales, tuple(x.shape), granularity),
        "predicted_max_abs_error": metrics.predicted_max_abs_error(scales),
        "predicted_attention_score_error": metrics.predicted_attention_score_error(scales, query, granularity),
    }


def run_accuracy_job(workload: dict, device: str, settings: dict, provenance: dict) -> dict:
    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    T, D = int(workload["T"]), int(workload["D"])
    dtype = workloads.resolve_dtype(workload.get("dtype", "float32"))
    seed = int(workload.get("seed", settings.get("seed", 0)))
    n = T * D
    rows: list[dict] = []
    record = {
        "kind": "accuracy",
        "workload": {"name": workload.get("name", f"{T}x{D}"), "T": T, "D": D, "elements": n,
                     "dtype": str(dtype).replace("torch.", ""), "seed": seed},
        "provenance": provenance,
        "settings": s,
        "rows": rows,
    }
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        esize = torch.empty((), dtype=dtype).element_size()
        need = n * (2 * esize + 1) + (1 << 30)  # x, q, x_hat and the float64 metric chunks
        if need > free:
            rows.append({"impl": "*", "device": device, "granularity": "*", "status": "skipped",
                         "skip_reason": f"needs about {need} bytes of GPU memory, {free} free"})
            return record
    x = workloads.uniform(T, D, seed=seed, dtype=dtype, device=device)
    query = workloads.query(D, seed=int(s["query_seed"]), device=device)
    variants = ops.available_variants(device)
    if s["variants"] != "all":
        variants = [v for v in variants if v in s["variants"]]
    for g in s["granularities"]:
        ref_q = None
        if n <= int(s["reference_max_elements"]):
            ref_q, _ = reference.quantize(x, granularity=g)
        first = None  # (q, scales, metrics) of the first variant: bit-exact peers share its metrics
        for v in variants:
            base = {"impl": v, "device": device, "granularity": g, "status": "ok", "skip_reason": "",
                    **metrics.memory_footprint(T, D, g, source_bytes=x.element_size())}
            if v == "cpu_serial" and n > int(s["cpu_serial_max_elements"]):
                rows.append({**base, "status": "skipped",
                             "skip_reason": f"{n} elements > cpu_serial_max_elements={s['cpu_serial_max_elements']}"})
                continue
            q, sc = ops.quantize(x, v, g, check_finite=False)
            exact_ref = None if ref_q is None else bool(np.array_equal(q.cpu().numpy(), ref_q))
            if first is not None and torch.equal(q, first[0]) and torch.equal(sc, first[1]):
                m = first[2]
            else:
                x_hat = ops.dequantize(q, sc, v, g, dtype=dtype)
                m = measure(x, x_hat, sc, query, g)
                del x_hat
                if first is None:
                    first = (q, sc, m)
            rows.append({**base, **m, "bit_exact_vs_reference": exact_ref})
            log.info("%-12s %-8s max-abs %.6f  l2 %.4f  attention %.5f  exact=%s", v, g, m["max_abs_error"],
                     m["l2_error"], m["attention_score_error"], exact_ref)
    return record
