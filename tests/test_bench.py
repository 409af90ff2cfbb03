"""The timing harness on the CPU: statistics, bandwidth arithmetic, budgets, skip records, records."""

import json
import math

import numpy as np
import pytest
import torch

from kvpack.pipeline import environment
from kvpack.study import bench, records


def test_timing_summary_matches_numpy():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    s = bench.Timing(samples).summary()
    assert s["median_ms"] == 3.5 and s["min_ms"] == 1.0 and s["repeats"] == 6
    assert s["p10_ms"] == pytest.approx(np.percentile(samples, 10))
    assert s["p90_ms"] == pytest.approx(np.percentile(samples, 90))
    assert s["mean_ms"] == pytest.approx(sum(samples) / 6)


def test_gbps_arithmetic():
    assert bench.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)
    assert bench.gbps(5 * 2**30, 2.0) == pytest.approx(5 * 2**30 / 2e-3 / 1e9)
    assert math.isnan(bench.gbps(100, 0.0))


def test_op_bytes_follow_the_byte_model():
    T, D = 131072, 8192
    n = T * D
    assert bench.op_bytes("quantize", T, D, torch.float32) == 4 * n + n + 4 * D
    assert bench.op_bytes("dequantize", T, D, torch.float16) == n + 2 * n + 4 * D
    assert bench.op_bytes("quantize_fused", T, D, torch.bfloat16) == 2 * 2 * n + n + 4 * D
    assert bench.op_bytes("scales", T, D, torch.float32, "token") == 4 * n + 4 * T


def test_time_cpu_counts_every_repeat_and_respects_the_budget():
    calls = []
    t = bench.time_cpu(lambda: calls.append(1), warmup=2, repeats=7)
    assert t.summary()["repeats"] == 7 and len(calls) == 1 + 1 + 7  # first call, one more warm-up, 7 timed

    import time

    calls.clear()
    t = bench.time_cpu(lambda: (calls.append(1), time.sleep(0.05)), warmup=1, repeats=50, budget_s=0.2)
    s = t.summary()
    assert 1 <= s["repeats"] <= 4 and len(calls) <= 5
    assert s["median_ms"] >= 50


def test_cpu_job_record():
    prov = environment.provenance("cpu", "abc")
    rec = bench.run_benchmark_job({"name": "tiny", "T": 256, "D": 48, "dtype": "float32", "seed": 3}, "cpu",
                                  {"cpu_repeats": 3, "cpu_serial_max_elements": 1 << 20}, prov)
    assert rec["kind"] == "benchmark" and rec["workload"]["elements"] == 256 * 48
    rows = rec["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["impl"], r["op"]) for r in ok} == {(v, op) for v in ("cpu_serial", "cpu_torch")
                                                   for op in ("scales", "quantize", "dequantize")}
    for r in ok:
        assert r["median_ms"] > 0 and r["repeats"] >= 1
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    assert [r["bit_exact"] for r in ok if r["impl"] == "cpu_torch" and r["op"] == "quantize"] == [True]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["impl"] for r in skipped} == {"naive", "tiled", "coarsened", "vectorized", "fast"}
    assert all("no CUDA device" in r["skip_reason"] for r in skipped)
    assert rec["ceiling"]["copy_gbps"] > 0 and rec["provenance"]["config_hash"] == "abc"


def test_cpu_serial_over_the_limit_is_recorded_as_skipped():
    rec = bench.run_benchmark_job({"T": 64, "D": 64}, "cpu", {"cpu_repeats": 1, "cpu_serial_max_elements": 100},
                                  environment.provenance("cpu"))
    serial = [r for r in rec["rows"] if r["impl"] == "cpu_serial"]
    assert serial and all(r["status"] == "skipped" and "cpu_serial_max_elements" in r["skip_reason"] for r in serial)


def test_record_write_is_atomic(tmp_path):
    path = tmp_path / "a" / "rec.json"
    records.write_record({"kind": "benchmark", "workload": {}, "provenance": {}, "rows": [{"x": float("nan")}]}, path)
    assert json.loads(path.read_text())["rows"][0]["x"] is None  # NaN written as null
    assert records.read_record(path)["kind"] == "benchmark"

    class Boom:
        pass

    with pytest.raises(TypeError):
        records.write_record({"kind": "x", "rows": [Boom()]}, tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp file left behind
    with pytest.raises(ValueError, match="not a kvpack record"):
        (tmp_path / "c.json").write_text("{}")
        records.read_record(tmp_path / "c.json")


def test_provenance_and_device():
    assert environment.resolve_device("cpu") == "cpu"
    assert environment.resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            environment.resolve_device("cuda")
    with pytest.raises(ValueError):
        environment.resolve_device("tpu")
    p = environment.provenance("cpu", "h")
    for key in ("device_slug", "torch", "cpu_model", "cpu_threads", "git_commit", "config_hash", "date"):
        assert p[key] not in (None, "")
    assert 1 <= p["cpu_usable_threads"] <= min(p["cpu_affinity"], p["cpu_threads"])
    assert "cgroup_cpu_quota" in p and p["cgroup_cpu_source"]
    assert environment.device_slug("cpu").startswith("cpu-")
    assert environment.config_hash({"a": 1, "b": [2]}) == environment.config_hash({"b": [2], "a": 1})


def test_git_commit_never_names_a_commit_whose_code_did_not_run(tmp_path, monkeypatch):
    """A GPU box's copy of the tree can carry an older .git: KVPACK_GIT_COMMIT evaluated there names
    that old HEAD, and the record must then say -dirty, not the old commit clean."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "kernel.cu").write_text("old\n")
    git("add", "kernel.cu")
    git("commit", "-q", "-m", "old")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(environment, "ROOT", tmp_path)

    def commit(named=None):
        if named is None:
            monkeypatch.delenv("KVPACK_GIT_COMMIT", raising=False)
        else:
            monkeypatch.setenv("KVPACK_GIT_COMMIT", named)
        environment.git_commit.cache_clear()
        return environment.git_commit()

    try:
        assert commit() == head and commit(head) == head  # clean: the commit, named or found
        (tmp_path / "kernel.cu").write_text("new\n")  # the tree of a later commit, .git still the old one
        assert commit() == head + "-dirty"
        assert commit(head) == head + "-dirty" and commit(head[:7]) == head[:7] + "-dirty"
        later = "f" * 40  # named where the tree was committed: trusted as given
        assert commit(later) == later
    finally:
        environment.git_commit.cache_clear()


def test_copy_ceiling_is_the_best_of_its_trials():
    """The copy ceiling is the fastest of its trials (each between fresh buffers), every trial kept."""
    c = bench.copy_bandwidth("cpu", 1 << 22, warmup=1, repeats=3, trials=3)
    assert len(c["copy_trials_gbps"]) == 3 and c["copy_gbps"] == max(c["copy_trials_gbps"])
    assert c["copy_p10_ms"] <= c["copy_median_ms"] <= c["copy_p90_ms"]
    assert abs(c["copy_gbps"] - bench.gbps(c["copy_bytes"], c["copy_median_ms"])) < 1e-9
    assert len(bench.copy_bandwidth("cpu", 1 << 20, warmup=0, repeats=1)["copy_trials_gbps"]) == 1  # CPU default: one
