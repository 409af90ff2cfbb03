"""kvpack.report.claims: verdicts computed from constructed (SYNTHETIC) tables, and the paper's L2 check on the
real reports/paper/raw_results.csv."""

from __future__ import annotations

import pytest
import yaml
from test_tables import (  # the synthetic record builders (tests/ is on sys.path under pytest)
    GPU_GRID,
    PAPER_DIR,
    cpu_only_tables,
    cpu_plus_gpu_reference,
    write_run,
)

from kvpack.report import assemble
from kvpack.report import claims as kc
from kvpack.report import tables as kt

GPU_CLAIMS = ("max_speedup", "overhead_range", "vectorized_fastest", "tiling_no_gain", "speedup_grows_with_size")
LLM_GRID = [(131072, 1024), (131072, 2048), (131072, 4096), (131072, 8192)]
REF_GPU = "reference: test-gpu"  # the source of cpu_plus_gpu_reference's GPU rows


def verdicts(t: kt.Tables, source: str = kt.THIS_RUN) -> dict[str, str]:
    """claim_id -> the verdict judged on ``source`` (one row per claim and source)."""
    c = t.claims[t.claims["source"] == source]
    assert len(c) and c["claim_id"].is_unique, f"no single row per claim for {source!r}"
    return dict(zip(c["claim_id"], c["verdict"]))


def row(t: kt.Tables, cid: str, source: str = kt.THIS_RUN):
    c = t.claims[(t.claims["claim_id"] == cid) & (t.claims["source"] == source)]
    assert len(c) == 1, (cid, source, len(c))
    return c.iloc[0]


def test_every_paper_claim_has_a_row_and_columns(tmp_path):
    t = cpu_only_tables(tmp_path)
    with open(PAPER_DIR / "claims.yaml") as f:
        ids = [c["id"] for c in yaml.safe_load(f)["claims"]]
    assert list(t.claims["claim_id"])[: len(ids)] == ids
    assert {"claim_id", "text", "paper_value", "source", "device_slug", "device", "our_value", "our_source", "verdict",
            "note"} <= set(t.claims.columns)
    assert set(t.claims["source"]) == {kt.THIS_RUN} and set(t.claims["device"]) == {"TEST-CPU (synthetic test data)"}
    assert set(t.claims["verdict"]) <= set(kc.VERDICTS)


def test_cpu_only_gpu_claims_need_a_gpu(tmp_path):
    v = verdicts(cpu_only_tables(tmp_path))
    for cid in GPU_CLAIMS:
        assert v[cid] == kc.NEEDS_GPU, cid
    assert v["memory_reduction"] == kc.REPRODUCED
    assert v["reconstruction_error"] == kc.REPRODUCED
    assert v["attention_error_8k"] == kc.NOT_MEASURABLE  # D = 8192 not in the grid


def test_attention_8k_uses_closed_form_when_not_measured(tmp_path):
    r = row(cpu_only_tables(tmp_path), "attention_error_8k")
    assert "closed form" in r["our_value"] and "not measured at D = 8192" in r["note"]
    assert float(r["our_value"].split()[0]) == pytest.approx(0.0948, abs=2e-4)


def test_attention_8k_measured(tmp_path):
    b, a = write_run(tmp_path / "ok", "c", False, [(1024, 8192)])
    t = assemble.build_tables(b, a, [], PAPER_DIR, None)
    assert verdicts(t)["attention_error_8k"] == kc.REPRODUCED
    b, a = write_run(tmp_path / "bad", "c", False, [(1024, 8192)], acc_kw={"attention": 0.12})
    t = assemble.build_tables(b, a, [], PAPER_DIR, None)
    assert verdicts(t)["attention_error_8k"] == kc.NOT_REPRODUCED
    assert row(t, "attention_error_8k")["our_value"] == "0.1200"


def test_reconstruction_error_not_reproduced(tmp_path):
    b, a = write_run(tmp_path, "c", False, [(1024, 64)], acc_kw={"max_abs": 0.005})
    t = assemble.build_tables(b, a, [], PAPER_DIR, None)
    assert verdicts(t)["reconstruction_error"] == kc.NOT_REPRODUCED


def test_gpu_reference_claims(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path)
    v = verdicts(t, REF_GPU)
    assert v["vectorized_fastest"] == kc.REPRODUCED
    assert v["tiling_no_gain"] == kc.REPRODUCED
    assert v["speedup_grows_with_size"] == kc.REPRODUCED
    assert v["max_speedup"] == kc.REPRODUCED
    assert v["overhead_range"] == kc.NOT_MEASURABLE  # T = 131072, D >= 1024 not in the synthetic grid
    r = row(t, "max_speedup", REF_GPU)
    assert REF_GPU in r["our_source"]
    assert "vs cpu_serial" in r["our_value"] and "vs cpu_torch" in r["our_value"]
    # the number is the largest vectorized speedup over cpu_serial in the speedups table
    s = t.speedups[(t.speedups["impl"] == "vectorized") & (t.speedups["baseline"] == "cpu_serial")]
    assert r["our_number"] == pytest.approx(s["speedup"].max())


def test_vectorized_not_fastest(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path, bench_kw={"factors": {"vectorized": 1.2}})
    assert verdicts(t, REF_GPU)["vectorized_fastest"] == kc.NOT_REPRODUCED
    assert "coarsened" in row(t, "vectorized_fastest", REF_GPU)["note"]


def test_tiling_gain_is_not_reproduced(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path, bench_kw={"factors": {"tiled": 0.6}})
    assert verdicts(t, REF_GPU)["tiling_no_gain"] == kc.NOT_REPRODUCED
    # within 10 % counts as no gain
    t = cpu_plus_gpu_reference(tmp_path / "b", bench_kw={"factors": {"tiled": 0.93}})
    assert verdicts(t, REF_GPU)["tiling_no_gain"] == kc.REPRODUCED


def test_max_speedup_too_small(tmp_path):
    # a GPU 100x slower than the default model: speedups over cpu_serial far below 1,694 / 2
    t = cpu_plus_gpu_reference(tmp_path, bench_kw={"factors": {k: 100.0 for k in kt.GPU_IMPLS}})
    assert verdicts(t, REF_GPU)["max_speedup"] == kc.NOT_REPRODUCED


def test_max_speedup_serial_skipped_everywhere(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path, bench_kw={"serial_max_elements": 1})
    v = verdicts(t, REF_GPU)
    assert v["max_speedup"] == kc.NOT_MEASURABLE
    assert "vs cpu_torch" in row(t, "max_speedup", REF_GPU)["note"]
    assert v["speedup_grows_with_size"] == kc.NOT_MEASURABLE


def test_overhead_range(tmp_path):
    # synthetic rows at the paper's LLM shapes; default model: 0.7 to 5.4 ms, under the paper's 58 ms
    t = cpu_plus_gpu_reference(tmp_path, grid=LLM_GRID, bench_kw={"serial_max_elements": 1})
    assert verdicts(t, REF_GPU)["overhead_range"] == kc.REPRODUCED
    t = cpu_plus_gpu_reference(tmp_path / "slow", grid=LLM_GRID, bench_kw={"factors": {"naive": 15.0}})
    assert verdicts(t, REF_GPU)["overhead_range"] == kc.NOT_REPRODUCED  # naive at D = 8192: ~80 ms


def test_speedup_shrinking_with_size_not_reproduced(tmp_path):
    t = cpu_plus_gpu_reference(tmp_path)
    # make the vectorized GPU time grow like N^1.5 (the CPU's grows like N): speedup falls with size
    perf = t.performance.copy()
    m = (perf["impl"] == "vectorized") & (perf["device"] == "cuda") & (perf["status"] == "ok")
    perf.loc[m, "median_ms"] = perf.loc[m, "elements"] ** 1.5 * 1e-9
    t.performance, t.speedups = perf, kt.speedup_table(perf, t.paper)
    t.claims = kc.claims_table(t)
    assert verdicts(t, REF_GPU)["speedup_grows_with_size"] == kc.NOT_REPRODUCED


def test_each_gpu_judged_on_its_own(tmp_path):
    b, a = write_run(tmp_path / "run", "cpu", False, [(1024, 64)])
    r1, r2 = tmp_path / "ref" / "gpu-a", tmp_path / "ref" / "gpu-b"
    write_run(r1, "gpu-a", True, GPU_GRID)
    write_run(r2, "gpu-b", True, GPU_GRID, bench_kw={"factors": {"vectorized": 1.2}})
    t = assemble.build_tables(b, a, [r1, r2], PAPER_DIR, None)
    assert list(dict.fromkeys(t.claims["source"])) == [kt.THIS_RUN, "reference: gpu-a", "reference: gpu-b"]
    assert verdicts(t, "reference: gpu-a")["vectorized_fastest"] == kc.REPRODUCED
    assert verdicts(t, "reference: gpu-b")["vectorized_fastest"] == kc.NOT_REPRODUCED
    assert "gpu-a" not in row(t, "vectorized_fastest", "reference: gpu-b")["note"]  # each judged on its own rows
    side = kc.claims_side_by_side(t.claims).set_index("claim_id")
    assert list(side.columns) == ["text", "paper_value", "this run: cpu", "reference: gpu-a", "reference: gpu-b",
                                  "summary"]
    assert side.loc["vectorized_fastest", "summary"] == (
        "reproduced on reference: gpu-a; not reproduced on reference: gpu-b; needs a CUDA GPU on this run: cpu")


def test_a_small_gpu_run_does_not_hide_a_references_full_grid(tmp_path):
    """Issue 12: this run measured the quick grid on a GPU (up to 65536x256), a reference directory holds the
    paper's full grid (the LLM shapes T = 131072, D = 1024..8192). Until each source was judged on its own, the
    verdict came from this run alone ('not measurable here' for overhead_range, max_speedup at 65536x256) and
    the reference's verdicts sat in the note."""
    quick = [(1024, 64), (2048, 128), (16384, 256), (65536, 256)]
    b, a = write_run(tmp_path / "run", "small-gpu", True, quick)
    ref = tmp_path / "reference" / "full-gpu"
    write_run(ref, "full-gpu", True, GPU_GRID + LLM_GRID, bench_kw={"serial_max_elements": 1 << 31})
    t = assemble.build_tables(b, a, [ref], PAPER_DIR, [{"T": T, "D": D} for T, D in quick])
    mine, full = verdicts(t), verdicts(t, "reference: full-gpu")
    assert mine["overhead_range"] == kc.NOT_MEASURABLE  # this run's grid has no LLM shape: its own verdict
    assert full["overhead_range"] == kc.REPRODUCED      # ... and the reference's full grid keeps its own
    assert row(t, "overhead_range", "reference: full-gpu")["our_number"] > 0
    assert "65536x256" in row(t, "max_speedup")["our_value"]
    assert "131072x8192" in row(t, "max_speedup", "reference: full-gpu")["our_value"]
    assert mine["attention_error_8k"] == kc.NOT_MEASURABLE and full["attention_error_8k"] == kc.REPRODUCED
    for cid in GPU_CLAIMS:
        assert "also" not in row(t, cid)["note"], cid  # nothing of the other source leaks into a verdict
        assert full[cid] == kc.REPRODUCED, cid
    # the reference's number is its own: the largest vectorized speedup over cpu_serial in its rows only
    s = t.speedups[(t.speedups["impl"] == "vectorized") & (t.speedups["baseline"] == "cpu_serial")
                   & (t.speedups["source"] == "reference: full-gpu")]
    assert row(t, "max_speedup", "reference: full-gpu")["our_number"] == pytest.approx(s["speedup"].max())
    side = kc.claims_side_by_side(t.claims).set_index("claim_id")
    assert side.loc["overhead_range", "summary"] == (
        "reproduced on reference: full-gpu; not measurable here on this run: small-gpu")
    assert side.loc["overhead_range", "this run: small-gpu"] == kc.NOT_MEASURABLE


def test_a_source_without_gpu_rows_keeps_its_own_verdict(tmp_path):
    """This run on a CPU beside a GPU reference: the CPU run's GPU claims need a GPU, the reference's stand,
    and the CPU-only claims are judged on each source's own rows."""
    t = cpu_plus_gpu_reference(tmp_path)
    mine, ref = verdicts(t), verdicts(t, REF_GPU)
    for cid in GPU_CLAIMS:
        assert mine[cid] == kc.NEEDS_GPU and "skipped" in row(t, cid)["note"], cid
    assert ref["max_speedup"] == ref["vectorized_fastest"] == kc.REPRODUCED
    assert mine["reconstruction_error"] == ref["reconstruction_error"] == kc.REPRODUCED
    assert "this run" in row(t, "reconstruction_error")["our_source"]
    assert REF_GPU not in row(t, "reconstruction_error")["our_source"]
    assert mine["decode_overhead"] == kc.NEEDS_GPU            # a CPU run: no decode step
    assert ref["decode_overhead"] == kc.NOT_MEASURABLE        # a GPU without decode records
    lines = kc.summary_lines(t)
    assert lines[0].startswith("14 claims judged on this run: test-cpu:") and "10 needs a CUDA GPU" in lines[0]  # five + three decode + int4 + e2e
    assert lines[1].startswith(f"14 claims judged on {REF_GPU}:")


def test_no_records_one_row_per_claim():
    t = assemble.build_tables()
    assert t.claims["claim_id"].is_unique and set(t.claims["source"]) == {kc.NO_SOURCE}
    v = verdicts(t, kc.NO_SOURCE)
    assert all(v[cid] == kc.NEEDS_GPU for cid in GPU_CLAIMS)
    assert v["memory_reduction"] == kc.REPRODUCED  # the closed form needs no records


def test_registry_is_extensible(tmp_path):
    t = cpu_only_tables(tmp_path)

    @kc.register_claim("decode_overhead_test", text="Decode-time overhead (test claim)", paper_value="n/a")
    def _check(tables, spec):
        return kc.Result(kc.NOT_MEASURABLE, "1", "test", "a test claim")

    try:
        c = kc.claims_table(t)
        r = c.set_index("claim_id").loc["decode_overhead_test"]
        assert r["text"] == "Decode-time overhead (test claim)" and r["paper_value"] == "n/a"
    finally:
        del kc.CLAIM_CHECKS["decode_overhead_test"]


def test_unknown_claim_and_failing_check(tmp_path):
    t = cpu_only_tables(tmp_path)
    y = tmp_path / "claims.yaml"
    y.write_text(yaml.safe_dump({"claims": [{"id": "nobody_checks_this", "text": "x"},
                                            {"id": "breaks", "text": "y"}]}))

    @kc.register_claim("breaks")
    def _broken(tables, spec):
        raise RuntimeError("boom")

    try:
        c = kc.claims_table(t, y).set_index("claim_id")
        assert c.loc["nobody_checks_this", "verdict"] == kc.NOT_MEASURABLE
        assert c.loc["breaks", "verdict"] == kc.NOT_MEASURABLE and "boom" in c.loc["breaks", "note"]
    finally:
        del kc.CLAIM_CHECKS["breaks"]


def test_paper_l2_stops_growing():
    c = kc.paper_l2_check()
    assert len(c) == 10
    small = c[c["elements"] <= 4_194_304]
    assert ((small["paper_over_predicted"] - 1).abs() < 0.01).all()
    largest = c.nlargest(3, "elements")
    assert (largest["paper_over_predicted"] < 0.5).all()
    assert c.iloc[-1]["paper_over_predicted"] == pytest.approx(0.30, abs=0.01)
    note = kc.paper_l2_note(c)
    assert "float32" in note and "0.30" in note


def test_verdicts_not_stored():
    text = (PAPER_DIR / "claims.yaml").read_text()
    for v in (kc.REPRODUCED, kc.NEEDS_GPU):
        assert f"verdict: {v}" not in text
