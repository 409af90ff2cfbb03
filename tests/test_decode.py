"""The decode-step study: its grid, its jobs run small on the CPU (the real run is on the GPU), and the
decode table, claims and figure from synthetic records (test data, not measurements)."""

import json

import pytest
import torch

from kvpack.pipeline import environment
from kvpack.report import assemble, claims, figures
from kvpack.study import decode_step, records

REF = "reports/reference/h100"


def test_grid_points_default_is_the_issue_grid():
    pts = decode_step.grid_points({})
    main = [p for p in pts if p["head_dim"] == 128]
    assert len(main) == 3 * 3 * 2 and len(pts) == 20
    assert {(p["q_heads"], p["kv_heads"]) for p in main} == {(32, 32), (32, 8)}
    assert [p["head_dim"] for p in pts[-2:]] == [64, 256]
    assert decode_step.point_name(pts[0]) == "T4096_B1_H32x32_D128"
    # an extra head dimension equal to the grid's at a grid shape is one point, not two
    s = {"T": [32768], "batch": [8], "heads": [[32, 8]], "extra_head_dims": {"head_dims": [128]}}
    assert len(decode_step.grid_points(s)) == 1


def test_decode_point_job_on_cpu():
    p = {"T": 64, "batch": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64}
    rec = decode_step.run_decode_point_job(p, {"repeats": 2, "warmup": 0}, "cpu", environment.provenance("cpu"))
    assert rec["kind"] == "decode" and rec["copy"] is None and len(rec["rows"]) == 1
    row = rec["rows"][0]
    assert row["status"] == "ok" and (row["T"], row["batch"], row["q_heads"], row["kv_heads"]) == (64, 2, 4, 2)
    assert row["fused_median_ms"] > 0 and row["sdpa_best"] in decode_step.SDPA_BACKENDS
    assert row["fused_vs_sdpa_max_abs"] < 0.05
    assert rec["workload"]["T"] == 64 and rec["workload"]["repeats"] == 2


def test_a_point_that_cannot_allocate_is_a_skipped_row(monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(decode_step, "decode_point", oom)
    p = {"T": 131072, "batch": 32, "q_heads": 32, "kv_heads": 32, "head_dim": 128}
    rec = decode_step.run_decode_point_job(p, {}, "cpu", environment.provenance("cpu"))
    row = rec["rows"][0]
    assert row["status"] == "skipped" and "out of host memory" in row["skip_reason"]
    assert row["cache_fp16_bytes"] == 2 * 32 * 32 * 131072 * 128 * 2

    def other(*a, **k):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(decode_step, "decode_point", other)
    with pytest.raises(RuntimeError, match="a bug"):
        decode_step.run_decode_point_job(p, {}, "cpu", environment.provenance("cpu"))


# --- synthetic records: the table, the claims, the figure ---------------------------------------

PROV = {"device_slug": "test-gpu", "gpu_name": "Test GPU (synthetic)", "device": "cuda"}


def _row(T, B, hq, hkv, D, sdpa_ms, fused_ms, copy_gbps=4000.0):
    b = decode_step.decode_bytes(B, hkv, T, D)
    row = {"T": T, "batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": D, "granularity": "token",
           "dtype": "float16", **b, "copy_gbps": copy_gbps, "int8_byte_bound_ms": b["cache_int8_bytes"] / (copy_gbps * 1e6),
           "fp16_byte_bound_ms": b["cache_fp16_bytes"] / (copy_gbps * 1e6), "status": "ok"}
    for name, ms in (("sdpa_flash", sdpa_ms * 1.2), ("sdpa_cudnn", sdpa_ms), ("dequant_sdpa", sdpa_ms * 2.7),
                     ("fused", fused_ms)):
        row.update({f"{name}_median_ms": ms, f"{name}_p10_ms": ms * 0.99, f"{name}_p90_ms": ms * 1.01})
    row.update(sdpa_best="cudnn", sdpa_best_median_ms=sdpa_ms, fused_speedup_vs_sdpa=sdpa_ms / fused_ms,
               dequant_sdpa_speedup_vs_sdpa=1 / 2.7, fused_fraction_of_int8_bound=row["int8_byte_bound_ms"] / fused_ms)
    return row


def write_synthetic(ref, speedup=1.8, append_us=10.0, int4_speedup=None):
    """One v2 record per point of a small grid, and the append record, in a reference-dir layout."""
    for p in decode_step.grid_points({"T": [4096, 32768], "batch": [1, 8], "heads": [[32, 32], [32, 8]],
                                      "extra_head_dims": {"head_dims": [64], "T": 32768, "batch": 8, "heads": [32, 8]}}):
        fp16_bytes = decode_step.decode_bytes(p["batch"], p["kv_heads"], p["T"], p["head_dim"])["cache_fp16_bytes"]
        sdpa = 1.1 * fp16_bytes / 4000e6  # fp16 SDPA at 91 % of the fp16 byte bound
        fused = sdpa / (speedup if p["T"] >= 32768 else 0.7 * speedup)  # short caches gain less
        row = _row(p["T"], p["batch"], p["q_heads"], p["kv_heads"], p["head_dim"], sdpa, fused)
        if int4_speedup is not None:  # INT4 rows: at int4_speedup x SDPA (short caches gain less)
            int4 = sdpa / (int4_speedup if p["T"] >= 32768 else 0.7 * int4_speedup)
            bound = row["cache_int4_bytes"] / (4000.0 * 1e6)
            row.update(int4_group=32, int4_median_ms=int4, int4_speedup_vs_sdpa=sdpa / int4, int4_vs_fused=fused / int4,
                       int4_byte_bound_ms=bound, int4_fraction_of_int4_bound=bound / int4)
        rec = {"kind": "decode", "workload": {"name": "decode step", **p}, "provenance": PROV,
               "copy": {"copy_gbps": 4000.0}, "rows": [row]}
        records.write_record(rec, ref / "decode" / f"{decode_step.point_name(p)}.json")
    skipped = decode_step.skipped_point_row({"T": 131072, "batch": 32, "q_heads": 32, "kv_heads": 32, "head_dim": 128},
                                            "token", "out of GPU memory: synthetic")
    records.write_record({"kind": "decode", "workload": {"name": "decode step"}, "provenance": PROV, "copy": None,
                          "rows": [skipped]}, ref / "decode" / "T131072_B32_H32x32_D128.json")
    records.write_record({"kind": "decode_append", "workload": {"name": "decode append"}, "provenance": PROV,
                          "rows": [{"status": "ok", "batch": 32, "kv_heads": 8, "head_dim": 128, "granularity": "token",
                                    "append_median_ms": append_us / 1e3, "append_median_us": append_us}]},
                         ref / "decode" / "append.json")
    return ref


def test_decode_table_from_synthetic_records(tmp_path):
    t = assemble.build_tables(reference_dirs=[write_synthetic(tmp_path / "ref")])
    d = t.decode
    assert len(d) == 2 * 2 * 2 + 1 + 1
    assert set(d["status"]) == {"ok", "skipped"}
    ok = d[d["status"] == "ok"]
    assert (ok["sdpa_best"] == "cudnn").all() and ok["sdpa_cudnn_median_ms"].notna().all()
    assert (ok["fused_speedup_vs_sdpa"] > 1).all() and ok["copy_gbps"].eq(4000.0).all()
    assert "out of GPU memory" in d[d["status"] == "skipped"]["skip_reason"].iloc[0]
    assert len(t.decode_append) == 1 and t.decode_append["append_median_us"].iloc[0] == 10.0


def test_decode_table_reads_the_first_format(tmp_path):
    """The H100's first decode record (one file, torch's default SDPA, no fused kernel; kept in
    decode/before_cc7f743/ since the grid of cc7f743 replaced it) stays readable, labelled."""
    t = assemble.build_tables(decode_paths=[f"{REF}/decode/before_cc7f743/decode.json"])
    d = t.decode
    assert len(d) == 3 and (d["record_format"].str.startswith("v1")).all()
    assert d["sdpa_best_median_ms"].notna().all() and d["fused_median_ms"].isna().all()
    ratio = d["dequant_sdpa_median_ms"] / d["sdpa_best_median_ms"]
    assert ((ratio > 2) & (ratio < 3)).all()
    c = t.claims.set_index("claim_id")
    assert c.loc["decode_overhead", "verdict"] == claims.NOT_REPRODUCED
    assert "no fused-kernel rows" in c.loc["decode_overhead", "our_value"]
    assert c.loc["decode_speed_target", "verdict"] == claims.NOT_MEASURABLE


@pytest.mark.parametrize("speedup, verdict", [(1.8, claims.REPRODUCED), (0.8, claims.NOT_REPRODUCED)])
def test_decode_claims_from_fused_rows(tmp_path, speedup, verdict):
    """Each source judged on its own decode rows: the synthetic GPU's fused rows, the H100's first-format rows."""
    t = assemble.build_tables(reference_dirs=[REF, write_synthetic(tmp_path / "ref", speedup)])
    c = t.claims[t.claims["source"] == "reference: ref"].set_index("claim_id")
    row = c.loc["decode_overhead"]
    assert row["verdict"] == verdict, row.to_dict()
    assert "fused INT8 decode" in row["our_value"] and "test-gpu" in row["our_source"]
    assert "Dequantize-then-SDPA" in row["note"]  # the paper's path stays in the note
    target = c.loc["decode_speed_target"]
    assert target["verdict"] == verdict, target.to_dict()
    assert "append of one token <= 15 us: met" in target["note"]
    h100 = t.claims[t.claims["source"] == "reference: h100"].set_index("claim_id")
    assert h100.loc["decode_overhead", "verdict"] == claims.REPRODUCED  # the H100's own fused rows (cc7f743)
    assert "fused INT8 decode" in h100.loc["decode_overhead", "our_value"]
    assert h100.loc["decode_speed_target", "verdict"] == claims.NOT_REPRODUCED  # B = 1 GQA at T = 32768: 1.43x
    # the decode-only reference has a GPU but no benchmark or accuracy records: not measurable there, not 'needs a GPU'
    assert set(c.loc[["max_speedup", "overhead_range", "reconstruction_error"], "verdict"]) == {claims.NOT_MEASURABLE}
    assert h100.loc["max_speedup", "verdict"] == claims.REPRODUCED  # and the H100's benchmark verdicts stand beside it


def test_decode_speed_target_missed_append(tmp_path):
    t = assemble.build_tables(reference_dirs=[write_synthetic(tmp_path / "ref", 1.8, append_us=40.0)])
    target = t.claims.set_index("claim_id").loc["decode_speed_target"]
    assert target["verdict"] == claims.NOT_REPRODUCED and "append" in target["our_value"]


def test_no_decode_rows_needs_a_gpu():
    c = assemble.build_tables().claims.set_index("claim_id")
    assert c.loc["decode_overhead", "verdict"] == claims.NEEDS_GPU
    assert c.loc["decode_speed_target", "verdict"] == claims.NEEDS_GPU


def test_decode_figure_renders(tmp_path):
    t = assemble.build_tables(reference_dirs=[REF, write_synthetic(tmp_path / "ref")])
    png, svg = figures.make_figure("decode", t, tmp_path / "decode.png")
    assert png.stat().st_size > 10_000 and svg.exists()
    png, _ = figures.make_figure("decode", assemble.build_tables(), tmp_path / "empty.png")  # no rows: a message
    assert png.stat().st_size > 0


def test_written_tables_read_back(tmp_path):
    from kvpack.report import tables

    ref = write_synthetic(tmp_path / "ref")
    assemble.write_tables([], [], [ref], tables.PAPER_DIR, [{"name": "x", "T": 3, "D": 5}], tmp_path / "t")
    t = tables.read_tables(tmp_path / "t")
    assert len(t.decode) == 10 and len(tables.decode_view(t.decode)) == 10
    assert json.loads(json.dumps(list(t.decode.columns)))  # plain column names
    torch.manual_seed(0)


def test_decode_headline(tmp_path):
    from kvpack.report import headline

    h = headline.decode_headline(write_synthetic(tmp_path / "ref"))
    assert len(h) == 9 and list(h["D"])[-1] == 64 and list(h["Hq x Hkv"])[:4] == ["32x32"] * 4
    md = headline.to_markdown(h)
    assert "| T | B | Hq x Hkv | D | best_sdpa |" in md and "1.80x" in md and "%" in md
    h100 = headline.decode_headline(REF)  # the H100's grid of cc7f743: 19 points ok, one out of memory
    assert len(h100) == 19 and (h100["fused_speedup"] > 0.9).all()


@pytest.mark.parametrize("int4_speedup, verdict, missed", [
    (3.0, claims.REPRODUCED, None),
    (2.5, claims.NOT_REPRODUCED, ">= 2.8x fp16 SDPA"),
    (1.5, claims.NOT_REPRODUCED, "never slower than INT8"),
])
def test_int4_decode_claim(tmp_path, int4_speedup, verdict, missed):
    """The INT4 goals judged from synthetic rows (INT8 at 1.8x): 2.8x fp16 SDPA and 80 % of the int4
    byte bound at T >= 32768, D = 128, batch 8 and 32; never slower than INT8 at T >= 4096."""
    t = assemble.build_tables(reference_dirs=[write_synthetic(tmp_path / "ref", 1.8, int4_speedup=int4_speedup)])
    r = t.claims.set_index("claim_id").loc["int4_decode"]
    assert r["verdict"] == verdict, r.to_dict()
    assert "test-gpu" in r["our_source"] and f"{int4_speedup:.2f}x" in r["our_value"]
    if missed:
        assert f"{missed}" in r["note"] and "MISSED" in r["note"]
    d = t.decode[t.decode["status"] == "ok"]
    assert (d["int4_speedup_vs_sdpa"] > 0).all() and d["int4_fraction_of_int4_bound"].notna().all()


def test_int4_decode_claim_without_int4_rows(tmp_path):
    c = assemble.build_tables(reference_dirs=[write_synthetic(tmp_path / "ref")]).claims.set_index("claim_id")
    assert c.loc["int4_decode", "verdict"] == claims.NOT_MEASURABLE
    assert assemble.build_tables().claims.set_index("claim_id").loc["int4_decode", "verdict"] == claims.NEEDS_GPU


def _add_serving(ref, paged=0.97, worst_paged=None, api_over_graph=1.01, fi_over_paged=1.2, paged4=None):
    """Issue 18's records beside write_synthetic's grid: paged rows (page size 16, `paged` x the contiguous
    kernel's speed; `worst_paged` at the one D = 64 point), the API record and the FlashInfer record;
    with `paged4`, paged INT4 rows at `paged4` x the contiguous INT4 kernel's speed (needs INT4 rows)."""
    for path in sorted((ref / "decode").glob("T*_B*.json")):
        rec = json.loads(path.read_text())
        row = rec["rows"][0]
        if row.get("status") != "ok":
            continue
        frac = worst_paged if (worst_paged is not None and row["head_dim"] == 64) else paged
        row.update(paged_p16_median_ms=row["fused_median_ms"] / frac, paged_p16_vs_fused=frac, paged_p16_equals_fused=True)
        if paged4 is not None:
            row.update(int4_paged_p16_median_ms=row["int4_median_ms"] / paged4, int4_paged_p16_vs_int4=paged4,
                       int4_paged_p16_equals_int4=True)
        records.write_record(rec, path)
    if api_over_graph is not None:
        rows = [{"T": T, "batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "calls": 100, "graph_us": 10.0,
                 "raw_op_us": 10.0 * api_over_graph, "default_us": 10.0 * api_over_graph, "check_lengths_us": 60.0,
                 "default_over_graph": api_over_graph, "raw_over_graph": api_over_graph} for T in (4096, 32768)]
        (ref / "api").mkdir(exist_ok=True)
        (ref / "api" / "decode_api.json").write_text(json.dumps({"kind": "decode_api_bench", "provenance": PROV,
                                                                 "rows": rows}))
    if fi_over_paged is not None:
        rows = [{"T": 32768, "batch": B, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "page_size": 16,
                 "flashinfer_version": "0.0-synthetic", "sdpa_best": "sdpa_cudnn", "kvpack_int8_median_ms": 0.1,
                 "kvpack_int8_paged_median_ms": 0.1, "fi_fa2_fp16_median_ms": 0.1 * fi_over_paged,
                 "fi_fa2tc_fp16_median_ms": 0.1 * fi_over_paged * 1.1, "fi_xqa_fp16_median_ms": 0.1 * fi_over_paged * 1.3}
                for B in (1, 8)]
        (ref / "peers").mkdir(exist_ok=True)
        (ref / "peers" / "paged_peers_p16.json").write_text(json.dumps(
            {"kind": "paged_peers", "workload": {"name": "paged peers"}, "provenance": PROV, "rows": rows}))
    return ref


@pytest.mark.parametrize("serving, verdict, missed", [
    ({}, claims.REPRODUCED, None),
    ({"worst_paged": 0.94}, claims.NOT_REPRODUCED, "paged decode within 5%"),
    ({"api_over_graph": 1.05}, claims.NOT_REPRODUCED, "the default call within 3%"),
    ({"fi_over_paged": 0.9}, claims.NOT_REPRODUCED, "ahead of FlashInfer"),
    ({"api_over_graph": None, "fi_over_paged": None}, claims.NOT_MEASURABLE, None),
])
def test_serving_decode_claim_judges_each_of_issue_18s_goals(tmp_path, serving, verdict, missed):
    ref = _add_serving(write_synthetic(tmp_path / "ref", speedup=2.5), **serving)
    t = assemble.build_tables(reference_dirs=[ref])
    row = t.claims.set_index("claim_id").loc["serving_decode"]
    assert row["verdict"] == verdict, row.to_dict()
    if verdict == claims.REPRODUCED:
        assert row["our_value"] == "6 of 6 goals met"
        # B = 1 GQA at T = 4096 gains 0.7 x 2.5 in write_synthetic; every paged pair at 0.97
        assert "(1.75x)" in row["note"] and "0.970x to 0.970x" in row["note"] and "9 of 9 pairs inside" in row["note"]
    if missed:
        assert missed in row["our_value"].split("missed:")[1], row["our_value"]
    if verdict == claims.NOT_MEASURABLE:
        assert "4 of 6 goals met" in row["our_value"] and "not measured (no API record" in row["note"]


PAGED4 = "paged INT4 decode within 5% of the contiguous kernel (page size >= 16): "


@pytest.mark.parametrize("paged4, verdict, said", [
    (0.97, claims.REPRODUCED, PAGED4 + "met (0.970x to 0.970x the contiguous kernel's speed, 9 of 9 pairs inside"),
    (0.94, claims.NOT_REPRODUCED, PAGED4 + "MISSED (0.940x to 0.940x the contiguous kernel's speed, 0 of 9 pairs inside"),
    (None, claims.NOT_MEASURABLE, PAGED4 + "not measured (no int4_paged_p<P> rows)"),
])
def test_serving_decode_judges_paged_int4_where_the_grid_has_int4(tmp_path, paged4, verdict, said):
    """A grid with INT4 rows owes paged INT4 rows: each judged against the contiguous INT4 kernel of its job
    (a goal of its own, beside paged INT8's); without them the goal is not measured. (A grid without INT4
    rows has no such goal: test_serving_decode_claim_judges_each_of_issue_18s_goals, 6 goals.)"""
    ref = _add_serving(write_synthetic(tmp_path / "ref", speedup=2.5, int4_speedup=3.5), paged4=paged4)
    row = assemble.build_tables(reference_dirs=[ref]).claims.set_index("claim_id").loc["serving_decode"]
    assert row["verdict"] == verdict, row.to_dict()
    assert said in row["note"]
    assert "paged decode within 5% of the contiguous kernel (page size >= 16): met" in row["note"]
    n_met = {claims.REPRODUCED: 7, claims.NOT_REPRODUCED: 6, claims.NOT_MEASURABLE: 6}[verdict]
    assert row["our_value"].startswith(f"{n_met} of 7 goals met"), row["our_value"]


def test_serving_decode_short_steps_and_long_points(tmp_path):
    """speedup 1.8: B = 1 GQA gains 1.26x at T = 4096 (0.7 x 1.8) and 1.8x at T = 32768."""
    t = assemble.build_tables(reference_dirs=[_add_serving(write_synthetic(tmp_path / "ref", speedup=1.8))])
    row = t.claims.set_index("claim_id").loc["serving_decode"]
    assert row["verdict"] == claims.NOT_REPRODUCED
    assert row["our_value"] == "5 of 6 goals met; missed: B = 1 GQA 32/8 >= 1.3x at T = 4096"
    assert "B = 1 GQA 32/8 >= 1.6x at T = 32768: met (1.80x)" in row["note"]
