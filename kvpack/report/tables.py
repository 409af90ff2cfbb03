"""Raw records (docs/records.md) -> pandas tables -> CSVs. The one place the report's numbers come from.

Records of this run and of committed reference runs (``reports/reference/<gpu>/``) are read side by
side; every row keeps its ``source`` ('this run' or 'reference: <dir>') and its ``device_slug``, so
several machines merge without one clobbering another. Rows a job skipped stay, with their reason.

Units sit in column names: ``_ms`` (milliseconds), ``_gbps`` (10^9 bytes per second), ``_bytes``.
The paper's published numbers (``reports/paper/``) are reshaped by :func:`paper_table` and sit
beside ours in the speedup and accuracy tables; they are read, never edited.

    perf = performance_table(collect_records(benchmark_paths, accuracy_paths, reference_dirs))
    tables = read_tables("results/tables")       # what kvpack.report.assemble.write_tables wrote

Every table at once, the claims included, is :mod:`kvpack.report.assemble` (the claims read these
tables, so the function that adds them to the set lives above both).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..study import metrics

ROOT = Path(__file__).resolve().parents[2]  # the checkout
PAPER_DIR = ROOT / "reports" / "paper"

THIS_RUN = "this run"
PAPER_SOURCE = "paper (their GPU)"
PAPER_CPU_SOURCE = "paper (their CPU)"
PAPER_VARIANTS = ("naive", "tiled", "coarsened", "vectorized")  # the paper's four GPU kernels
GPU_IMPLS = PAPER_VARIANTS + ("fast",)
CPU_BASELINES = {
    "cpu_serial": "the paper's serial CPU baseline",
    "cpu_torch": "multi-threaded torch CPU (honest baseline)",
}
PEERS = ("torch_eager", "torch_compile", "torch_quantize_per_channel")
QUANT_DEQUANT = "quant+dequant"  # the paper's timed pair: quantize then dequantize, scales excluded

TABLE_NAMES = ("performance", "accuracy", "memory", "workloads", "paper", "speedups", "claims",
               "provenance", "paper_l2", "decode", "decode_append", "decode_accuracy", "e2e", "decode_int4",
               "decode_api", "decode_peers")

PROVENANCE_KEYS = ("device", "device_name", "gpu_name", "cpu_model", "cpu_threads", "driver", "cuda", "torch",
                   "python", "git_commit", "config_hash", "date")


# --- loading -----------------------------------------------------------------------------------

def source_label(reference_dir) -> str:
    return f"reference: {Path(reference_dir).name}"


def source_device_label(source: str, slug: str) -> str:
    """'this run: <slug>', or 'reference: h100' alone when the reference directory already names the device."""
    return source if str(source).endswith(f": {slug}") else f"{source}: {slug}"


def load_records(paths, source: str = THIS_RUN) -> list[dict]:
    """Read raw record files; each record gets ``_source`` and ``_path`` (its provenance in the tables)."""
    records = []
    for p in sorted({str(Path(p)) for p in paths}):
        with open(p) as f:
            record = json.load(f)
        # tools/bench_decode.py's records (kind 'decode_bench') before it wrote a workload have none, nor
        # tools/bench_decode_api.py's (kind 'decode_api_bench'), whose rows name their points
        no_workload = record.get("kind") in ("decode_bench", "decode_api_bench")
        required = ("kind", "provenance", "rows") + (() if no_workload else ("workload",))
        for key in required:
            if key not in record:
                raise ValueError(f"{p}: not a kvpack record (missing {key!r}); see docs/records.md")
        record["_source"] = source
        record["_path"] = str(p)
        records.append(record)
    return records


def reference_record_paths(reference_dir, kinds=("benchmark", "accuracy")) -> list[Path]:
    d = Path(reference_dir)
    return [p for kind in kinds for p in sorted(d.glob(f"{kind}/*.json"))]


# The serving records of a reference folder (issue 18): what the public decode call costs beyond its
# kernels (tools/bench_decode_api.py) and kvpack's paged decode beside FlashInfer's (tools/bench_paged_peers.py).
SERVING_RECORDS = ("api/decode_api.json", "peers/paged_peers_p*.json")


def collect_records(benchmark_paths=(), accuracy_paths=(), reference_dirs=(), decode_paths=(),
                    e2e_paths=()) -> list[dict]:
    """This run's records and those of every reference directory, each labelled with its source."""
    records = load_records(list(benchmark_paths) + list(accuracy_paths) + list(decode_paths) + list(e2e_paths),
                           THIS_RUN)
    for d in reference_dirs or ():
        serving = [p for pattern in SERVING_RECORDS for p in sorted(Path(d).glob(pattern))]
        records += one_machine(load_records(reference_record_paths(d, ("benchmark", "accuracy", "decode", "e2e", "int4"))
                                            + serving, source_label(d)))
    return records


def one_machine(records: list[dict]) -> list[dict]:
    """A reference directory's records name one GPU under one slug. Runs that were given a name
    (``--device-name h100``) and runs that took the detected one (``nvidia-h100-80gb-hbm3``) of the
    same GPU are one machine: each record's slug becomes the given name of its detected GPU where
    any record gives one (in memory; the files are not touched)."""
    named = {}
    for r in records:
        p = r["provenance"]
        detected = p.get("device_slug_detected") or p.get("device_slug")
        if p.get("device_slug") and p.get("device_slug") != detected:
            named.setdefault(detected, p["device_slug"])
    for r in records:
        p = r["provenance"]
        detected = p.get("device_slug_detected") or p.get("device_slug")
        if detected in named and p.get("device_slug") != named[detected]:
            r["provenance"] = {**p, "device_slug": named[detected], "device_slug_detected": detected}
    return records


SDPA_BACKENDS = ("flash", "cudnn", "efficient")  # kvpack.study.decode_step.SDPA_BACKENDS
DECODE_METHODS = (*(f"sdpa_{b}" for b in SDPA_BACKENDS), "sdpa_best", "dequant_sdpa", "fused", "int4")
DECODE_COLUMNS = ["source", "device_slug", "device_name", "record_format", "T", "batch", "q_heads", "kv_heads",
                  "head_dim", "granularity", "status", "skip_reason",
                  *(f"{m}_{s}_ms" for m in DECODE_METHODS for s in ("median", "p10", "p90")),
                  "sdpa_best", "fused_speedup_vs_sdpa", "dequant_sdpa_speedup_vs_sdpa", "fused_fraction_of_int8_bound",
                  "int8_byte_bound_ms", "fp16_byte_bound_ms", "copy_gbps", "fused_splits", "fused_vs_sdpa_max_abs",
                  "cache_fp16_bytes", "cache_int8_bytes", "path",
                  # the INT4 kernel over an INT4 cache of the same K and V (issue 17), if timed
                  "int4_group", "int4_speedup_vs_sdpa", "int4_vs_fused", "int4_byte_bound_ms",
                  "int4_fraction_of_int4_bound", "int4_vs_sdpa_max_abs", "cache_int4_bytes",
                  # the paged kernel over a shuffled paged copy of the same cache (decode.page_sizes), if timed
                  *(f"paged_p{n}_{c}" for n in (16, 32, 64, 128, 256)
                    for c in ("median_ms", "p10_ms", "p90_ms", "vs_fused", "equals_fused")),
                  # the paged INT4 kernel over a shuffled paged copy of the INT4 cache, if timed
                  *(f"int4_paged_p{n}_{c}" for n in (16, 32, 64, 128, 256)
                    for c in ("median_ms", "p10_ms", "p90_ms", "vs_int4", "equals_int4"))]
DECODE_PAGE_SIZES = (16, 32, 64, 128, 256)
DECODE_V1 = "v1: torch's default SDPA, dequantize then SDPA, no fused kernel (superseded)"
DECODE_V2 = "v2: every SDPA backend, dequantize then SDPA, fused int8"


def _decode_v1_row(row: dict) -> dict:
    """A row of a first-format decode record (one file for all T; reports/reference/h100/decode/decode.json)
    in the columns of the current format: torch's default SDPA backend, named 'default', is its baseline."""
    base = row.get("attention_fp16_median_ms")
    out = {"record_format": DECODE_V1, "T": row.get("T"), "batch": row.get("batch", 1),
           "q_heads": row.get("heads"), "kv_heads": row.get("heads"), "head_dim": row.get("head_dim"),
           "granularity": "channel", "status": row.get("status", "ok"), "skip_reason": row.get("skip_reason", ""),
           "sdpa_best": "default", "cache_fp16_bytes": row.get("cache_fp16_bytes"),
           "cache_int8_bytes": row.get("cache_int8_bytes"), "fused_vs_sdpa_max_abs": None}
    for s in ("median", "p10", "p90"):
        out[f"sdpa_best_{s}_ms"] = row.get(f"attention_fp16_{s}_ms")
        out[f"dequant_sdpa_{s}_ms"] = row.get(f"dequant_attention_{s}_ms")
    if base and row.get("dequant_attention_median_ms"):
        out["dequant_sdpa_speedup_vs_sdpa"] = base / row["dequant_attention_median_ms"]
    return out


def _decode_v2_row(row: dict) -> dict:
    out = {"record_format": DECODE_V2, **row}
    skipped = row.get("skipped") or {}
    if not out.get("skip_reason"):
        out["skip_reason"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    if out.get("sdpa_best") and out.get("sdpa_best_median_ms") is not None:
        for s in ("p10", "p90"):
            out[f"sdpa_best_{s}_ms"] = row.get(f"sdpa_{out['sdpa_best']}_{s}_ms")
    return out


def _measured_by(record: dict) -> dict:
    """Where a record's rows come from: its source (this run or a reference folder) and its device."""
    p = record["provenance"]
    return {"source": record.get("_source", THIS_RUN), "device_slug": p.get("device_slug") or "unknown",
            "device_name": p.get("gpu_name") or p.get("device_name") or "unknown"}


def decode_table(records) -> pd.DataFrame:
    """One row per decode grid point (kvpack.study.decode_step, kind 'decode'): each SDPA backend's
    median/p10/p90 ms, the fastest of them (``sdpa_best``, the baseline of every ratio),
    dequantize-then-SDPA, the fused INT8 kernel, their speedups over the best SDPA, the fused kernel's
    fraction of the int8 byte bound, and the copy bandwidth of the same job. Rows of first-format records
    (one file for all T, torch's default SDPA, no fused kernel) are kept, labelled in ``record_format``."""
    rows = []
    for r in records:
        if r.get("kind") != "decode":
            continue
        where = {**_measured_by(r), "path": r.get("_path", "")}
        for row in r["rows"]:
            body = _decode_v1_row(row) if "attention_fp16_median_ms" in row or "heads" in row else _decode_v2_row(row)
            rows.append({**where, "skip_reason": "", **body})
    if not rows:
        return pd.DataFrame(columns=DECODE_COLUMNS)
    df = pd.DataFrame(rows).reindex(columns=DECODE_COLUMNS)
    df["skip_reason"] = df["skip_reason"].fillna("")
    return df.sort_values(["source", "device_slug", "record_format", "head_dim", "q_heads", "kv_heads", "batch", "T"],
                          kind="stable", ascending=[True, True, True, True, True, False, True, True]).reset_index(drop=True)


DECODE_INT4_COLUMNS = [*DECODE_COLUMNS, "git_commit"]


def decode_int4_table(records) -> pd.DataFrame:
    """The INT4 kernel's rows of the bench records (kind 'decode_bench', written by tools/bench_decode.py;
    a reference folder's ``int4/``): the decode table's columns and the commit that made them. Where a
    source's decode grid has no INT4 rows (records before issue 17), claim int4_decode reads these."""
    rows = []
    for r in records:
        if r.get("kind") != "decode_bench":
            continue
        where = {**_measured_by(r), "path": r.get("_path", ""), "git_commit": str(r["provenance"].get("git_commit") or "")}
        rows += [{**where, "skip_reason": "", **_decode_v2_row(row)} for row in r["rows"] if "int4_median_ms" in row]
    if not rows:
        return pd.DataFrame(columns=DECODE_INT4_COLUMNS)
    df = pd.DataFrame(rows).reindex(columns=DECODE_INT4_COLUMNS)
    df["skip_reason"] = df["skip_reason"].fillna("")
    return df


def decode_view(decode: pd.DataFrame) -> pd.DataFrame:
    """The decode table as the report shows it: current-format rows, the columns a reader compares."""
    if decode is None or not len(decode):
        return pd.DataFrame()
    d = decode[decode["record_format"] == DECODE_V2] if "record_format" in decode else decode
    cols = ["source", "device_slug", "T", "batch", "q_heads", "kv_heads", "head_dim", "status",
            "sdpa_flash_median_ms", "sdpa_cudnn_median_ms", "sdpa_efficient_median_ms", "sdpa_best",
            "dequant_sdpa_median_ms", "fused_median_ms", "fused_speedup_vs_sdpa", "dequant_sdpa_speedup_vs_sdpa",
            "int8_byte_bound_ms", "fused_fraction_of_int8_bound", "int4_group", "int4_median_ms",
            "int4_speedup_vs_sdpa", "int4_vs_fused", "int4_byte_bound_ms", "int4_fraction_of_int4_bound", "copy_gbps",
            *(f"paged_p{n}_{c}" for n in DECODE_PAGE_SIZES for c in ("median_ms", "vs_fused")),
            *(f"int4_paged_p{n}_{c}" for n in DECODE_PAGE_SIZES for c in ("median_ms", "vs_int4")), "skip_reason"]
    d = d[[c for c in cols if c in d.columns]]
    empty = [c for c in d.columns if "paged_" in c and d[c].isna().all()]
    return d.drop(columns=empty)  # page sizes no record timed


DECODE_APPEND_COLUMNS = ["source", "device_slug", "device_name", "batch", "kv_heads", "head_dim", "granularity",
                         "status", "skip_reason", "append_median_us", "append_median_ms", "append_p10_ms",
                         "append_p90_ms"]


def _device_rows(records, kind: str) -> list[dict]:
    """The rows of every record of ``kind``, each with its source and the device that measured it."""
    rows = []
    for r in records:
        if r.get("kind") != kind:
            continue
        for row in r["rows"]:
            rows.append({**_measured_by(r), "skip_reason": "", **row})
    return rows


def decode_append_table(records) -> pd.DataFrame:
    """The one-token append timing of each device (kind 'decode_append')."""
    rows = _device_rows(records, "decode_append")
    return pd.DataFrame(rows).reindex(columns=DECODE_APPEND_COLUMNS) if rows else pd.DataFrame(columns=DECODE_APPEND_COLUMNS)


DECODE_API_COLUMNS = ["source", "device_slug", "device_name", "T", "batch", "q_heads", "kv_heads", "head_dim",
                      "calls", "default_us", "raw_op_us", "graph_us", "check_lengths_us", "default_over_graph",
                      "raw_over_graph"]


def decode_api_table(records) -> pd.DataFrame:
    """What one public ``kvpack.decode_attention`` call costs (kind 'decode_api_bench', tools/bench_decode_api.py):
    per point, the default call, the raw op, the host-checked call and the kernels alone (a CUDA graph's
    replay), microseconds a call."""
    rows = _device_rows(records, "decode_api_bench")
    return pd.DataFrame(rows).reindex(columns=DECODE_API_COLUMNS) if rows else pd.DataFrame(columns=DECODE_API_COLUMNS)


FI_FP16_METHODS = ("fi_fa2_fp16", "fi_fa2tc_fp16", "fi_xqa_fp16")  # FlashInfer's fp16 paged decode kernels
DECODE_PEERS_COLUMNS = ["source", "device_slug", "device_name", "T", "batch", "q_heads", "kv_heads", "head_dim",
                        "page_size", "flashinfer_version", "sdpa_best", "kvpack_int8_median_ms",
                        "kvpack_int8_paged_median_ms", "kvpack_int4_paged_median_ms",
                        *(f"{m}_median_ms" for m in FI_FP16_METHODS),
                        "fi_fp16_best_median_ms", "paged_vs_fi_fp16_speedup"]


def decode_peers_table(records) -> pd.DataFrame:
    """kvpack's paged INT8 decode beside FlashInfer's fp16 paged decode in one job (kind 'paged_peers',
    tools/bench_paged_peers.py): ``paged_vs_fi_fp16_speedup`` is the fastest FlashInfer fp16 kernel's time
    over kvpack's paged kernel's (above 1: kvpack ahead)."""
    rows = _device_rows(records, "paged_peers")
    if not rows:
        return pd.DataFrame(columns=DECODE_PEERS_COLUMNS)
    df = pd.DataFrame(rows).reindex(columns=DECODE_PEERS_COLUMNS)
    fi = df[[f"{m}_median_ms" for m in FI_FP16_METHODS]].astype(float)
    df["fi_fp16_best_median_ms"] = fi.min(axis=1)
    df["paged_vs_fi_fp16_speedup"] = df["fi_fp16_best_median_ms"] / df["kvpack_int8_paged_median_ms"].astype(float)
    return df


DECODE_ACCURACY_COLUMNS = ["source", "device_slug", "device_name", "path", "distribution", "bits", "int4_group",
                           "granularity", "status",
                           "skip_reason", "batch", "q_heads", "kv_heads", "head_dim", "T", "queries",
                           "max_abs_error", "rel_l2_error", "top1_agreement", "fp16_sdpa_max_abs_error",
                           "fp16_sdpa_rel_l2_error", "int8_reference_max_abs_error",
                           "kernel_vs_int8_reference_max_abs", "output_max_abs", "layers", "sentences"]


def decode_accuracy_table(records) -> pd.DataFrame:
    """Fused INT8 decoding against attention over the unquantized cache (kind 'decode_accuracy',
    kvpack.study.decode_accuracy): one row per device x K/V source x granularity."""
    rows = _device_rows(records, "decode_accuracy")
    if not rows:
        return pd.DataFrame(columns=DECODE_ACCURACY_COLUMNS)
    df = pd.DataFrame(rows).reindex(columns=DECODE_ACCURACY_COLUMNS)
    df["skip_reason"] = df["skip_reason"].fillna("")
    df["bits"] = df["bits"].fillna(8).astype(int)  # records before issue 17 measured INT8 only
    return df


E2E_COLUMNS = ["source", "device_slug", "device_name", "git_commit", "model", "T", "batch", "method", "capacity",
               "status", "skip_reason", "step_median_ms", "step_p10_ms", "step_p90_ms", "tokens_per_s",
               "peak_memory_bytes", "cache_bytes", "weights_read_bytes", "bytes_read", "byte_bound_ms",
               "fraction_of_bound", "fp16_byte_bound_ms", "vs_fp16_bound", "vs_fp16_graph", "vs_best_transformers",
               "vs_quantized_cache", "sdpa_backend", "compile_s", "copy_gbps", "path"]
E2E_TRANSFORMERS = ("dynamic_sdpa", "static_sdpa_compiled")  # transformers' own fp16 paths


def e2e_table(records) -> pd.DataFrame:
    """The end-to-end decode benchmark (kind 'e2e', kvpack.study.e2e): one row per device x T x batch x
    method (and the largest batch of each capacity method, ``capacity`` True), with each step's
    ratios against the same job's fp16 graph, best transformers path and best QuantizedCache, and
    against the fp16 byte bound of the same step (> 1: faster than any fp16 cache can be)."""
    rows = []
    for r in records:
        if r.get("kind") != "e2e":
            continue
        p = r["provenance"]
        for row in r["rows"]:
            rows.append({**_measured_by(r), "git_commit": (p.get("git_commit") or "")[:8], "model": r["workload"].get("model"),
                         "path": r.get("_path", ""), "capacity": bool(row.get("capacity", False)),
                         "skip_reason": "", **{k: v for k, v in row.items() if k != "capacity"}})
    if not rows:
        return pd.DataFrame(columns=E2E_COLUMNS)
    df = pd.DataFrame(rows)
    df["skip_reason"] = df["skip_reason"].fillna("")
    ok = (df["status"] == "ok") & ~df["capacity"]
    key = ["source", "device_slug", "T", "batch"]
    for name, methods in (("vs_fp16_graph", ("fp16_graph",)), ("vs_best_transformers", E2E_TRANSFORMERS),
                          ("vs_quantized_cache", tuple(m for m in df["method"].unique() if str(m).startswith("quantized")))):
        base = df[ok & df["method"].isin(methods)].groupby(key)["step_median_ms"].min().rename("_base")
        df = df.join(base, on=key)
        df[name] = np.where(ok, df["_base"] / df["step_median_ms"], np.nan)
        df = df.drop(columns="_base")
    if "fp16_byte_bound_ms" in df:
        df["vs_fp16_bound"] = df["fp16_byte_bound_ms"] / df["step_median_ms"]
    return df.reindex(columns=E2E_COLUMNS)


E2E_LABELS = {"kvpack_token_graph": "kvpack INT8 token, graph", "kvpack_channel_graph": "kvpack INT8 channel, graph",
              "kvpack_token_eager": "kvpack INT8 token, eager", "kvpack_channel_eager": "kvpack INT8 channel, eager",
              "fp16_graph": "fp16 cache, graph (best SDPA)", "dynamic_sdpa": "transformers DynamicCache, eager",
              "static_sdpa_compiled": "transformers StaticCache, compiled", "quantized_fp8": "QuantizedCache fp8",
              "quantized_hqq_int8": "QuantizedCache HQQ int8", "quantized_quanto_int4": "QuantizedCache quanto int4"}


def e2e_view(e2e: pd.DataFrame) -> pd.DataFrame:
    """The e2e table as the report shows it: one line per device x point x method that ran."""
    if e2e is None or not len(e2e):
        return pd.DataFrame()
    d = e2e[e2e["status"] == "ok"].copy()
    d["method"] = d["method"].map(lambda m: E2E_LABELS.get(m, m)) + np.where(d["capacity"].astype(bool),
                                                                              " [largest batch]", "")
    cols = ["device_slug", "T", "batch", "method", "step_median_ms", "step_p10_ms", "step_p90_ms", "tokens_per_s",
            "peak_memory_bytes", "fraction_of_bound", "vs_fp16_bound", "vs_fp16_graph", "vs_best_transformers",
            "vs_quantized_cache"]
    return d.sort_values(["device_slug", "T", "batch", "step_median_ms"])[cols]


def _workload_cols(record: dict) -> dict:
    w, p = record["workload"], record["provenance"]
    T, D = int(w["T"]), int(w["D"])
    return {
        "source": record.get("_source", THIS_RUN),
        "device_slug": p.get("device_slug") or "unknown",
        "device_name": p.get("gpu_name") or p.get("device_name") or p.get("cpu_model") or "unknown",
        "workload": w.get("name") or f"{T}x{D}",
        "T": T,
        "D": D,
        "elements": int(w.get("elements") or T * D),
        "dtype": w.get("dtype", "float32"),
    }


def _hardware(row_device, provenance: dict) -> str:
    """The chip a row ran on: the GPU for cuda rows, the CPU for cpu rows (a GPU host has both)."""
    if row_device == "cuda":
        return provenance.get("gpu_name") or provenance.get("device_name") or "unknown GPU"
    return provenance.get("cpu_model") or provenance.get("device_name") or "unknown CPU"


def gbps(nbytes, ms):
    """Bytes moved over median time, in 10^9 bytes per second (NaN where either is missing)."""
    nbytes, ms = pd.to_numeric(nbytes, errors="coerce"), pd.to_numeric(ms, errors="coerce")
    return nbytes / (ms * 1e-3) / 1e9


# --- our measurements ----------------------------------------------------------------------------

PERFORMANCE_COLUMNS = [
    "source", "device_slug", "device_name", "workload", "T", "D", "elements", "dtype", "impl", "family", "device",
    "hardware", "op", "granularity", "status", "skip_reason", "median_ms", "p10_ms", "p90_ms", "min_ms", "mean_ms",
    "repeats", "moved_bytes", "achieved_gbps", "copy_ceiling_gbps", "fraction_of_copy", "peak_memory_bytes",
    "bit_exact", "path",
]


def performance_table(records) -> pd.DataFrame:
    """One row per benchmark row. ``achieved_gbps`` = moved_bytes / median_ms, recomputed here;
    ``copy_ceiling_gbps`` is the copy bandwidth measured in the same job on the row's device."""
    out = []
    for r in records:
        if r.get("kind") != "benchmark":
            continue
        base, prov = _workload_cols(r), r["provenance"]
        ceiling = r.get("ceiling") or {}
        for row in r["rows"]:
            dev = row.get("device")
            ceil = ceiling.get("copy_gbps") if ceiling.get("device", dev) == dev else None
            out.append({
                **base,
                "impl": row.get("impl"), "family": row.get("family"), "device": dev,
                "hardware": _hardware(dev, prov), "op": row.get("op"),
                "granularity": row.get("granularity") or "channel",
                "status": row.get("status", "ok"), "skip_reason": row.get("skip_reason") or "",
                **{k: row.get(k) for k in ("median_ms", "p10_ms", "p90_ms", "min_ms", "mean_ms", "repeats")},
                "moved_bytes": row.get("bytes"), "copy_ceiling_gbps": ceil,
                "peak_memory_bytes": row.get("peak_memory_bytes"), "bit_exact": row.get("bit_exact"),
                "path": r.get("_path", ""),
            })
    df = pd.DataFrame(out, columns=PERFORMANCE_COLUMNS)
    for c in ("median_ms", "p10_ms", "p90_ms", "min_ms", "mean_ms", "moved_bytes", "copy_ceiling_gbps",
              "peak_memory_bytes", "repeats"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["achieved_gbps"] = gbps(df["moved_bytes"], df["median_ms"])
    df["fraction_of_copy"] = df["achieved_gbps"] / df["copy_ceiling_gbps"]
    return df.sort_values(["source", "device_slug", "elements", "T", "D", "dtype", "impl", "op"],
                          kind="stable").reset_index(drop=True)


ERRORS = ("l2_error", "max_abs_error", "attention_score_error")

ACCURACY_COLUMNS = [
    "source", "device_slug", "device_name", "workload", "T", "D", "elements", "dtype", "impl", "device", "hardware",
    "granularity", "status", "skip_reason",
    *[c for e in ERRORS for c in (e, f"predicted_{e}", f"{e}_ratio", f"paper_{e}")],
    "prediction_source", "bit_exact_vs_reference", "original_bytes", "compressed_bytes", "compression_ratio", "path",
]


def accuracy_table(records, paper_dir=PAPER_DIR) -> pd.DataFrame:
    """One row per accuracy row: each error beside its closed-form prediction and measured/predicted.

    Predictions come from the record (computed from the measured scales); where a record has none,
    from :func:`kvpack.study.metrics.paper_predictions` (one scale 1/127, the paper's data), as
    ``prediction_source`` says. ``paper_*`` columns: the paper's published errors at the same T x D.
    """
    out = []
    for r in records:
        if r.get("kind") != "accuracy":
            continue
        base, prov = _workload_cols(r), r["provenance"]
        for row in r["rows"]:
            d = {**base, "impl": row.get("impl"), "device": row.get("device"),
                 "hardware": _hardware(row.get("device"), prov), "granularity": row.get("granularity") or "channel",
                 "status": row.get("status", "ok"), "skip_reason": row.get("skip_reason") or "",
                 "bit_exact_vs_reference": row.get("bit_exact_vs_reference"), "path": r.get("_path", "")}
            for k in ("original_bytes", "compressed_bytes", "compression_ratio", *ERRORS):
                d[k] = row.get(k)
            recorded = all(row.get(f"predicted_{e}") is not None for e in ERRORS)
            closed = metrics.paper_predictions(base["T"], base["D"])
            for e in ERRORS:
                d[f"predicted_{e}"] = row.get(f"predicted_{e}") if recorded else closed[f"predicted_{e}"]
            d["prediction_source"] = ("record (from the measured scales)" if recorded
                                      else "closed form, one scale 1/127 (kvpack.study.metrics.paper_predictions)")
            out.append(d)
    df = pd.DataFrame(out, columns=ACCURACY_COLUMNS)
    for e in ERRORS:
        for c in (e, f"predicted_{e}"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        df[f"{e}_ratio"] = df[e] / df[f"predicted_{e}"]
    for c in ("original_bytes", "compressed_bytes", "compression_ratio"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    pacc = paper_accuracy_table(paper_dir)
    if len(df) and len(pacc):
        m = df[["T", "D"]].merge(pacc, on=["T", "D"], how="left")
        for e in ERRORS:
            df[f"paper_{e}"] = m[f"paper_{e}"].to_numpy()
    return df.sort_values(["source", "device_slug", "elements", "T", "D", "dtype", "impl", "granularity"],
                          kind="stable").reset_index(drop=True)


def quant_dequant_table(perf: pd.DataFrame) -> pd.DataFrame:
    """Per (source, device, workload, impl, granularity): quantize_ms + dequantize_ms = total_ms, the
    paper's timed pair. ``status`` is 'ok' only when both halves were measured."""
    keys = ["source", "device_slug", "device_name", "workload", "T", "D", "elements", "dtype", "impl", "family",
            "device", "hardware", "granularity"]
    cols = keys + ["quantize_ms", "dequantize_ms", "total_ms", "status", "skip_reason"]
    if perf is None or not len(perf):
        return pd.DataFrame(columns=cols)
    p = perf[perf["op"].isin(["quantize", "dequantize"]) & perf["impl"].notna() & (perf["impl"] != "*")].copy()
    if not len(p):
        return pd.DataFrame(columns=cols)
    for c in ("family", "hardware", "device_name", "granularity"):
        p[c] = p[c].fillna("")
    rows = []
    for k, g in p.groupby(keys, sort=False, dropna=False):
        ok = g[g["status"] == "ok"].set_index("op")["median_ms"]
        q, dq = ok.get("quantize", np.nan), ok.get("dequantize", np.nan)
        good = np.isfinite(q) and np.isfinite(dq)
        reasons = "; ".join(sorted({s for s in g["skip_reason"] if s}))
        if not good and not reasons:
            reasons = "quantize or dequantize not measured"
        rows.append({**dict(zip(keys, k)), "quantize_ms": q, "dequantize_ms": dq, "total_ms": q + dq if good else np.nan,
                     "status": "ok" if good else (g["status"][g["status"] != "ok"].iloc[0]
                                                  if (g["status"] != "ok").any() else "incomplete"),
                     "skip_reason": "" if good else reasons})
    return pd.DataFrame(rows, columns=cols)


SPEEDUP_COLUMNS = [
    "source", "device_slug", "device_name", "hardware", "workload", "T", "D", "elements", "dtype", "granularity", "impl",
    "total_ms", "baseline", "baseline_label", "baseline_hardware", "baseline_total_ms", "speedup",
    "paper_speedup", "paper_total_ms", "status", "note",
]


def speedup_table(perf: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Speedup of each GPU impl (quant + dequant) over BOTH CPU baselines of the same machine and job.

    ``speedup`` = baseline_total_ms / total_ms. ``baseline`` is 'cpu_serial' (the paper's: serial,
    column-outer loops) or 'cpu_torch' (multi-threaded torch: the honest one). ``paper_speedup`` is
    the paper's published speedup for the same variant and T x D, on the cpu_serial rows only (the
    paper has no other baseline).
    """
    tot = quant_dequant_table(perf)
    if not len(tot):
        return pd.DataFrame(columns=SPEEDUP_COLUMNS)
    key = ["source", "device_slug", "workload", "T", "D", "dtype", "granularity"]
    gpu = tot[(tot["device"] == "cuda") & tot["impl"].isin(GPU_IMPLS)]
    base = tot[tot["impl"].isin(list(CPU_BASELINES))]
    pt = paper if paper is not None else paper_table()
    ptot = pt[pt["op"] == QUANT_DEQUANT].set_index(["T", "D", "impl"]) if len(pt) else None
    rows = []
    for _, g in gpu.iterrows():
        for b, label in CPU_BASELINES.items():
            m = base[(base["impl"] == b)]
            for k in key:
                m = m[m[k] == g[k]]
            bt = m["total_ms"].iloc[0] if len(m) else np.nan
            sp = bt / g["total_ms"] if np.isfinite(bt) and np.isfinite(g["total_ms"]) and g["total_ms"] > 0 else np.nan
            note = []
            if not np.isfinite(g["total_ms"]):
                note.append(f"{g['impl']}: {g['skip_reason'] or g['status']}")
            if not len(m):
                note.append(f"{b} not in this job")
            elif not np.isfinite(bt):
                note.append(f"{b}: {m['skip_reason'].iloc[0] or m['status'].iloc[0]}")
            psp = ptime = np.nan
            if b == "cpu_serial" and ptot is not None and (g["T"], g["D"], g["impl"]) in ptot.index:
                prow = ptot.loc[(g["T"], g["D"], g["impl"])]
                psp, ptime = prow["speedup"], prow["time_ms"]
            rows.append({**{c: g[c] for c in ("source", "device_slug", "device_name", "hardware", "workload", "T", "D",
                                               "elements", "dtype", "granularity", "impl", "total_ms")},
                         "baseline": b, "baseline_label": label,
                         "baseline_hardware": m["hardware"].iloc[0] if len(m) else "",
                         "baseline_total_ms": bt, "speedup": sp, "paper_speedup": psp, "paper_total_ms": ptime,
                         "status": "ok" if np.isfinite(sp) else "skipped", "note": "; ".join(note)})
    df = pd.DataFrame(rows, columns=SPEEDUP_COLUMNS)
    for c in ("total_ms", "baseline_total_ms", "speedup", "paper_speedup", "paper_total_ms"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def provenance_table(records) -> pd.DataFrame:
    """One row per (source, device): what ran where, with which torch, commit and config."""
    rows = {}
    for r in records:
        p = r["provenance"]
        key = (r.get("_source", THIS_RUN), p.get("device_slug") or "unknown")
        d = rows.setdefault(key, {"source": key[0], "device_slug": key[1], "records": 0,
                                  **{k: set() for k in PROVENANCE_KEYS}})
        d["records"] += 1
        for k in PROVENANCE_KEYS:
            if p.get(k) not in (None, ""):
                d[k].add(str(p[k]))
    def joined(k, values):
        v = sorted(values)
        return f"{v[0]} to {v[-1]}" if k == "date" and len(v) > 1 else ", ".join(v)

    out = [{**d, **{k: joined(k, d[k]) for k in PROVENANCE_KEYS}} for d in rows.values()]
    return pd.DataFrame(out, columns=["source", "device_slug", "records", *PROVENANCE_KEYS])


# --- workloads and memory ------------------------------------------------------------------------

def paper_workloads(paper_dir=PAPER_DIR) -> list[dict]:
    """The paper's ten workloads (reports/paper/claims.yaml, ``grid``)."""
    with open(Path(paper_dir) / "claims.yaml") as f:
        return [dict(w) for w in yaml.safe_load(f)["grid"]]


def _normalise_grid(grid) -> list[dict]:
    """A config grid as a list of {name, T, D, dtypes}. Accepts a list of dicts ({T, D, name?, dtype? or
    dtypes?}), 'TxD' strings, (T, D) pairs, a DataFrame, or a dict holding one of those under 'grid'
    or 'workloads'."""
    if grid is None:
        return []
    if isinstance(grid, pd.DataFrame):
        grid = grid.to_dict("records")
    if isinstance(grid, dict):
        for k in ("grid", "workloads"):
            if k in grid:
                return _normalise_grid(grid[k])
        raise ValueError(f"a grid dict needs a 'grid' or 'workloads' key, got {sorted(grid)}")
    out = []
    for w in grid:
        if isinstance(w, str):
            T, D = (int(v) for v in w.lower().split("x")[:2])
            w = {"T": T, "D": D}
        elif isinstance(w, (tuple, list)):
            w = {"T": int(w[0]), "D": int(w[1])}
        w = dict(w)
        T, D = int(w["T"]), int(w["D"])
        dtypes = w.get("dtypes", w.get("dtype", "float32"))
        dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
        out.append({"name": w.get("name") or f"{T}x{D}", "T": T, "D": D, "dtypes": dtypes})
    return out


def workloads_table(grid, paper_dir=PAPER_DIR) -> pd.DataFrame:
    """The run's grid: shape, elements, fp32 bytes, and whether (and as what) the paper ran it."""
    paper = {(w["T"], w["D"]): w["name"] for w in paper_workloads(paper_dir)}
    merged: dict[tuple[int, int], dict] = {}  # one row per T x D; a grid flattened per dtype merges back
    for w in _normalise_grid(grid):
        m = merged.setdefault((w["T"], w["D"]), {**w, "dtypes": []})
        m["dtypes"] += [d for d in w["dtypes"] if d not in m["dtypes"]]
    rows = []
    for w in merged.values():
        rows.append({"workload": w["name"], "T": w["T"], "D": w["D"], "elements": w["T"] * w["D"],
                     "dtypes": ", ".join(w["dtypes"]), "fp32_bytes": w["T"] * w["D"] * metrics.FP32_BYTES,
                     "in_paper_grid": (w["T"], w["D"]) in paper, "paper_name": paper.get((w["T"], w["D"]), "")})
    cols = ["workload", "T", "D", "elements", "dtypes", "fp32_bytes", "in_paper_grid", "paper_name"]
    return pd.DataFrame(rows, columns=cols).sort_values(["elements", "T"], kind="stable").reset_index(drop=True)


SOURCE_DTYPE_BYTES = {"float32": metrics.FP32_BYTES, "float16": 2}


def memory_table(workloads, paper_dir=PAPER_DIR) -> pd.DataFrame:
    """Bytes of the fp32 (and fp16) cache vs INT8 + fp32 scales, per granularity, with the compression ratio.

    ``workloads``: anything :func:`workloads_table` accepts; duplicates (same T x D) appear once.
    Arithmetic: :func:`kvpack.study.metrics.memory_footprint`.
    """
    paper = {(w["T"], w["D"]): w["name"] for w in paper_workloads(paper_dir)}
    seen, rows = set(), []
    for w in _normalise_grid(workloads):
        if (w["T"], w["D"]) in seen:
            continue
        seen.add((w["T"], w["D"]))
        for dtype, nbytes in SOURCE_DTYPE_BYTES.items():
            for g in ("channel", "token"):
                m = metrics.memory_footprint(w["T"], w["D"], g, nbytes)
                rows.append({"workload": w["name"], "T": w["T"], "D": w["D"], "elements": w["T"] * w["D"],
                             "in_paper_grid": (w["T"], w["D"]) in paper, "source_dtype": dtype, "granularity": g,
                             **m, "scales_overhead_fraction": m["scales_bytes"] / m["compressed_bytes"],
                             "paper_claimed_ratio": 4.0 if dtype == "float32" else np.nan})
    cols = ["workload", "T", "D", "elements", "in_paper_grid", "source_dtype", "granularity", "original_bytes",
            "int8_bytes", "scales_bytes", "compressed_bytes", "compression_ratio", "scales_overhead_fraction",
            "paper_claimed_ratio"]
    return pd.DataFrame(rows, columns=cols)


# --- the paper's numbers ----------------------------------------------------------------------

def _read_paper_csv(paper_dir) -> pd.DataFrame:
    return pd.read_csv(Path(paper_dir) / "raw_results.csv")


def paper_table(paper_dir=PAPER_DIR) -> pd.DataFrame:
    """reports/paper/raw_results.csv, long: one row per (workload, impl, op), seconds -> ``time_ms``.

    ``impl`` 'cpu_serial' is the paper's CPU baseline; ``op`` is quantize, dequantize or
    'quant+dequant' (their total); ``speedup`` (theirs, vs their CPU) sits on the GPU totals.
    """
    raw = _read_paper_csv(paper_dir)
    rows = []
    for _, r in raw.iterrows():
        base = {"workload": r["test_case"], "T": int(r["T"]), "D": int(r["D"]),
                "elements": int(r["elements"])}
        for impl, prefix, device in [("cpu_serial", "cpu", "cpu")] + [(v, v, "cuda") for v in PAPER_VARIANTS]:
            for op, col in (("quantize", "quant_s"), ("dequantize", "dequant_s"), (QUANT_DEQUANT, "total_s")):
                sp = r.get(f"{prefix}_speedup", np.nan) if (op == QUANT_DEQUANT and device == "cuda") else np.nan
                # the paper's ops move 4N + N bytes (fp32 in, int8 out, or back)
                nbytes = 5 * base["elements"] * (2 if op == QUANT_DEQUANT else 1)
                rows.append({"source": PAPER_SOURCE if device == "cuda" else PAPER_CPU_SOURCE, **base,
                             "impl": impl, "device": device, "op": op, "time_ms": float(r[f"{prefix}_{col}"]) * 1e3,
                             "moved_bytes": nbytes, "speedup": float(sp)})
    df = pd.DataFrame(rows)
    df["achieved_gbps"] = gbps(df["moved_bytes"], df["time_ms"])
    return df


def paper_accuracy_table(paper_dir=PAPER_DIR) -> pd.DataFrame:
    """The paper's published errors per T x D (their CPU path; their GPU variants printed the same)."""
    raw = _read_paper_csv(paper_dir)
    return pd.DataFrame({"workload": raw["test_case"], "T": raw["T"].astype(int), "D": raw["D"].astype(int),
                         "elements": raw["elements"].astype(int), "paper_l2_error": raw["l2_error"],
                         "paper_max_abs_error": raw["max_abs_error"],
                         "paper_attention_score_error": raw["attention_mean_abs_error"]})


# --- what was skipped ------------------------------------------------------------------------

def skipped_rows(perf: pd.DataFrame, acc: pd.DataFrame) -> pd.DataFrame:
    """Rows a job did not measure, grouped by (source, device, impl, reason), with how many workloads."""
    parts = []
    for name, df in (("benchmark", perf), ("accuracy", acc)):
        if df is None or not len(df):
            continue
        s = df[df["status"] != "ok"]
        if len(s):
            s = s.assign(table=name, skip_reason=s["skip_reason"].fillna("").astype(str))
            parts.append(s.groupby(["table", "source", "device_slug", "impl", "status", "skip_reason"], dropna=False)
                         .agg(workloads=("workload", "nunique")).reset_index())
    cols = ["table", "source", "device_slug", "impl", "status", "skip_reason", "workloads"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _has_gpu_rows(perf: pd.DataFrame, source=None) -> pd.DataFrame:
    if perf is None or not len(perf):
        return pd.DataFrame(columns=PERFORMANCE_COLUMNS)
    m = (perf["device"] == "cuda") & (perf["status"] == "ok")
    if source is not None:
        m &= perf["source"] == source
    return perf[m]


def skip_notes(perf: pd.DataFrame, acc: pd.DataFrame | None = None) -> list[str]:
    """Plain sentences for the report's 'What was skipped': computed from the tables, never typed in."""
    notes = []
    mine = perf[perf["source"] == THIS_RUN] if perf is not None and len(perf) else pd.DataFrame(columns=PERFORMANCE_COLUMNS)
    ref_gpu = _has_gpu_rows(perf)
    ref_gpu = ref_gpu[ref_gpu["source"] != THIS_RUN]
    if len(mine) and not len(_has_gpu_rows(mine)):
        where = ", ".join(sorted(set(mine["device_name"].astype(str))))
        s = f"No CUDA GPU on this machine ({where}): GPU variants skipped."
        if len(ref_gpu):
            gpus = ", ".join(sorted({f"{h} ({src})" for h, src in zip(ref_gpu["hardware"], ref_gpu["source"])}))
            s += f" GPU rows shown come from the committed reference run on {gpus}."
        else:
            s += " No reference GPU run is present either: GPU claims are marked 'needs a CUDA GPU'."
        notes.append(s)
    elif not len(mine) and not len(ref_gpu):
        notes.append("No benchmark records at all: performance claims are not measurable here.")
    sk = skipped_rows(perf, acc)
    if len(sk):
        # the 'no CUDA device' rows are said above; list the rest
        rest = sk[~sk["skip_reason"].str.contains("no CUDA device", case=False, na=False)]
        for _, r in rest.iterrows():
            notes.append(f"{r['table']}: {r['impl']} on {r['device_slug']} ({r['source']}) {r['status']} "
                         f"on {r['workloads']} workload(s): {r['skip_reason'] or 'no reason given'}")
    return notes


# --- all tables at once ------------------------------------------------------------------------

@dataclass
class Tables:
    """Every table of one report, as DataFrames (empty frames where there is no data)."""
    performance: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PERFORMANCE_COLUMNS))
    accuracy: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ACCURACY_COLUMNS))
    memory: pd.DataFrame = field(default_factory=pd.DataFrame)
    workloads: pd.DataFrame = field(default_factory=pd.DataFrame)
    paper: pd.DataFrame = field(default_factory=pd.DataFrame)
    speedups: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPEEDUP_COLUMNS))
    claims: pd.DataFrame = field(default_factory=pd.DataFrame)
    provenance: pd.DataFrame = field(default_factory=pd.DataFrame)
    paper_l2: pd.DataFrame = field(default_factory=pd.DataFrame)
    decode: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_COLUMNS))
    decode_append: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_APPEND_COLUMNS))
    decode_accuracy: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_ACCURACY_COLUMNS))
    decode_int4: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_INT4_COLUMNS))
    decode_api: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_API_COLUMNS))
    decode_peers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECODE_PEERS_COLUMNS))
    e2e: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=E2E_COLUMNS))

    def as_dict(self) -> dict[str, pd.DataFrame]:
        return {n: getattr(self, n) for n in TABLE_NAMES}


def read_tables(tables_dir) -> Tables:
    """The CSVs :func:`kvpack.report.assemble.write_tables` wrote, back as a :class:`Tables` (missing or empty files -> empty frames)."""
    d, kw = Path(tables_dir), {}
    for name in TABLE_NAMES:
        p = d / f"{name}.csv"
        if p.exists() and p.stat().st_size > 0:
            try:
                df = pd.read_csv(p, keep_default_na=True)
            except pd.errors.EmptyDataError:
                continue
            for c in ("skip_reason", "note", "record_format", "our_value", "our_source", "device"):
                if c in df:
                    df[c] = df[c].astype(object).fillna("")
            kw[name] = df
    return Tables(**kw)


def fmt(x, digits: int = 3) -> str:
    """A number for people: '1.23e+09', '0.00394', '1,694'; '' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e7):
        return f"{int(x):,}"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e7):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if ax < 1 else f"{x:,.{max(0, digits - len(str(int(ax))))}f}" if ax < 1000 else f"{x:,.0f}"


# --- compact views for the report -------------------------------------------------------------

def performance_summary(perf: pd.DataFrame) -> pd.DataFrame:
    """quant + dequant median time (ms) per workload (rows) and impl (columns), one block per machine;
    fp32 and fp16/bf16 rows apart (dtype is part of the row key)."""
    tot = quant_dequant_table(perf)
    tot = tot[tot["total_ms"].notna()] if len(tot) else tot
    if not len(tot):
        return pd.DataFrame()
    w = tot.pivot_table(index=["source", "device_slug", "workload", "T", "D", "dtype", "granularity"],
                        columns="impl", values="total_ms", aggfunc="min")
    order = [c for c in ("cpu_serial", "cpu_torch", *GPU_IMPLS) if c in w.columns]
    w = w[order + [c for c in w.columns if c not in order]]
    w.columns = [f"{c}_ms" for c in w.columns]
    return w.reset_index().sort_values(["source", "device_slug", "dtype", "T", "D"], kind="stable")


def speedup_summary(speedups: pd.DataFrame) -> pd.DataFrame:
    """Speedups per workload: ours over cpu_serial and cpu_torch for each GPU impl, the paper's beside."""
    s = speedups[speedups["speedup"].notna()] if speedups is not None and len(speedups) else pd.DataFrame()
    if not len(s):
        return pd.DataFrame()
    idx = ["source", "device_slug", "workload", "T", "D", "dtype", "granularity"]
    w = s.pivot_table(index=idx, columns=["impl", "baseline"], values="speedup", aggfunc="max")
    w.columns = [f"{i}_vs_{b}" for i, b in w.columns]
    p = s[s["baseline"] == "cpu_serial"].pivot_table(index=idx, columns="impl", values="paper_speedup", aggfunc="max")
    p.columns = [f"paper_{i}_vs_cpu" for i in p.columns]
    out = w.join(p, how="left").reset_index()
    return out.sort_values(["source", "device_slug", "dtype", "T", "D"], kind="stable")


def bandwidth_summary(perf: pd.DataFrame, op: str = "quantize") -> pd.DataFrame:
    """Achieved GB/s of ``op`` per workload (rows) and impl (columns), with the copy ceiling of the same
    job; GPU rows where a machine has them, else its CPU rows."""
    if perf is None or not len(perf):
        return pd.DataFrame()
    p = perf[(perf["op"] == op) & (perf["status"] == "ok") & perf["achieved_gbps"].notna()]
    if not len(p):
        return pd.DataFrame()
    has_gpu = p.groupby(["source", "device_slug"])["device"].transform(lambda d: (d == "cuda").any())
    p = p[(p["device"] == "cuda") | ~has_gpu]
    idx = ["source", "device_slug", "device", "workload", "T", "D", "dtype", "granularity"]
    w = p.pivot_table(index=idx, columns="impl", values="achieved_gbps", aggfunc="max")
    order = [c for c in ("cpu_serial", "cpu_torch", *GPU_IMPLS, *PEERS) if c in w.columns]
    w = w[order]
    w.columns = [f"{c}_gbps" for c in w.columns]
    ceil = p.groupby(idx)["copy_ceiling_gbps"].max().rename("copy_ceiling_gbps")
    return w.join(ceil).reset_index().sort_values(["source", "device_slug", "dtype", "T", "D"], kind="stable")


def for_display(df: pd.DataFrame, columns=None, digits: int = 3) -> pd.DataFrame:
    """A copy with numbers as short strings (see :func:`fmt`), for the report; ``columns`` selects and orders."""
    if df is None or not len(df):
        return pd.DataFrame({"": ["(no rows)"]})
    d = df[[c for c in columns if c in df.columns]] if columns else df
    d = d.copy()
    for c in d.columns:
        if d[c].dtype == object or pd.api.types.is_string_dtype(d[c]):
            d[c] = d[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
        elif pd.api.types.is_bool_dtype(d[c]):
            continue
        elif c in ("T", "D"):
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else str(int(v)))
        elif pd.api.types.is_float_dtype(d[c]) or pd.api.types.is_integer_dtype(d[c]):
            d[c] = d[c].map(lambda v: fmt(float(v), digits) if pd.notna(v) else "")
    return d.reset_index(drop=True)


__all__ = [
    "CPU_BASELINES",
    "GPU_IMPLS",
    "PAPER_CPU_SOURCE",
    "PAPER_SOURCE",
    "PAPER_VARIANTS",
    "PEERS",
    "TABLE_NAMES",
    "THIS_RUN",
    "Tables",
    "accuracy_table",
    "bandwidth_summary",
    "collect_records",
    "decode_accuracy_table",
    "decode_append_table",
    "decode_table",
    "decode_view",
    "e2e_table",
    "e2e_view",
    "fmt",
    "for_display",
    "gbps",
    "load_records",
    "memory_table",
    "paper_accuracy_table",
    "paper_table",
    "paper_workloads",
    "performance_summary",
    "performance_table",
    "provenance_table",
    "quant_dequant_table",
    "read_tables",
    "reference_record_paths",
    "skip_notes",
    "skipped_rows",
    "source_device_label",
    "source_label",
    "speedup_summary",
    "speedup_table",
    "workloads_table",
]
