"""The Snakemake workflow: lint, dry runs of the shipped configs, and a tiny run end to end.

The end-to-end run (marked `slow`, about a minute on 2 cores, and run by default) works in a temp
directory (`--directory`), so results/ and logs/ land there; the extension's build cache is kvpack's
(build/extension/ or $KVPACK_BUILD_DIR), shared with every other run, so nothing recompiles.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kvpack.study import records

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "config.yaml"
PAPER = ROOT / "config" / "paper.yaml"
CLAIMS = yaml.safe_load((ROOT / "reports" / "paper" / "claims.yaml").read_text())

# The report stage's outputs (workflow/rules/tables.smk, figures.smk, report.smk).
TABLES = ("performance", "accuracy", "memory", "workloads", "paper", "speedups", "claims", "provenance", "paper_l2",
          "decode", "decode_append", "decode_accuracy")
FIGURES = ("time", "speedup", "roofline", "accuracy", "memory", "peers", "decode", "e2e")

TINY = {
    "grid": [
        {"name": "Tiny odd 3x5", "T": 3, "D": 5},
        {"name": "Small odd", "T": 130, "D": 36, "dtypes": ["float32", "bfloat16"]},
    ],
    "benchmark": {"warmup": 1, "repeats": 2, "cpu_repeats": 2, "cpu_time_budget_s": 2.0,
                  "peers": ["torch_eager"], "copy_bytes": 1048576},
    "reference_dirs": [],
    # the decode accuracy study small (its timings need a GPU: a CPU run skips them and says so)
    "decode": {"accuracy": {"distributions": ["uniform"], "T": 64, "batch": 2, "heads": [4, 2], "head_dim": 64}},
}


def snakemake(workdir, *args, timeout=600):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )


def job_counts(output: str) -> dict:
    """The 'Job stats' table of a (dry) run as {rule: count}."""
    stats = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE) if m[1] != "total"}


def planned_outputs(output: str) -> set:
    """Every output file of the jobs a (dry) run lists."""
    lines = re.findall(r"^\s+output: (.+)$", output, re.MULTILINE)
    return {f for line in lines for f in line.split(", ")}


def test_lint_is_clean(tmp_path):
    run = snakemake(tmp_path, "--lint", "--configfile", str(CONFIG))
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, out


def test_paper_dry_run_lists_every_paper_workload(tmp_path):
    """`snakemake -n --configfile config/paper.yaml`: a benchmark and an accuracy job per paper workload."""
    run = snakemake(tmp_path, "-n", "--configfile", str(CONFIG), str(PAPER))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    outputs = planned_outputs(out)
    for w in CLAIMS["grid"]:
        for stage in ("benchmark", "accuracy"):
            pattern = rf"results/[^/]+/{stage}/{w['T']}x{w['D']}_float32\.json"
            assert any(re.fullmatch(pattern, o) for o in outputs), (stage, w)
    counts = job_counts(out)
    assert counts["build"] == 1 and counts["benchmark"] == counts["accuracy"] >= len(CLAIMS["grid"])


def test_cuda_dry_run_lists_one_decode_job_per_grid_point(tmp_path):
    """`snakemake -n` of a CUDA run (device_name set: no GPU needed to plan it): one decode job per point of
    the decode grid, each its own record, plus the append timing and the decode accuracy job."""
    from kvpack.pipeline import config as cfgmod
    from kvpack.study import decode_step

    run = snakemake(tmp_path, "-n", "--configfile", str(CONFIG), "--config", "device=cuda", "device_name=testgpu")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    counts = job_counts(out)
    points = cfgmod.decode_points(cfgmod.load_config(CONFIG))
    assert len(points) == 20 and counts["decode"] == len(points), counts
    assert counts["decode_append"] == 1 and counts["decode_accuracy"] == 1 and counts["figure_decode"] == 1
    planned = planned_outputs(out)
    for p in points:
        assert f"results/testgpu/decode/{decode_step.point_name(p)}.json" in planned
    assert {"results/testgpu/decode/append.json", "results/testgpu/decode/accuracy.json"} <= planned
    # the runner without Snakemake (a bare GPU box) writes the same records to the same paths
    from kvpack.pipeline import runner

    jobs = runner.decode_jobs(cfgmod.load_config(CONFIG), "cuda", Path("results/testgpu/decode"))
    assert {str(out) for out, _, _ in jobs} == {p for p in planned if p.startswith("results/testgpu/decode/")}


def test_cpu_dry_run_skips_the_decode_timings(tmp_path):
    run = snakemake(tmp_path, "-n", "--configfile", str(CONFIG), "--config", "device=cpu", "device_name=testcpu")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    counts = job_counts(out)
    assert "decode" not in counts and "decode_append" not in counts and counts["decode_accuracy"] == 1, counts


def test_two_devices_land_in_two_folders(tmp_path):
    """device_name names results/{device}/: a second machine's run plans its own folder."""
    runs = [snakemake(tmp_path, "-n", "--configfile", str(CONFIG), "--config", f"device_name={name}")
            for name in ("gpu-one", "gpu-two")]
    for run, name in zip(runs, ("gpu-one", "gpu-two")):
        assert run.returncode == 0, run.stderr
        outs = planned_outputs(run.stdout + run.stderr)
        assert f"results/{name}/build.json" in outs
        records = [o for o in outs if re.fullmatch(r"results/[^/]+/(build\.json|(benchmark|accuracy)/.+\.json)", o)]
        assert records and all(o.startswith(f"results/{name}/") for o in records)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The tiny config run end to end once; the tests below inspect what it left."""
    work = tmp_path_factory.mktemp("workflow")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    t0 = time.perf_counter()
    run = snakemake(work, "--cores", "2", "--configfile", str(work / "tiny.yaml"))
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    print(f"tiny end-to-end run: {seconds:.1f} s")
    return work


def _device_dir(work) -> Path:
    dirs = [d for d in (work / "results").iterdir() if d.is_dir() and (d / "build.json").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_end_to_end_records(e2e):
    dev = _device_dir(e2e)
    build = json.loads((dev / "build.json").read_text())
    if not build["cuda"]:  # a CPU machine builds the CPU half and says what it skipped and why
        assert build["gpu_variants_skipped"] == ["naive", "tiled", "coarsened", "vectorized", "fast"]
        assert build["cuda_skipped_reason"]
    assert (e2e / "logs" / dev.name / "build.log").exists()
    expected = [(3, 5, "float32"), (130, 36, "float32"), (130, 36, "bfloat16")]
    for stage in ("benchmark", "accuracy"):
        files = sorted((dev / stage).glob("*.json"))
        assert sorted(f.name for f in files) == sorted(f"{T}x{D}_{dt}.json" for T, D, dt in expected)
        for T, D, dt in expected:
            rec = records.read_record(dev / stage / f"{T}x{D}_{dt}.json")
            assert rec["kind"] == stage and rec["rows"]
            assert (rec["workload"]["T"], rec["workload"]["D"], rec["workload"]["dtype"]) == (T, D, dt)
            assert rec["workload"]["name"] == ("Tiny odd 3x5" if T == 3 else "Small odd")
            assert rec["provenance"]["device_slug"] == dev.name and rec["provenance"]["config_hash"]
            assert (e2e / "logs" / dev.name / stage / f"{T}x{D}_{dt}.log").stat().st_size > 0
    assert (e2e / "results" / "report" / "report.html").exists()
    assert not list(e2e.rglob("*.tmp")), "a half-written record was left behind"


@pytest.mark.slow
def test_rerun_redoes_only_what_is_missing(e2e):
    run = snakemake(e2e, "-n", "--configfile", str(e2e / "tiny.yaml"))
    assert run.returncode == 0 and "Nothing to be done" in run.stdout + run.stderr, run.stdout + run.stderr
    victim = _device_dir(e2e) / "benchmark" / "130x36_bfloat16.json"
    saved = victim.read_bytes()
    victim.unlink()
    try:
        run = snakemake(e2e, "-n", "--configfile", str(e2e / "tiny.yaml"))
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        counts = job_counts(out)
        assert counts.get("benchmark") == 1 and "build" not in counts and "accuracy" not in counts, counts
        assert str(victim.relative_to(e2e)) in planned_outputs(out)
    finally:
        victim.write_bytes(saved)


@pytest.mark.slow
def test_snakemake_report(e2e):
    out = e2e / "snakemake-report.html"
    run = snakemake(e2e, "--configfile", str(e2e / "tiny.yaml"), "--report", str(out))
    assert run.returncode == 0 and out.stat().st_size > 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_end_to_end_tables_figures_report(e2e):
    import pandas as pd

    from kvpack.report import figures, tables

    assert set(TABLES) <= set(tables.TABLE_NAMES) and set(FIGURES) == set(figures.FIGURES)
    results = e2e / "results"
    expected = ([results / "tables" / f"{t}.csv" for t in tables.TABLE_NAMES]
                + [results / "figures" / f"{f}.{ext}" for f in FIGURES for ext in ("png", "svg")]
                + [results / "report" / "report.ipynb", results / "report" / "report.html"])
    for p in expected:
        assert p.exists() and p.stat().st_size > 0, p
    claims = pd.read_csv(results / "tables" / "claims.csv")
    ids = [c["id"] for c in CLAIMS["claims"]]
    from kvpack.report.claims import CLAIM_CHECKS

    ours = [c for c in CLAIM_CHECKS if c not in ids]  # claims of our own (decode_overhead), after the paper's
    assert list(dict.fromkeys(claims["claim_id"])) == ids + ours, "claims.csv: every claim, the paper's first"
    # one row per claim and source (this run, each reference dir), each source judged on its own rows
    assert not claims.duplicated(["claim_id", "source", "device_slug"]).any()
    per_claim = claims.groupby("claim_id", sort=False).size()
    assert (per_claim == per_claim.iloc[0]).all() and "this run" in set(claims["source"])


def test_runner_leaves_a_job_predicted_to_overrun_for_a_later_run(tmp_path, monkeypatch):
    """The runner predicts a benchmark job's time from the largest one of its stage so far (seconds per
    element) and leaves one that would end after --time-limit for the next call, which runs it."""
    from kvpack.pipeline import runner

    clock = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    ran = []

    def fake_job(w, device, settings, prov):
        ran.append((w["T"], w["D"]))
        clock[0] += 1e-6 * w["T"] * w["D"]  # 1 s per million elements, nothing fixed
        return {"T": w["T"]}

    monkeypatch.setattr(runner.bench, "run_benchmark_job", fake_job)
    monkeypatch.setattr(runner.records, "write_record", lambda rec, out: (out.parent.mkdir(parents=True, exist_ok=True),
                                                                         out.write_text(json.dumps(rec))))
    grid = tmp_path / "grid.yaml"  # 1, 2, 4 and 0.5 million elements, in that order
    grid.write_text(yaml.safe_dump({"device": "cpu", "dtypes": ["float32"], "grid": [
        {"name": "a", "T": 1000, "D": 1000}, {"name": "b", "T": 2000, "D": 1000},
        {"name": "c", "T": 4000, "D": 1000}, {"name": "d", "T": 500, "D": 1000}]}))
    argv = ["--configfile", str(CONFIG), "--configfile", str(grid), "--stages", "benchmark",
            "--results", str(tmp_path / "res"), "--device-name", "box", "--time-limit", "5"]
    # a (1 s) and b (2 s, predicted 2) fit in 5 s; c would end at 3 + 4 = 7 s; d (predicted 0.5) still fits
    assert runner.main(argv) == 0
    assert ran == [(1000, 1000), (2000, 1000), (500, 1000)]
    # the next call has no pace yet: it runs what is missing, c alone
    clock[0] = 0.0
    assert runner.main(argv) == 0
    assert ran[3:] == [(4000, 1000)]
    assert sorted(p.name for p in (tmp_path / "res" / "box" / "benchmark").iterdir()) == [
        "1000x1000_float32.json", "2000x1000_float32.json", "4000x1000_float32.json", "500x1000_float32.json"]
    pace = runner.Pace()
    assert pace.predict("benchmark", 10) == 0.0
    pace.observe("benchmark", 4, 2.0)
    pace.observe("benchmark", 2, 9.0)  # a smaller job never sets the pace
    assert pace.predict("benchmark", 10) == pytest.approx(5.0)
