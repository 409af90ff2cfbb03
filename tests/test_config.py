"""The workflow's configuration: the shipped configs pass, bad ones fail before any job runs with a
message naming the key and the reason, and the schema agrees with the package and the docs.

Most bad configs are checked through kvpack.pipeline.config.validate_config (what common.smk calls); a few go
through a real `snakemake -n`, which must stop at parse time, before scheduling a job.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kvpack
from kvpack.pipeline import config as kvconfig
from kvpack.study import accuracy, bench, workloads

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "config.yaml"
PAPER = ROOT / "config" / "paper.yaml"
CLAIMS = ROOT / "reports" / "paper" / "claims.yaml"
HAS_CUDA = torch.cuda.is_available()


def load(path):
    return yaml.safe_load(Path(path).read_text())


def merged(*overlays):
    """config.yaml with overlays merged as snakemake merges --configfile (lists replaced)."""
    cfg = load(CONFIG)
    for o in overlays:
        kvconfig._merge(cfg, copy.deepcopy(o))
    return cfg


# ---- the shipped configs ------------------------------------------------------------------------

def test_default_config_is_valid():
    cfg = kvconfig.validate_config(merged())
    assert cfg["device"] == "auto" and len(kvconfig.workloads(cfg)) >= 6


def test_paper_config_overrides_the_grid_and_the_serial_baseline_limits_only():
    # Deliberately more than the grid: the paper's speedups are over its serial CPU baseline at every
    # size, so paper.yaml runs it up to 2^30 elements; and it switches the real-model study on.
    paper = load(PAPER)
    assert set(paper) == {"grid", "benchmark", "accuracy_study"}
    assert set(paper["benchmark"]) == {"cpu_serial_max_elements", "cpu_repeats", "cpu_time_budget_s"}
    assert paper["benchmark"]["cpu_serial_max_elements"] >= 131072 * 8192
    cfg = kvconfig.load_config(CONFIG, PAPER)
    default = kvconfig.load_config(CONFIG)
    same = lambda c: {k: v for k, v in c.items() if k not in paper}
    assert same(cfg) == same(default)
    for key in ("benchmark", "accuracy_study"):
        assert {k: v for k, v in cfg[key].items() if k not in paper[key]} == \
               {k: v for k, v in default[key].items() if k not in paper[key]}


def test_paper_config_has_the_papers_ten_workloads_and_the_sweep():
    cfg = kvconfig.load_config(CONFIG, PAPER)
    grid = {(e["T"], e["D"]): e for e in cfg["grid"]}
    for w in load(CLAIMS)["grid"]:
        entry = grid[(w["T"], w["D"])]
        assert entry["name"] == w["name"], f"{w['T']}x{w['D']} must carry the paper's name {w['name']!r}"
    # head-dimension sweep at T = 131072: D = 64 .. 8192, every power of two
    assert {D for (T, D) in grid if T == 131072} >= {2**k for k in range(6, 14)}
    jobs = {(w["T"], w["D"], w["dtype"]) for w in kvconfig.workloads(cfg)}
    for D in (1024, 2048, 4096, 8192):  # the realistic LLM shapes also in half precision
        assert {(131072, D, dt) for dt in ("float32", "float16", "bfloat16")} <= jobs
    assert (1024, 64, "float32") in jobs and (1024, 64, "float16") not in jobs


def test_defaults_fill_every_key_and_match_config_yaml():
    """The schema's defaults are the default run's settings: a config of one grid gets them all."""
    minimal = kvconfig.validate_config({"grid": [{"name": "x", "T": 4, "D": 4}]}, check_device=False)
    full = kvconfig.validate_config(merged(), check_device=False)
    assert {k: v for k, v in minimal.items() if k != "grid"} == {k: v for k, v in full.items() if k != "grid"}
    assert minimal["benchmark"]["cpu_serial_max_elements"] == 2**25
    assert minimal["grid"][0]["dtypes"] is None
    # defaults are copies, never shared between configs
    other = kvconfig.validate_config({}, check_device=False)
    other["benchmark"]["repeats"] = 99
    assert kvconfig.validate_config({}, check_device=False)["benchmark"]["repeats"] == 20


# ---- the schema agrees with the package and the docs ----------------------------------------------

def _objects(schema, path="config"):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _objects(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _objects(schema["items"], f"{path}[]")


def test_schema_is_closed_documented_and_defaulted():
    schema = kvconfig.load_schema()
    assert "2020-12" in schema["$schema"]
    for path, sub in _objects(schema):
        assert "description" in sub or path.endswith("[]") or path == "config", f"{path} has no description"
        if sub.get("type") == "object" or "object" in (sub.get("type") or []):
            assert sub.get("additionalProperties") is False, f"{path} must set additionalProperties: false"
        parent_required = set()
        if path.startswith("config.grid[]."):
            parent_required = set(schema["properties"]["grid"]["items"]["required"])
        leaf = path.rsplit(".", 1)[-1]
        if path.count(".") >= 1 and "[]" not in leaf and leaf not in parent_required:
            assert "default" in sub, f"{path} has no default"


def test_schema_enums_are_the_packages():
    props = kvconfig.load_schema()["properties"]
    assert props["variants"]["else"]["items"]["enum"] == list(kvpack.VARIANTS)
    assert props["granularities"]["items"]["enum"] == list(kvpack.GRANULARITIES)
    assert props["dtypes"]["items"]["enum"] == list(workloads.DTYPES)
    assert props["benchmark"]["properties"]["peers"]["items"]["enum"] == list(bench.PEERS)


def test_schema_covers_what_the_jobs_read():
    """Every setting kvpack.study.bench / kvpack.study.accuracy read is a config key (or one the workflow adds)."""
    props = kvconfig.load_schema()["properties"]
    added = {"variants", "granularities", "seed"}
    assert set(bench.DEFAULTS) - added <= set(props["benchmark"]["properties"])
    assert set(accuracy.DEFAULTS) - added - {"cpu_serial_max_elements"} <= set(props["accuracy"]["properties"])
    for k, v in props["benchmark"]["properties"].items():
        if k in bench.DEFAULTS:
            assert v["default"] == bench.DEFAULTS[k], f"benchmark.{k}: schema and kvpack.study.bench disagree"
    cfg = kvconfig.validate_config({}, check_device=False)
    s = kvconfig.job_settings(cfg, "accuracy")
    assert set(accuracy.DEFAULTS) <= set(s)


def test_readme_documents_every_key():
    readme = (ROOT / "config" / "README.md").read_text()
    for path, _ in _objects(kvconfig.load_schema()):
        if path == "config" or path.endswith("[]"):
            continue
        key = path.removeprefix("config.")
        assert f"`{key}`" in readme, f"config/README.md does not document `{key}`"


def test_job_settings_and_workloads():
    cfg = kvconfig.validate_config(
        {"grid": [{"name": "a", "T": 8, "D": 4, "dtypes": ["float16", "bfloat16"]}, {"name": "b", "T": 3, "D": 5}],
         "seed": 7}, check_device=False)
    assert kvconfig.workloads(cfg) == [
        {"name": "a", "T": 8, "D": 4, "dtype": "float16", "seed": 7},
        {"name": "a", "T": 8, "D": 4, "dtype": "bfloat16", "seed": 7},
        {"name": "b", "T": 3, "D": 5, "dtype": "float32", "seed": 7},
    ]
    assert kvconfig.find_workload(cfg, "3", "5", "float32")["name"] == "b"
    assert kvconfig.find_workload(cfg, "9", "9", "float32")["name"] == "9x9"
    b = kvconfig.job_settings(cfg, "benchmark")
    assert b["seed"] == 7 and b["repeats"] == 20 and b["variants"] == "all" and b["granularities"] == ["channel"]
    a = kvconfig.job_settings(cfg, "accuracy")
    assert a["query_seed"] == 1 and a["cpu_serial_max_elements"] == 2**25
    # a decode point's job reads no grid key: a point added to the grid reruns no other
    d = kvconfig.job_settings(cfg, "decode")
    assert set(d) == {"granularity", "warmup", "repeats", "seed", "copy_bytes", "page_sizes", "int4_group"}
    assert d["page_sizes"] == [16, 64] and "page_sizes" not in kvconfig.job_settings(cfg, "decode_append")
    assert d["int4_group"] == 32 and "int4_group" not in kvconfig.job_settings(cfg, "decode_append")
    assert kvconfig.job_settings(cfg, "decode_append")["append_shape"] == {"batch": 32, "kv_heads": 8, "head_dim": 128}
    assert kvconfig.job_settings(cfg, "decode_accuracy")["distributions"] == ["uniform", "outlier_keys", "real_model"]
    points = kvconfig.decode_points(cfg)
    assert len(points) == 20 and points[0] == {"T": 4096, "batch": 1, "q_heads": 32, "kv_heads": 32, "head_dim": 128}


# ---- bad configs: each fails with the key and the reason ------------------------------------------

BAD = [
    # (id, overlay on config.yaml, fragments the message must contain)
    ("unknown-top-level-key", {"repeats": 3}, ["unknown top-level key 'repeats'", "allowed:"]),
    ("unknown-nested-key", {"benchmark": {"repeat": 3}}, ["benchmark: unknown key 'repeat'"]),
    ("unknown-grid-key", {"grid": [{"name": "a", "T": 4, "D": 4, "d": 4}]}, ["grid[0]: unknown key 'd'"]),
    ("negative-T", {"grid": [{"name": "a", "T": -5, "D": 64}]}, ["grid[0].T", "-5 is less than the minimum of 1"]),
    ("zero-D", {"grid": [{"name": "a", "T": 5, "D": 0}]}, ["grid[0].D", "0 is less than the minimum of 1"]),
    ("D-a-string", {"grid": [{"name": "a", "T": 4, "D": "64"}]}, ["grid[0].D", "not of type integer"]),
    ("D-a-float", {"grid": [{"name": "a", "T": 4, "D": 64.5}]}, ["grid[0].D", "64.5 is not of type integer"]),
    ("D-a-whole-float", {"grid": [{"name": "a", "T": 4, "D": 64.0}]}, ["grid[0].D", "64.0 is not of type integer"]),
    ("T-a-bool", {"grid": [{"name": "a", "T": True, "D": 4}]}, ["grid[0].T", "not of type integer"]),
    ("missing-T", {"grid": [{"name": "a", "D": 64}]}, ["grid[0]: missing required key 'T'"]),
    ("missing-name", {"grid": [{"T": 4, "D": 64}]}, ["grid[0]: missing required key 'name'"]),
    ("empty-grid", {"grid": []}, ["grid: needs at least 1 item, got 0"]),
    ("unknown-variant", {"variants": ["warp_specialized"]}, ["variants[0]", "'warp_specialized' is not one of"]),
    ("variants-not-all", {"variants": "everything"}, ["variants", "'everything' is neither 'all'"]),
    ("unknown-dtype", {"dtypes": ["int4"]}, ["dtypes[0]", "'int4' is not one of"]),
    ("unknown-dtype-in-grid", {"grid": [{"name": "a", "T": 4, "D": 4, "dtypes": ["fp8"]}]},
     ["grid[0].dtypes[0]", "'fp8' is not one of"]),
    ("device-tpu", {"device": "tpu"}, ["device", "'tpu' is not one of ['auto', 'cpu', 'cuda']"]),
    ("repeats-0", {"benchmark": {"repeats": 0}}, ["benchmark.repeats", "0 is less than the minimum of 1"]),
    ("warmup-negative", {"benchmark": {"warmup": -1}}, ["benchmark.warmup", "-1 is less than the minimum of 0"]),
    ("reference-dirs-not-a-list", {"reference_dirs": "reports/reference/h100"},
     ["reference_dirs", "not of type array"]),
    ("reference-dir-typo", {"reference_dirs": ["reports/reference/h100", "reports/reference/h20"]},
     ["reference_dirs[1]: reports/reference/h20 does not exist (typo?)", "existing beside it: reports/reference/h100"]),
    ("reference-dir-without-records", {"reference_dirs": ["reports/reference/h100", "docs"]},
     ["reference_dirs[1]: docs holds no records"]),
    ("granularity-unknown", {"granularities": ["block"]}, ["granularities[0]", "'block' is not one of"]),
    ("peer-unknown", {"benchmark": {"peers": ["cublas"]}}, ["benchmark.peers[0]", "'cublas' is not one of"]),
    ("device-name-not-a-slug", {"device_name": "My GPU"}, ["device_name", "does not match"]),
    ("end-to-end-not-bool", {"benchmark": {"end_to_end": "yes"}}, ["benchmark.end_to_end", "not of type boolean"]),
    ("duplicate-shape", {"grid": [{"name": "a", "T": 4, "D": 4}, {"name": "b", "T": 4, "D": 4}]},
     ["grid[1]: shape T=4, D=4 repeats grid[0]"]),
    ("duplicate-name", {"grid": [{"name": "a", "T": 4, "D": 4}, {"name": "a", "T": 8, "D": 4}]},
     ["grid[1].name: 'a' is already the name of grid[0]"]),
    # the decode grid
    ("decode-gqa-not-a-multiple", {"decode": {"heads": [[32, 32], [32, 5]]}},
     ["decode.heads[1]: q_heads 32 is not a multiple of kv_heads 5"]),
    ("decode-head-dim-96", {"decode": {"head_dim": 96}},
     ["decode.head_dim: 96 is not a head dimension the fused kernel takes (64, 128, 256)"]),
    ("decode-extra-head-dim-32", {"decode": {"extra_head_dims": {"head_dims": [64, 32]}}},
     ["decode.extra_head_dims.head_dims[1]: 32 is not a head dimension"]),
    ("decode-extra-heads", {"decode": {"extra_head_dims": {"heads": [12, 8]}}},
     ["decode.extra_head_dims.heads: q_heads 12 is not a multiple of kv_heads 8"]),
    ("decode-heads-not-pairs", {"decode": {"heads": 32}}, ["decode.heads", "not of type array"]),
    ("decode-heads-triple", {"decode": {"heads": [[32, 8, 1]]}}, ["decode.heads[0]", "too long"]),
    ("decode-duplicate-heads", {"decode": {"heads": [[32, 8], [32, 8]]}}, ["decode.heads[1]: [32, 8] repeats"]),
    ("decode-T-zero", {"decode": {"T": [0]}}, ["decode.T[0]", "0 is less than the minimum of 1"]),
    ("decode-batch-empty", {"decode": {"batch": []}}, ["decode.batch: needs at least 1 item"]),
    ("decode-granularity", {"decode": {"granularity": "block"}}, ["decode.granularity", "'block' is not one of"]),
    ("decode-append-head-dim", {"decode": {"append_shape": {"head_dim": 100}}},
     ["decode.append_shape.head_dim: 100 is not a head dimension"]),
    ("decode-accuracy-distribution", {"decode": {"accuracy": {"distributions": ["gaussian"]}}},
     ["decode.accuracy.distributions[0]", "'gaussian' is not one of"]),
    ("decode-accuracy-heads", {"decode": {"accuracy": {"heads": [6, 4]}}},
     ["decode.accuracy.heads: q_heads 6 is not a multiple of kv_heads 4"]),
    ("decode-unknown-key", {"decode": {"points": []}}, ["decode: unknown key 'points'"]),
    ("decode-page-size-24", {"decode": {"page_sizes": [16, 24]}}, ["decode.page_sizes[1]", "multiple of 16"]),
    ("decode-page-size-512", {"decode": {"page_sizes": [512]}}, ["decode.page_sizes[0]", "maximum of 256"]),
    ("decode-int4-group-16", {"decode": {"int4_group": 16}}, ["decode.int4_group", "16"]),
]


@pytest.mark.parametrize("overlay,fragments", [pytest.param(o, f, id=i) for i, o, f in BAD])
def test_bad_config_names_the_key_and_the_reason(overlay, fragments):
    with pytest.raises(kvconfig.ConfigError) as e:
        kvconfig.validate_config(merged(overlay), check_device=False)
    msg = str(e.value)
    assert msg.startswith("invalid config:")
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_reference_dirs_that_hold_records_pass(tmp_path, monkeypatch):
    # relative to the checkout (the working directory elsewhere), relative to the working directory, absolute
    ref = tmp_path / "ref" / "gpu-x"
    (ref / "decode").mkdir(parents=True)
    (ref / "decode" / "append.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    dirs = ["reports/reference/h100", "ref/gpu-x", str(ref)]
    assert kvconfig.validate_config(merged({"reference_dirs": dirs}), check_device=False)["reference_dirs"] == dirs
    assert kvconfig.resolve_reference_dir("ref/gpu-x") == Path("ref/gpu-x")
    assert kvconfig.resolve_reference_dir("reports/reference/h100") == ROOT / "reports/reference/h100"
    assert kvconfig.validate_config(merged({"reference_dirs": []}), check_device=False)["reference_dirs"] == []


def test_every_shipped_reference_dir_exists():
    for d in load(CONFIG)["reference_dirs"] + kvconfig.load_schema()["properties"]["reference_dirs"]["default"]:
        assert kvconfig.resolve_reference_dir(d) is not None, f"{d} is a shipped reference dir, but not in the checkout"


def test_every_problem_is_reported_at_once():
    with pytest.raises(kvconfig.ConfigError) as e:
        kvconfig.validate_config(merged({"device": "tpu", "benchmark": {"repeats": 0}, "seed": -1}), check_device=False)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3 and any("device" in x for x in lines) and any("seed" in x for x in lines)


def test_not_a_mapping():
    with pytest.raises(kvconfig.ConfigError, match="expected a mapping"):
        kvconfig.validate_config(None)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_fails_at_start():
    with pytest.raises(kvconfig.ConfigError) as e:
        kvconfig.validate_config(merged({"device": "cuda"}))
    assert "device" in str(e.value) and "'cuda' was requested" in str(e.value) and "sees no CUDA device" in str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_gpu_only_variants_on_a_cpu_device_fail():
    with pytest.raises(kvconfig.ConfigError, match=r"variants: none of \['fast'\] runs on device 'cpu'"):
        kvconfig.validate_config(merged({"variants": ["fast"]}))


def test_cuda_with_device_name_is_trusted_for_a_cluster():
    """A submit host without a GPU can plan a GPU run when it is told the device's name."""
    cfg = kvconfig.validate_config(merged({"device": "cuda", "device_name": "nvidia-h100-80gb-hbm3"}))
    assert kvconfig.resolve_run_device(cfg) == "cuda"
    assert kvconfig.device_slug(cfg) == "nvidia-h100-80gb-hbm3"


# ---- through a real `snakemake -n` -------------------------------------------------------------

def snakemake(tmp_path, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
         *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )


SNAKEMAKE_BAD = [
    ("unknown-key", {"repeats": 3}, "unknown top-level key 'repeats'"),
    ("negative-T", {"grid": [{"name": "a", "T": -5, "D": 64}]}, "grid[0].T: -5 is less than the minimum of 1"),
    ("D-a-float", {"grid": [{"name": "a", "T": 4, "D": 64.5}]}, "grid[0].D: 64.5 is not of type integer"),
    ("repeats-0", {"benchmark": {"repeats": 0}}, "benchmark.repeats: 0 is less than the minimum of 1"),
    ("decode-gqa", {"decode": {"heads": [[32, 6]]}}, "decode.heads[0]: q_heads 32 is not a multiple of kv_heads 6"),
    ("reference-dir-typo", {"reference_dirs": ["reports/reference/h10"]},
     "reference_dirs[0]: reports/reference/h10 does not exist (typo?)"),
    pytest.param("cuda-on-cpu-only", {"device": "cuda"}, "device 'cuda' was requested",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")),
]


@pytest.mark.parametrize("name,overlay,fragment", SNAKEMAKE_BAD)
def test_snakemake_dry_run_stops_before_any_job(tmp_path, name, overlay, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    run = snakemake(tmp_path, "-n", "--configfile", str(CONFIG), str(bad))
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "invalid config:" in out and fragment in out, out
    assert "Job stats" not in out and "rule build" not in out and not (tmp_path / "results").exists()


def test_e2e_schema_defaults_are_the_study_defaults():
    from kvpack.study import e2e

    props = kvconfig.load_schema()["properties"]["e2e"]["properties"]
    for k, v in props.items():
        if k in e2e.DEFAULTS:
            assert v["default"] == e2e.DEFAULTS[k], f"e2e.{k}: schema and kvpack.study.e2e disagree"
    cfg = kvconfig.validate_config({}, check_device=False)
    assert kvconfig.job_settings(cfg, "e2e")["methods"] == e2e.DEFAULTS["methods"]
    with pytest.raises(kvconfig.ConfigError, match=r"e2e.model: no data/models/llama-9b.json"):
        kvconfig.validate_config({"e2e": {"model": "llama-9b"}}, check_device=False)
    with pytest.raises(kvconfig.ConfigError, match=r"e2e.compiled_points\[0\]: \[4096, 3\] is not a point"):
        kvconfig.validate_config({"e2e": {"compiled_points": [[4096, 3]]}}, check_device=False)
