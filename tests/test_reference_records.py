"""The committed results of record (reports/reference/h100, reports/reference/h200): complete for the
grid of record, with provenance, and the claims' verdicts computed from them (never stored)."""

from pathlib import Path

import pytest

from kvpack.pipeline import config
from kvpack.report import assemble, claims, headline
from kvpack.study import records

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "reports" / "reference" / "h100"
GPUS = {"h100": "H100", "h200": "H200"}  # folder -> what its records' gpu_name says
PROVENANCE = ("gpu_name", "driver", "cuda", "torch", "cpu_model", "cpu_threads", "git_commit", "config_hash", "date")


def grid_of_record():
    return config.workloads(config.validate_config(
        config._merge(config._merge({}, _yaml("config/config.yaml")), _yaml("config/paper.yaml")), check_device=False))


def _yaml(p):
    import yaml

    return yaml.safe_load((ROOT / p).read_text())


@pytest.mark.parametrize("stage", ["benchmark", "accuracy"])
@pytest.mark.parametrize("gpu", GPUS)
def test_records_complete_with_provenance(gpu, stage):
    ref = ROOT / "reports" / "reference" / gpu
    for w in grid_of_record():
        path = ref / stage / f"{w['T']}x{w['D']}_{w['dtype']}.json"
        assert path.exists(), f"missing record of record: {path.relative_to(ROOT)}"
        rec = records.read_record(path)
        assert rec["workload"]["T"] == w["T"] and rec["workload"]["D"] == w["D"] and rec["workload"]["dtype"] == w["dtype"]
        prov = rec["provenance"]
        for key in PROVENANCE:
            assert prov.get(key) not in (None, "", "unknown"), f"{path.name}: provenance {key} missing"
        assert GPUS[gpu] in prov["gpu_name"] and not prov["git_commit"].endswith("-dirty")
        ok = {(r["impl"], r.get("op")) for r in rec["rows"] if r["status"] == "ok"}
        if stage == "benchmark":
            for v in ("naive", "tiled", "coarsened", "vectorized", "fast"):
                assert {(v, "quantize"), (v, "dequantize")} <= ok, f"{path.name}: {v} not measured"
            assert rec["ceiling"]["copy_gbps"] > 1000
        else:
            assert {r["impl"] for r in rec["rows"] if r["status"] == "ok"} >= {"vectorized", "fast"}
            # s/2, plus the fp32 rounding of the quotient and the product (a few ulps of |x| <= 1)
            assert all(r["max_abs_error"] <= r["predicted_max_abs_error"] + 4 * 2.0**-23 for r in rec["rows"]
                       if r["status"] == "ok")
    # the decode grid, a record per point (the H100's first, dequantize-then-attend record is kept in a
    # subfolder that the report does not read: decode/before_cc7f743/)
    assert len(list((ref / "decode").glob("T*_B*_H*_D*.json"))) >= 12
    if gpu == "h100":
        assert records.read_record(ref / "decode" / "before_cc7f743" / "decode.json")["rows"]


def test_every_claim_gets_a_gpu_verdict_from_the_records():
    t = assemble.build_tables(reference_dirs=[REF])
    c = t.claims.set_index("claim_id")
    # the H100's decode grid (ab24daf): the speed target judged from its fused rows; B = 1 GQA T = 32768
    # now reaches 1.6x, the byte-bound target there is the one missed
    target = c.loc["decode_speed_target"]
    assert target["verdict"] == claims.NOT_REPRODUCED and "4 of 5 targets met" in target["our_value"]
    assert "80% of the int8 byte bound" in target["our_value"]
    c = _without_missing_e2e(c, REF)
    assert set(c["verdict"]) <= {claims.REPRODUCED, claims.NOT_REPRODUCED}
    assert c.loc["attention_error_8k", "our_number"] < 0.1
    # the paper's serial baseline was measured at 2^30 elements: the 1,694x claim is checked there
    sp = t.speedups[(t.speedups["baseline"] == "cpu_serial") & (t.speedups["status"] == "ok")]
    assert sp["elements"].max() == 131072 * 8192


def _without_missing_e2e(c, ref):
    """The e2e and INT4 claims are judged only where their records are committed: without them each
    must say 'not measurable here' (a GPU source without that study), and it is left out of the check."""
    if not any((ref / "e2e").glob("*.json")):
        assert c.loc["e2e_decode", "verdict"] == claims.NOT_MEASURABLE, c.loc["e2e_decode"]
        c = c.drop(index="e2e_decode")
    has_int4 = any("int4_median_ms" in row for path in [*(ref / "decode").glob("*.json"), *(ref / "int4").glob("*.json")]
                   for row in records.read_record(path)["rows"])
    if not has_int4:
        assert c.loc["int4_decode", "verdict"] == claims.NOT_MEASURABLE, c.loc["int4_decode"]
        c = c.drop(index="int4_decode")
    acc = ref / "decode" / "accuracy.json"
    if not (acc.exists() and any(r.get("bits") == 4 for r in records.read_record(acc)["rows"])):
        # its decode accuracy study predates INT4: the quality claim is not measurable there
        assert c.loc["int4_quality", "verdict"] == claims.NOT_MEASURABLE, c.loc["int4_quality"]
        c = c.drop(index="int4_quality")
    return c


def test_every_claim_gets_a_verdict_on_the_h200():
    ref = ROOT / "reports" / "reference" / "h200"
    t = assemble.build_tables(reference_dirs=[ref])
    c = _without_missing_e2e(t.claims.set_index("claim_id"), ref)
    assert set(c["verdict"]) <= {claims.REPRODUCED, claims.NOT_REPRODUCED}, c["verdict"]
    sp = t.speedups[(t.speedups["baseline"] == "cpu_serial") & (t.speedups["status"] == "ok")]
    assert sp["elements"].max() == 131072 * 8192


def test_headline_comes_from_the_newest_records_and_names_them():
    newest = headline.newest_reference_dir()
    dates = {d.name: max(p["date"] for p in headline._provenances(d, "benchmark"))
             for d in (ROOT / "reports" / "reference").iterdir() if headline._provenances(d, "benchmark")}
    assert newest.name == max(dates, key=dates.get)
    line = headline.source_line(newest)
    assert line.startswith("Source: NVIDIA ") and "benchmark records of commit" in line and newest.name in line
    results = (ROOT / "docs" / "results.md").read_text()
    assert line in results, "docs/results.md's kernel table is not the one `python -m kvpack.report.headline` prints now"
    assert headline.to_markdown(headline.headline(newest)) in results


def test_readme_and_results_quote_the_records_as_printed():
    """README.md leads with the end-to-end tables as `headline --e2e --brief` prints them, and its
    prose ratios are those of the same rows; docs/results.md holds the full e2e and decode tables and
    the per-kernel profile lines of the committed log."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "docs" / "results.md").read_text()
    hint = "README: run python -m kvpack.report.headline --e2e --brief reports/reference/h100"
    brief = headline.e2e_brief(REF)
    assert headline.to_markdown(brief) in readme, hint
    assert headline.to_markdown(headline.e2e_capacity(REF)) in readme, hint
    assert headline.source_line(REF, "e2e") in readme
    r = brief[(brief["T"] == 32768) & (brief["batch"] == 8)].iloc[0]
    said = (f"is {r['int8_vs_fp16_speedup']:.2f}x the fp16\nstep, {r['transformers_best_ms'] / r['kvpack_int8_ms']:.1f}x "
            f"transformers' fastest path and {r['quantized_cache_ms'] / r['kvpack_int8_ms']:.1f}x its `QuantizedCache`")
    assert said in readme
    assert r["kvpack_int8_ms"] < r["fp16_byte_bound_ms"]  # "beats the fp16 byte bound"
    assert headline.to_markdown(headline.e2e_headline(REF)) in results
    profile = (REF / "logs" / "e2e_profile_e2e.log").read_text().splitlines()
    lines = [line for line in profile if line.startswith(("kvpack_", "fp16_"))]
    assert len(lines) == 4 and all(line in results for line in lines)
    for gpu in ("h200", "h100"):  # each GPU's decode grid, as `headline --decode` prints it
        ref = ROOT / "reports" / "reference" / gpu
        assert headline.to_markdown(headline.decode_headline(ref)) in results
    assert headline.source_line(REF, "decode") in results


def test_e2e_records_of_record():
    """reports/reference/h100/e2e: tools/bench_e2e.py's records of one device call, with provenance;
    the goal points carry every method of the job, the capacity rows every graph-captured cache; the
    derived columns follow from the measured ones."""
    paths = sorted((REF / "e2e").glob("*.json"))
    assert {p.name for p in paths} == {"llama-3.1-8b_goals.json", "llama-3.1-8b_grid.json"}
    for path in paths:
        rec = records.read_record(path)
        prov = rec["provenance"]
        assert rec["kind"] == "e2e" and "H100" in prov["gpu_name"] and len(prov["git_commit"]) == 40
        assert rec["copy"]["copy_gbps"] > 1000 and rec["model"]["layers"] == 32
        for row in rec["rows"]:
            if row["status"] != "ok":
                assert "OutOfMemoryError" in row["skip_reason"] and row["T"] == 32768 and row["batch"] == 32
                continue
            assert row["step_p10_ms"] <= row["step_median_ms"] <= row["step_p90_ms"]
            assert row["bytes_read"] == row["weights_read_bytes"] + row["cache_bytes"]
            assert abs(row["byte_bound_ms"] - row["bytes_read"] / (rec["copy"]["copy_gbps"] * 1e6)) < 1e-9
            assert abs(row["tokens_per_s"] * row["step_median_ms"] * 1e-3 - row["batch"]) < 1e-9
            assert row["peak_memory_bytes"] > row["cache_bytes"]
    goals = records.read_record(REF / "e2e" / "llama-3.1-8b_goals.json")
    ok = {(r["method"], r["T"], r["batch"]) for r in goals["rows"] if r["status"] == "ok" and not r.get("capacity")}
    for point in ((32768, 8), (4096, 1)):
        for m in ("kvpack_token_graph", "kvpack_channel_graph", "fp16_graph", "static_sdpa_compiled", "dynamic_sdpa",
                  "quantized_hqq_int8", "quantized_fp8", "kvpack_token_eager", "kvpack_channel_eager"):
            assert (m, *point) in ok
    cap = {r["method"]: r["batch"] for r in goals["rows"] if r.get("capacity") and r["status"] == "ok"}
    assert set(cap) == {"kvpack_token_graph", "kvpack_channel_graph", "fp16_graph"}
    assert min(cap["kvpack_token_graph"], cap["kvpack_channel_graph"]) >= 1.9 * cap["fp16_graph"]


def test_one_machine_per_reference_directory():
    """The H100 folder holds records named by detection (nvidia-h100-80gb-hbm3) and by --device-name
    (h100): the claims judge them as one machine, with the e2e claim among the others."""
    t = assemble.build_tables(reference_dirs=[REF])
    assert set(t.claims["device_slug"]) == {"h100"}
    assert t.claims.set_index("claim_id").loc["e2e_decode", "verdict"] in {claims.REPRODUCED, claims.NOT_REPRODUCED}
    from kvpack.report.tables import one_machine

    recs = [{"provenance": {"device_slug": "nvidia-x"}}, {"provenance": {"device_slug": "x", "device_slug_detected": "nvidia-x"}},
            {"provenance": {"device_slug": "nvidia-y"}}]
    assert [r["provenance"]["device_slug"] for r in one_machine(recs)] == ["x", "x", "nvidia-y"]


@pytest.mark.parametrize("gpu", GPUS)
def test_headline_table(gpu):
    h = headline.headline(ROOT / "reports" / "reference" / gpu)
    assert set(h["shape"]) == {"131072x1024", "131072x8192", "262144x128"}
    # bytes / time against the copy ceiling of the same job: consistent arithmetic, plausible values
    assert ((h["fast_gbps"] / h["copy_ceiling_gbps"] - h["fraction_of_copy"]).abs() < 1e-9).all()
    assert (h["fast_gbps"] > 5 * h["paper_gbps"]).all()
    assert "| shape | op |" in headline.to_markdown(h)


def test_kernel_benchmark_of_record():
    """reports/reference/h100/kernels: tools/bench_kernels.py --json output, one real run per file,
    with provenance and method, covering fast and its peers for every op at every shape it names."""
    paths = sorted((REF / "kernels").glob("*.json"))
    assert {p.name for p in paths} == {"kernels_fp32.json", "kernels_16bit.json"}
    # the kernels of f3605589, superseded by today's (7ef7d75's fast kernels, recorded at 275d65c), kept
    assert {p.name for p in (REF / "kernels" / "before_7ef7d75").glob("*.json")} == {p.name for p in paths}
    for path in [*paths, *sorted((REF / "kernels" / "before_7ef7d75").glob("*.json"))]:
        rec = records.read_record(path)
        assert rec["kind"] == "kernel_bench" and rec["command"].startswith("tools/bench_kernels.py")
        prov = rec["provenance"]
        assert "H100" in prov["gpu_name"] and len(prov["git_commit"]) >= 7
        assert rec["method"]["l2_flush"].startswith("read") and rec["copy_gbps"] > 1000
        shapes = {(r["T"], r["D"], r["dtype"]) for r in rec["rows"]}
        have = {(r["T"], r["D"], r["dtype"], r["impl"], r["op"]) for r in rec["rows"]}
        for T, D, dt in shapes:
            for impl, op in [("fast", "quantize"), ("fast", "dequantize"), ("fast", "quantize_fused"),
                             ("fast", "scales"), ("compile", "quantize"), ("compile", "dequantize")]:
                assert (T, D, dt, impl, op) in have, f"{path.name}: {impl} {op} missing at {T}x{D} {dt}"
        for r in rec["rows"]:
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["repeats"] >= 20
            assert abs(r["fraction_of_copy"] * rec["copy_gbps"] - r["gbps"]) < 1e-6 * r["gbps"]


def test_h200_kernel_records():
    """reports/reference/h200/kernels: the 16-bit kernels at the paper's two smallest shapes of 2^25
    elements (the grid runs 16-bit only at D >= 1024) and the public API against the fused op; with the
    fast kernels' device-derived choices in the provenance, as in every benchmark record of the grid."""
    ref = ROOT / "reports" / "reference" / "h200"
    k16 = records.read_record(ref / "kernels" / "kernels_16bit.json")
    api = records.read_record(ref / "kernels" / "api.json")
    assert k16["kind"] == "kernel_bench" and api["kind"] == "api_bench"
    for rec in (k16, api, records.read_record(ref / "benchmark" / "131072x8192_float16.json")):
        tuning = rec["provenance"]["fast_tuning"]
        assert "H200" in rec["provenance"]["gpu_name"] and tuning["sm_count"] == rec["provenance"]["gpu_sm_count"]
        assert set(tuning["quantize_rows_in_flight"].values()) <= {4, 8} and tuning["bytes_in_flight_per_sm"] > 0
    have = {(r["T"], r["D"], r["dtype"], r["impl"], r["op"]) for r in k16["rows"]}
    for T, D in [(131072, 256), (262144, 128)]:
        for dt in ("float16", "bfloat16"):
            for impl, op in [("fast", "quantize"), ("fast", "dequantize"), ("fast", "quantize_fused"),
                             ("fast", "scales"), ("compile", "quantize"), ("compile", "dequantize")]:
                assert (T, D, dt, impl, op) in have
    by = {(r["T"], r["D"], r["impl"]): r for r in api["rows"]}
    for T, D, _ in {k for k in by}:
        assert abs(by[(T, D, "fused_op")]["ratio_to_fused_op"] - 1.0) < 1e-12
        r = by[(T, D, "api_default")]
        assert abs(r["ratio_to_fused_op"] * by[(T, D, "fused_op")]["median_ms"] - r["median_ms"]) < 1e-9


def test_paged_record_of_record():
    """reports/reference/h100/paged: tools/bench_decode.py --page-sizes output of one device run: every
    point ran, the paged kernel gave the contiguous kernel's result bit for bit at every page size,
    and the ratios follow from the times."""
    import json

    rec = json.loads((REF / "paged" / "decode_paged.json").read_text())
    prov = rec["provenance"]
    assert rec["kind"] == "decode_bench" and "H100" in prov["gpu_name"] and len(prov["git_commit"]) == 40
    assert rec["copy"]["copy_gbps"] > 1000 and len(rec["rows"]) == 7
    for r in rec["rows"]:
        assert r["status"] == "ok"
        for n in (16, 64, 256):
            assert r[f"paged_p{n}_equals_fused"] is True
            assert r[f"paged_p{n}_p10_ms"] <= r[f"paged_p{n}_median_ms"] <= r[f"paged_p{n}_p90_ms"]
            assert abs(r[f"paged_p{n}_vs_fused"] - r["fused_median_ms"] / r[f"paged_p{n}_median_ms"]) < 1e-12
    table = headline.paged_headline(REF)
    results = (ROOT / "docs" / "results.md").read_text()
    assert headline.to_markdown(table) in results and headline.paged_source_line(REF) in results


@pytest.mark.parametrize("gpu", GPUS)
def test_decode_grid_paged_rows_on_each_gpu(gpu):
    """The decode grid's paged rows (headline --decode --paged): every point of the grid's format
    timed the paged INT8 kernel at page sizes 16 and 64, each result equal to the contiguous kernel's
    bit for bit, each ratio the contiguous time over the paged one; where the records have paged INT4
    rows, the same for them against the contiguous INT4 kernel."""
    ref = ROOT / "reports" / "reference" / gpu
    table = headline.decode_paged_headline(ref)
    assert len(table) >= 19 and set(table["bit_exact"]) == {"yes"}  # (the H100 cannot hold T = 131072, B = 32 MHA)
    for col in ("int8_paged_p16_vs_contiguous", "int8_paged_p64_vs_contiguous"):
        assert table[col].between(0.5, 1.5).all(), col
    d = assemble.build_tables(reference_dirs=[ref]).decode
    d = d[(d["status"] == "ok") & d["paged_p16_median_ms"].notna()]
    assert ((d["fused_median_ms"] / d["paged_p16_median_ms"] - d["paged_p16_vs_fused"]).abs() < 1e-9).all()
    if "int4_paged_p16_median_ms" in d and d["int4_paged_p16_median_ms"].notna().any():
        d4 = d[d["int4_paged_p16_median_ms"].notna()]
        assert ((d4["int4_median_ms"] / d4["int4_paged_p16_median_ms"] - d4["int4_paged_p16_vs_int4"]).abs()
                < 1e-9).all()
        assert d4["int4_paged_p16_equals_int4"].astype(bool).all()


def test_int4_record_and_its_headline():
    """The INT4 decode record of the H100 (tools/bench_decode.py, int4/decode_int4.json): every ratio
    is its medians' quotient, every bound the bytes at the job's copy rate; docs/int4.md shows the
    table `headline --int4` prints."""
    rec = records.read_record(REF / "int4" / "decode_int4.json")
    assert rec["kind"] == "decode_bench" and "H100" in rec["provenance"]["gpu_name"]
    copy = rec["copy"]["copy_gbps"]
    for r in rec["rows"]:
        assert r["status"] == "ok" and r["int4_group"] == 32
        elems = r["batch"] * r["kv_heads"] * r["T"] * r["head_dim"]
        assert r["cache_int4_bytes"] == elems + 4 * 2 * elems // 32  # nibbles + a K and a V scale per 32 values
        assert abs(r["int4_byte_bound_ms"] - r["cache_int4_bytes"] / (copy * 1e6)) < 1e-9
        assert abs(r["int4_speedup_vs_sdpa"] - r["sdpa_best_median_ms"] / r["int4_median_ms"]) < 1e-12
        assert abs(r["int4_vs_fused"] - r["fused_median_ms"] / r["int4_median_ms"]) < 1e-12
        assert r["int4_p10_ms"] <= r["int4_median_ms"] <= r["int4_p90_ms"]
        assert r["int4_vs_sdpa_max_abs"] < 0.01  # INT4's error against fp16 SDPA on uniform [-1, 1) data
    table = headline.int4_headline(REF)
    assert len(table) == len(rec["rows"])
    # the report reads it (table decode_int4) and judges claim int4_decode from it: the goals missed
    t = assemble.build_tables(reference_dirs=[REF])
    assert len(t.decode_int4) == len(rec["rows"]) and (t.decode_int4["git_commit"] == rec["provenance"]["git_commit"]).all()
    c = t.claims.set_index("claim_id").loc["int4_decode"]
    # the decode grid carries INT4 rows: the claim reads those first, the bench record stays a table; at
    # 9f1b6cf INT4 is never slower than INT8 and at 80% or more of its byte bound; the 2.8x goal stays missed (B = 8 GQA)
    assert c["verdict"] == claims.NOT_REPRODUCED and "INT4 rows of the decode grid" in c["our_source"]
    assert "2 of 3 goals met" in c["our_value"]
    doc = (ROOT / "docs" / "int4.md").read_text()
    assert headline.to_markdown(table) in doc and headline.record_source_line(REF, "int4/decode_int4.json") in doc


def test_peers_record_and_its_headline():
    """FlashInfer beside kvpack on the H100 (tools/bench_paged_peers.py, peers/paged_peers_p16.json):
    every speed-up is the quotient of its medians, every median inside its p10-p90, the errors are
    those of each format (fp16 paths ~1e-4 of SDPA, INT8 ~4e-3, fp8 ~3e-2), and docs/results.md shows
    the table `headline --peers` prints."""
    rec = records.read_record(REF / "peers" / "paged_peers_p16.json")
    assert rec["kind"] == "paged_peers" and "H100" in rec["provenance"]["gpu_name"]
    assert rec["workload"]["page_size"] == 16 and not rec["workload"]["not_started"]
    for r in rec["rows"]:
        best = r[f"{r['sdpa_best']}_median_ms"]
        assert best == min(r[f"sdpa_{b}_median_ms"] for b in ("flash", "cudnn", "efficient") if f"sdpa_{b}_median_ms" in r)
        for m in headline.PEER_METHODS:
            if m == "kvpack_int4_paged" and f"{m}_median_ms" not in r:
                continue  # timed since 88dcf28
            assert r[f"{m}_p10_ms"] <= r[f"{m}_median_ms"] <= r[f"{m}_p90_ms"]
            assert abs(r[f"{m}_speedup_vs_sdpa"] - best / r[f"{m}_median_ms"]) < 1e-12
        assert r["kvpack_int8_rel_err_vs_sdpa"] == r["kvpack_int8_paged_rel_err_vs_sdpa"] < 0.01
        assert all(r[f"fi_{k}_fp16_rel_err_vs_sdpa"] < 1e-3 for k in ("fa2", "fa2tc", "xqa"))
        assert all(0.01 < r[f"fi_{k}_fp8_rel_err_vs_sdpa"] < 0.1 for k in ("fa2", "fa2tc", "xqa"))
    table = headline.peers_headline(REF)
    assert len(table) == len(rec["rows"])
    doc = (ROOT / "docs" / "results.md").read_text()
    assert headline.to_markdown(table) in doc and headline.record_source_line(REF, "peers/paged_peers_p16.json") in doc


def test_e2e_int4_record_and_its_table():
    """The INT4 cache end to end (tools/bench_e2e.py, e2e_int4/: its own job, not mixed into e2e/):
    the derived columns follow from the measured ones, and docs/int4.md's table quotes its medians
    and the ratios between them."""
    rec = records.read_record(REF / "e2e_int4" / "llama-3.1-8b_int4.json")
    assert rec["kind"] == "e2e" and "H100" in rec["provenance"]["gpu_name"]
    rows = {(r["method"], r["T"], r["batch"]): r for r in rec["rows"] if r["status"] == "ok"}
    doc = (ROOT / "docs" / "int4.md").read_text()
    for T, B in ((32768, 8), (4096, 1)):
        fp16, int8, int4 = (rows[(m, T, B)] for m in ("fp16_graph", "kvpack_token_graph", "kvpack_int4_graph"))
        for r in (fp16, int8, int4):
            assert r["step_p10_ms"] <= r["step_median_ms"] <= r["step_p90_ms"]
            assert abs(r["byte_bound_ms"] - r["bytes_read"] / (rec["copy"]["copy_gbps"] * 1e6)) < 1e-9
        assert int4["cache_bytes"] < int8["cache_bytes"] < fp16["cache_bytes"]
        line = (f"| {T}, {B} | {fp16['step_median_ms']:.3f} ms | {int8['step_median_ms']:.3f} ms | "
                f"{int4['step_median_ms']:.3f} ms | {fp16['step_median_ms'] / int4['step_median_ms']:.2f}x | "
                f"{int8['step_median_ms'] / int4['step_median_ms']:.2f}x |")
        assert line in doc, line


def test_serving_decode_on_each_gpu():
    """Issue 18's goals judged from each GPU's committed records: the paged INT8 kernel is within 5% of the
    contiguous one at every pair on both GPUs; the paged INT4 kernel misses on the H100 by one pair (the short
    step with pages of 64: 0.930x its contiguous twin) and has no timing on the H200; both GPUs are ahead of
    FlashInfer's fp16 paged decode; the short steps miss."""
    for gpu, paged, paged4 in (("h200", "met", "not measured"), ("h100", "met", "MISSED")):
        t = assemble.build_tables(reference_dirs=[ROOT / "reports" / "reference" / gpu])
        row = t.claims.set_index("claim_id").loc["serving_decode"]
        assert row["verdict"] == claims.NOT_REPRODUCED, row.to_dict()
        assert f"paged decode within 5% of the contiguous kernel (page size >= 16): {paged}" in row["note"]
        assert f"paged INT4 decode within 5% of the contiguous kernel (page size >= 16): {paged4}" in row["note"]
        assert "paged decode ahead of FlashInfer's fp16 paged decode: met" in row["note"]
        assert "B = 1 GQA 32/8 >= 1.3x at T = 4096: MISSED" in row["note"]
        assert len(t.decode_api) == 5 and len(t.decode_peers) == 8
        if gpu == "h100":  # f11a026's page ids two loads ahead: the largest caches inside, one short step outside
            assert "37 of 38 pairs inside; worst at page size 64, T=4096 B=1 Hq=32 Hkv=8" in row["note"], row["note"]
