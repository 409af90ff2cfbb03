"""kvpack.report.tables on SYNTHETIC records (docs/records.md format) written to tmp dirs.

Nothing here is a measurement: GPU rows are fake, labelled 'TEST-GPU (synthetic test data)'. The
builders below are shared with test_claims.py and test_figures.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from kvpack.report import assemble
from kvpack.report import tables as kt
from kvpack.study import metrics

TEST_GPU = "TEST-GPU (synthetic test data, not a measurement)"
TEST_CPU = "TEST-CPU (synthetic test data)"
PAPER_DIR = kt.PAPER_DIR

# default fake GPU model: time = bytes / bandwidth * factor + launch; vectorized fastest, tiled no gain
GPU_FACTORS = {"naive": 1.0, "tiled": 1.03, "coarsened": 0.95, "vectorized": 0.7, "fast": 0.5,
               "torch_eager": 2.0, "torch_compile": 0.8, "torch_quantize_per_channel": 1.5}
GPU_GBPS, LAUNCH_MS = 2000.0, 0.005
CPU_SERIAL_NS, CPU_TORCH_NS = 20.0, 0.5  # per element, per op


def provenance(slug: str, gpu: bool) -> dict:
    return {"device_slug": slug, "device": "cuda" if gpu else "cpu", "device_name": TEST_GPU if gpu else TEST_CPU,
            "gpu_name": TEST_GPU if gpu else None, "driver": "0.0" if gpu else None, "cuda": "0.0" if gpu else None,
            "torch": "0.0+test", "cpu_model": TEST_CPU, "cpu_threads": 2, "git_commit": "0" * 40,
            "config_hash": f"test-{slug}", "date": "2026-01-01T00:00:00+00:00", "python": "3.x",
            "hostname_hash": "test"}


def _row(impl, family, device, op, median_ms=None, nbytes=None, status="ok", reason="", granularity="channel"):
    ok = status == "ok"
    return {"impl": impl, "family": family, "device": device, "op": op, "granularity": granularity,
            "status": status, "skip_reason": reason,
            "median_ms": median_ms if ok else None, "p10_ms": median_ms * 0.95 if ok else None,
            "p90_ms": median_ms * 1.05 if ok else None, "min_ms": median_ms * 0.9 if ok else None,
            "mean_ms": median_ms if ok else None, "repeats": 20 if ok else 0, "bytes": nbytes if ok else None,
            "gbps": (nbytes / (median_ms * 1e-3) / 1e9) if ok else None, "fraction_of_copy": None,
            "peak_memory_bytes": None, "bit_exact": True if ok else None}


def benchmark_record(T, D, slug, gpu: bool, factors=None, serial_max_elements=1 << 22, dtype="float32") -> dict:
    n = T * D
    factors = {**GPU_FACTORS, **(factors or {})}
    nb = 5 * n  # fp32 in, int8 out
    rows = []
    for impl, ns in (("cpu_serial", CPU_SERIAL_NS), ("cpu_torch", CPU_TORCH_NS)):
        for op in ("scales", "quantize", "dequantize"):
            if impl == "cpu_serial" and n > serial_max_elements:
                rows.append(_row(impl, "cpu_baseline", "cpu", op, status="skipped",
                                 reason=f"{n} elements > cpu_serial_max_elements={serial_max_elements}"))
            else:
                rows.append(_row(impl, "cpu_baseline", "cpu", op, n * ns * 1e-6, nb if op != "scales" else 4 * n))
    if gpu:
        for impl in ("naive", "tiled", "coarsened", "vectorized", "fast", "torch_eager", "torch_compile",
                     "torch_quantize_per_channel"):
            fam = "kvpack" if impl in kt.GPU_IMPLS else "peer"
            for op in ("quantize", "dequantize"):
                rows.append(_row(impl, fam, "cuda", op, nb / (GPU_GBPS * 1e9) * 1e3 * factors[impl] + LAUNCH_MS, nb))
        ceiling = {"copy_gbps": 2500.0, "copy_bytes": 1 << 30, "device": "cuda"}
    else:
        for impl in ("naive", "tiled", "coarsened", "vectorized", "fast"):
            rows.append(_row(impl, "kvpack", "cuda", "quantize", status="skipped", reason="no CUDA device on this machine"))
        ceiling = {"copy_gbps": 20.0, "copy_bytes": 1 << 28, "device": "cpu"}
    return {"kind": "benchmark",
            "workload": {"name": f"{T}x{D}", "T": T, "D": D, "dtype": dtype, "elements": n, "seed": 0},
            "provenance": provenance(slug, gpu), "ceiling": ceiling, "rows": rows}


def accuracy_record(T, D, slug, gpu: bool, max_abs=None, attention=None, with_predictions=True) -> dict:
    p = metrics.paper_predictions(T, D)
    mem = metrics.memory_footprint(T, D)
    impls = [("cpu_torch", "cpu")] + ([("vectorized", "cuda"), ("fast", "cuda")] if gpu else [])
    rows = []
    for impl, dev in impls:
        r = {"impl": impl, "device": dev, "granularity": "channel", "status": "ok", "skip_reason": "",
             "l2_error": p["predicted_l2_error"] * 1.001,
             "max_abs_error": max_abs if max_abs is not None else p["predicted_max_abs_error"] * 0.9999,
             "attention_score_error": attention if attention is not None else p["predicted_attention_score_error"] * 0.98,
             "bit_exact_vs_reference": True, "original_bytes": mem["original_bytes"],
             "compressed_bytes": mem["compressed_bytes"], "compression_ratio": mem["compression_ratio"]}
        if with_predictions:
            r.update({k: v for k, v in p.items()})
        rows.append(r)
    if not gpu:
        rows.append({"impl": "vectorized", "device": "cuda", "granularity": "channel", "status": "skipped",
                     "skip_reason": "no CUDA device on this machine"})
    return {"kind": "accuracy", "workload": {"name": f"{T}x{D}", "T": T, "D": D, "dtype": "float32",
                                             "elements": T * D, "seed": 0},
            "provenance": provenance(slug, gpu), "rows": rows}


CPU_GRID = [(1024, 64), (2048, 128), (4096, 256)]
GPU_GRID = [(1024, 64), (2048, 128), (16384, 256), (65536, 256), (131072, 256)]


def write_run(root: Path, slug: str, gpu: bool, grid, bench_kw=None, acc_kw=None) -> tuple[list[Path], list[Path]]:
    """Write one run's records under root/{benchmark,accuracy}/TxD_float32.json (the reference dir layout)."""
    bench, acc = [], []
    for T, D in grid:
        for kind, rec, out in (("benchmark", benchmark_record(T, D, slug, gpu, **(bench_kw or {})), bench),
                               ("accuracy", accuracy_record(T, D, slug, gpu, **(acc_kw or {})), acc)):
            p = root / kind / f"{T}x{D}_float32.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(rec))
            out.append(p)
    return bench, acc


def cpu_only_tables(tmp_path, **kw) -> kt.Tables:
    b, a = write_run(tmp_path / "run", "test-cpu", False, CPU_GRID)
    return assemble.build_tables(b, a, [], PAPER_DIR, [{"T": T, "D": D} for T, D in CPU_GRID], **kw)


def cpu_plus_gpu_reference(tmp_path, bench_kw=None, acc_kw=None, grid=GPU_GRID) -> kt.Tables:
    b, a = write_run(tmp_path / "run", "test-cpu", False, CPU_GRID)
    ref = tmp_path / "reference" / "test-gpu"
    write_run(ref, "test-gpu", True, grid, bench_kw, acc_kw)
    return assemble.build_tables(b, a, [ref], PAPER_DIR, [{"T": T, "D": D} for T, D in CPU_GRID])


# --- tests ---------------------------------------------------------------------------------------

def test_performance_columns_and_gbps(tmp_path):
    t = cpu_only_tables(tmp_path)
    p = t.performance
    for c in ("source", "device_slug", "device_name", "workload", "impl", "op", "status", "skip_reason", "median_ms",
              "moved_bytes", "achieved_gbps", "copy_ceiling_gbps", "fraction_of_copy"):
        assert c in p.columns
    ok = p[p["status"] == "ok"]
    assert len(ok) == len(CPU_GRID) * 2 * 3
    expected = ok["moved_bytes"] / (ok["median_ms"] * 1e-3) / 1e9
    pd.testing.assert_series_equal(ok["achieved_gbps"], expected, check_names=False)
    assert (ok["fraction_of_copy"] - ok["achieved_gbps"] / 20.0).abs().max() < 1e-12
    assert set(p["source"]) == {kt.THIS_RUN}


def test_skipped_rows_stay_with_reason(tmp_path):
    t = cpu_only_tables(tmp_path)
    s = t.performance[t.performance["status"] == "skipped"]
    assert len(s) == len(CPU_GRID) * 5
    assert (s["skip_reason"] == "no CUDA device on this machine").all()
    assert s["median_ms"].isna().all()
    notes = kt.skip_notes(t.performance, t.accuracy)
    assert any("No CUDA GPU on this machine" in n for n in notes)
    assert any("needs a CUDA GPU" in n for n in notes)


def test_reference_merge_keeps_both_sources(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path)
    p = t.performance
    assert set(p["source"]) == {kt.THIS_RUN, "reference: test-gpu"}
    assert set(p["device_slug"]) == {"test-cpu", "test-gpu"}
    gpu = p[(p["device"] == "cuda") & (p["status"] == "ok")]
    assert set(gpu["hardware"]) == {TEST_GPU}
    assert (gpu["source"] == "reference: test-gpu").all()
    notes = kt.skip_notes(p, t.accuracy)
    assert any("committed reference run on" in n and TEST_GPU in n for n in notes)


def test_same_slug_in_run_and_reference_not_clobbered(tmp_path):
    b, a = write_run(tmp_path / "run", "same-slug", True, [(1024, 64)])
    ref = tmp_path / "ref" / "h100"
    write_run(ref, "same-slug", True, [(1024, 64)], bench_kw={"factors": {"vectorized": 2.0}})
    t = assemble.build_tables(b, a, [ref], PAPER_DIR, None)
    v = t.performance[(t.performance["impl"] == "vectorized") & (t.performance["op"] == "quantize")]
    assert len(v) == 2 and v["median_ms"].nunique() == 2
    s = t.speedups[(t.speedups["impl"] == "vectorized") & (t.speedups["baseline"] == "cpu_torch")]
    assert set(s["source"]) == {kt.THIS_RUN, "reference: h100"}


def test_speedup_arithmetic(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path)
    T, D = 2048, 128
    n, nb = T * D, 5 * T * D
    vec = 2 * (nb / (GPU_GBPS * 1e9) * 1e3 * GPU_FACTORS["vectorized"] + LAUNCH_MS)
    serial = 2 * n * CPU_SERIAL_NS * 1e-6
    honest = 2 * n * CPU_TORCH_NS * 1e-6
    mine = t.speedups[t.speedups["source"] == kt.THIS_RUN]
    assert len(mine) and mine["speedup"].isna().all()  # CPU-only run: GPU rows skipped, kept with the reason
    assert mine["note"].str.contains("no CUDA device").all()
    s = t.speedups[t.speedups["source"] == "reference: test-gpu"].set_index(["T", "D", "impl", "baseline"])
    assert s.loc[(T, D, "vectorized", "cpu_serial"), "speedup"] == pytest.approx(serial / vec)
    assert s.loc[(T, D, "vectorized", "cpu_torch"), "speedup"] == pytest.approx(honest / vec)
    assert s.loc[(T, D, "vectorized", "cpu_serial"), "total_ms"] == pytest.approx(vec)
    # the paper's speedup beside, on the serial baseline only
    assert s.loc[(T, D, "vectorized", "cpu_serial"), "paper_speedup"] == pytest.approx(178.34)
    assert math.isnan(s.loc[(T, D, "vectorized", "cpu_torch"), "paper_speedup"])
    assert math.isnan(s.loc[(T, D, "fast", "cpu_serial"), "paper_speedup"])
    assert set(t.speedups["baseline_label"]) == set(kt.CPU_BASELINES.values())


def test_speedup_baseline_skipped_gives_nan_with_note(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path, bench_kw={"serial_max_elements": 1 << 20})
    s = t.speedups[(t.speedups["baseline"] == "cpu_serial") & (t.speedups["elements"] > 1 << 20)]
    assert len(s) and s["speedup"].isna().all()
    assert s["note"].str.contains("cpu_serial_max_elements").all()
    assert (s["status"] == "skipped").all()


def test_accuracy_predictions_and_ratio(tmp_path):
    t = cpu_only_tables(tmp_path)
    a = t.accuracy[t.accuracy["status"] == "ok"]
    assert {"l2_error", "predicted_l2_error", "l2_error_ratio", "paper_l2_error"} <= set(a.columns)
    assert (a["l2_error_ratio"] - 1.001).abs().max() < 1e-9
    small = a[(a["T"] == 1024) & (a["D"] == 64)].iloc[0]
    assert small["paper_max_abs_error"] == pytest.approx(0.003936)
    sk = t.accuracy[t.accuracy["status"] == "skipped"]
    assert len(sk) == len(CPU_GRID) and (sk["skip_reason"] != "").all()


def test_accuracy_prediction_fallback_to_closed_form(tmp_path):
    b, a = write_run(tmp_path, "x", False, [(1024, 64)], acc_kw={"with_predictions": False})
    acc = assemble.build_tables(b, a, [], PAPER_DIR, None).accuracy
    row = acc[acc["status"] == "ok"].iloc[0]
    assert row["predicted_max_abs_error"] == pytest.approx(1 / 254)
    assert "closed form" in row["prediction_source"]


def test_memory_table():
    m = kt.memory_table([{"T": 1024, "D": 64}, "1024x64", (2048, 128)])
    assert len(m) == 2 * 2 * 2  # duplicates once; fp32/fp16 x channel/token
    r = m[(m["T"] == 1024) & (m["source_dtype"] == "float32") & (m["granularity"] == "channel")].iloc[0]
    assert r["original_bytes"] == 1024 * 64 * 4
    assert r["compressed_bytes"] == 1024 * 64 + 64 * 4
    assert r["compression_ratio"] == pytest.approx(1024 * 64 * 4 / (1024 * 64 + 256))
    h = m[(m["T"] == 1024) & (m["source_dtype"] == "float16") & (m["granularity"] == "token")].iloc[0]
    assert h["compression_ratio"] == pytest.approx(1024 * 64 * 2 / (1024 * 64 + 1024 * 4))


def test_workloads_table_formats():
    w = kt.workloads_table({"grid": [{"name": "Small", "T": 2048, "D": 128, "dtypes": ["float32", "float16"]},
                                     {"T": 100, "D": 3}]})
    assert list(w["T"]) == [100, 2048]
    assert w.set_index("T").loc[2048, "in_paper_grid"] and w.set_index("T").loc[2048, "paper_name"] == "Small"
    assert w.set_index("T").loc[2048, "dtypes"] == "float32, float16"
    assert w.set_index("T").loc[100, "fp32_bytes"] == 1200


def test_paper_table_long():
    p = kt.paper_table()
    assert len(p) == 10 * 5 * 3
    assert {"workload", "impl", "op", "time_ms", "speedup", "achieved_gbps"} <= set(p.columns)
    r = p[(p["workload"] == "Realistic V. Large LLM workload") & (p["impl"] == "vectorized") & (p["op"] == "quant+dequant")]
    assert r["time_ms"].iloc[0] == pytest.approx(46.905)
    assert r["speedup"].iloc[0] == pytest.approx(1793.3)
    c = p[(p["impl"] == "cpu_serial") & (p["op"] == "quantize") & (p["T"] == 1024)]
    assert c["time_ms"].iloc[0] == pytest.approx(0.645)
    assert set(p[p["impl"] == "cpu_serial"]["source"]) == {kt.PAPER_CPU_SOURCE}


def test_write_and_read_tables(tmp_path):
    b, a = write_run(tmp_path / "run", "test-cpu", False, CPU_GRID)
    ref = tmp_path / "reference" / "test-gpu"
    write_run(ref, "test-gpu", True, GPU_GRID)
    paths = assemble.write_tables(b, a, [ref], PAPER_DIR, [{"T": T, "D": D} for T, D in CPU_GRID], tmp_path / "tables")
    assert set(paths) == set(kt.TABLE_NAMES)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    t = kt.read_tables(tmp_path / "tables")
    assert len(t.performance) and len(t.speedups) and len(t.claims) >= 8
    assert set(t.provenance["source"]) == {kt.THIS_RUN, "reference: test-gpu"}
    # reading the CSVs back gives the same speedups
    s = kt.speedup_table(t.performance, t.paper)
    pd.testing.assert_series_equal(s["speedup"].reset_index(drop=True), t.speedups["speedup"].reset_index(drop=True),
                                   check_names=False)


def test_bad_record_is_refused(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"kind": "benchmark", "rows": []}))
    with pytest.raises(ValueError, match="not a kvpack record"):
        kt.load_records([p])


def test_decode_view_shows_the_paged_rows_only_where_timed():
    """A decode record whose rows timed the paged kernel (decode.page_sizes) shows its time and its
    ratio to the contiguous kernel beside it; page sizes no row timed leave no empty columns."""
    from kvpack.report import tables as tb

    base = {"T": 4096, "batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "granularity": "token",
            "status": "ok", "sdpa_best": "cudnn", "sdpa_cudnn_median_ms": 0.02, "sdpa_best_median_ms": 0.02,
            "fused_median_ms": 0.016}
    paged = {**base, "paged_p16_median_ms": 0.017, "paged_p16_vs_fused": 0.016 / 0.017, "paged_p16_equals_fused": True}
    prov = {"device_slug": "h100", "gpu_name": "NVIDIA H100"}
    view = tb.decode_view(tb.decode_table([{"kind": "decode", "provenance": prov, "rows": [paged], "workload": {}}]))
    assert view["paged_p16_median_ms"].tolist() == [0.017] and "paged_p64_median_ms" not in view
    plain = tb.decode_view(tb.decode_table([{"kind": "decode", "provenance": prov, "rows": [base], "workload": {}}]))
    assert not [c for c in plain.columns if c.startswith("paged_")]
