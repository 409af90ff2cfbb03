"""The committed results of record (reports/reference/h100): complete for the grid of record, with
provenance, and the claims' verdicts computed from them (never stored)."""

from pathlib import Path

import pytest

from kvpack.pipeline import config
from kvpack.report import assemble, claims, headline
from kvpack.study import records

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "reports" / "reference" / "h100"
PROVENANCE = ("gpu_name", "driver", "cuda", "torch", "cpu_model", "cpu_threads", "git_commit", "config_hash", "date")


def grid_of_record():
    return config.workloads(config.validate_config(
        config._merge(config._merge({}, _yaml("config/config.yaml")), _yaml("config/paper.yaml")), check_device=False))


def _yaml(p):
    import yaml

    return yaml.safe_load((ROOT / p).read_text())


@pytest.mark.parametrize("stage", ["benchmark", "accuracy"])
def test_records_complete_with_provenance(stage):
    for w in grid_of_record():
        path = REF / stage / f"{w['T']}x{w['D']}_{w['dtype']}.json"
        assert path.exists(), f"missing record of record: {path.relative_to(ROOT)}"
        rec = records.read_record(path)
        assert rec["workload"]["T"] == w["T"] and rec["workload"]["D"] == w["D"] and rec["workload"]["dtype"] == w["dtype"]
        prov = rec["provenance"]
        for key in PROVENANCE:
            assert prov.get(key) not in (None, "", "unknown"), f"{path.name}: provenance {key} missing"
        assert "H100" in prov["gpu_name"] and not prov["git_commit"].endswith("-dirty")
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
    assert records.read_record(REF / "decode" / "decode.json")["rows"]


def test_every_claim_gets_a_gpu_verdict_from_the_records():
    t = assemble.build_tables(reference_dirs=[REF])
    c = t.claims.set_index("claim_id")
    # the H100 decode records predate the fused kernel: the speed target needs its rows (reports/reference/h200)
    assert c.loc["decode_speed_target", "verdict"] == claims.NOT_MEASURABLE
    assert set(c.drop(index="decode_speed_target")["verdict"]) <= {claims.REPRODUCED, claims.NOT_REPRODUCED}
    assert c.loc["attention_error_8k", "our_number"] < 0.1
    # the paper's serial baseline was measured at 2^30 elements: the 1,694x claim is checked there
    sp = t.speedups[(t.speedups["baseline"] == "cpu_serial") & (t.speedups["status"] == "ok")]
    assert sp["elements"].max() == 131072 * 8192


def test_headline_table():
    h = headline.headline(REF)
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
    for path in paths:
        rec = records.read_record(path)
        assert rec["kind"] == "kernel_bench" and rec["command"].startswith("tools/bench_kernels.py")
        prov = rec["provenance"]
        assert "H100" in prov["gpu_name"] and len(prov["git_commit"]) == 40
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
