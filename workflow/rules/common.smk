# Config validation, the run's device and workloads, wildcard constraints, path helpers and input
# functions. Every rule names its files through the helpers below, never inline.

import math
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

import kvpack.build
import kvpack.pipeline.config
import kvpack.report.tables

# ---- config: schema (workflow/schemas/config.schema.yaml, defaults filled in place) + semantics ----
# Fails here, before any job is scheduled, with one line per problem naming the key and the reason.
kvpack.pipeline.config.validate_config(config)


# ---- the run's device: 'cpu' or 'cuda', and the slug that names results/{device}/ ----
DEVICE_KIND = kvpack.pipeline.config.resolve_run_device(config)
DEVICE = kvpack.pipeline.config.device_slug(config, DEVICE_KIND)


# ---- GPU slots of a local GPU run: never two GPU jobs on one GPU, every GPU used ----
# The resource `gpu` bounds how many GPU jobs run at once (every GPU job asks for gpu=1); each job
# takes a GPU of its own from KVPACK_GPU_SLOTS (kvpack.pipeline.gpu_slots). A `gpu` given on the
# command line (--resources) or by a profile (the SLURM one provides its own) is left as it is.
def _gpu_plan():
    import kvpack.pipeline.gpu_slots as slots

    if DEVICE_KIND != "cuda" or workflow.remote_exec:
        return []
    ids = slots.slot_ids(config["gpus"]) or [str(i) for i in range(config["gpus"] or 1)]  # a GPU-less submit host
    if "gpu" not in workflow.global_resources:
        workflow.register_resource("gpu", len(ids))
    limit = workflow.global_resources["gpu"]
    limit = getattr(limit, "value", limit)
    ids = ids[: int(limit)] if str(limit).isdigit() else ids
    os.environ[slots.SLOTS_ENV] = ",".join(ids)
    print(f"kvpack: GPU jobs run one per GPU, at most {limit} at once, on GPU {', '.join(ids)} "
          "(CUDA_VISIBLE_DEVICES of each job; lower it with config gpus or --resources gpu=N)", file=sys.stderr)
    return ids


GPU_SLOTS = _gpu_plan()
WORKLOADS = kvpack.pipeline.config.workloads(config)  # [{name, T, D, dtype, seed}], grid x dtypes


wildcard_constraints:
    device=re.escape(DEVICE),  # this machine's results only; other devices' come from reference_dirs
    T=r"[1-9][0-9]*",
    D=r"[1-9][0-9]*",
    dtype="float32|float16|bfloat16",


# ---- paths (docs/records.md); logs mirror them under logs/ ----
BUILD_JSON = "results/{device}/build.json"
BENCHMARK_JSON = "results/{device}/benchmark/{T}x{D}_{dtype}.json"
ACCURACY_JSON = "results/{device}/accuracy/{T}x{D}_{dtype}.json"
DECODE_JSON = "results/{device}/decode/T{T}_B{B}_H{Hq}x{Hkv}_D{D}.json"  # one decode grid point
DECODE_APPEND_JSON = "results/{device}/decode/append.json"
DECODE_ACCURACY_JSON = "results/{device}/decode/accuracy.json"
E2E_JSON = "results/{device}/e2e/{model}_T{T}.json"  # one context of the end-to-end benchmark
REPORT_HTML = "results/report/report.html"


def log_path(result):
    """results/<x>/<y>.<ext> -> logs/<x>/<y>.log"""
    return str(Path("logs", *Path(result).with_suffix(".log").parts[1:]))


def _records(pattern):
    return [pattern.format(device=DEVICE, T=w["T"], D=w["D"], dtype=w["dtype"]) for w in WORKLOADS]


def benchmark_records():
    """This run's raw benchmark records, one per workload x dtype."""
    return _records(BENCHMARK_JSON)


DECODE_POINTS = kvpack.pipeline.config.decode_points(config)  # [{T, batch, q_heads, kv_heads, head_dim}]


def decode_records():
    """This run's decode-step records: one per grid point and the append timing, GPU measurements
    (none on a CPU-only run: decode_skipped_notes() says so)."""
    if DEVICE_KIND != "cuda":
        return []
    points = [
        DECODE_JSON.format(device=DEVICE, T=p["T"], B=p["batch"], Hq=p["q_heads"], Hkv=p["kv_heads"], D=p["head_dim"])
        for p in DECODE_POINTS
    ]
    return points + ([DECODE_APPEND_JSON.format(device=DEVICE)] if config["decode"]["append"] else [])


def decode_accuracy_records():
    """This run's decode accuracy record (every device: the CPU path on a CPU, the fused kernel on a GPU)."""
    return [DECODE_ACCURACY_JSON.format(device=DEVICE)] if config["decode"]["accuracy"]["enabled"] else []


def decode_point(wildcards):
    """The {T, batch, q_heads, kv_heads, head_dim} of one decode job, from its wildcards."""
    return {"T": int(wildcards.T), "batch": int(wildcards.B), "q_heads": int(wildcards.Hq),
            "kv_heads": int(wildcards.Hkv), "head_dim": int(wildcards.D)}


def e2e_records():
    """This run's end-to-end records, one per context T of config e2e: GPU measurements (none on a
    CPU-only run: e2e_skipped_notes() says so)."""
    if DEVICE_KIND != "cuda":
        return []
    return [E2E_JSON.format(device=DEVICE, model=config["e2e"]["model"], T=t)
            for t in kvpack.pipeline.config.e2e_contexts(config)]


def e2e_skipped_notes():
    """What a CPU-only run leaves out of the end-to-end benchmark."""
    if DEVICE_KIND == "cuda" or not config["e2e"]["enabled"]:
        return []
    return [f"e2e: the end-to-end decode benchmark ({config['e2e']['model']} at T = {config['e2e']['T']}) needs a "
            f"CUDA GPU; this run's device is {DEVICE_KIND}, so rule e2e did not run (the report shows the reference "
            "runs' rows, if any)"]


def decode_skipped_notes():
    """What a CPU-only run leaves out of the decode study, for the report's 'What was skipped'."""
    if DEVICE_KIND == "cuda":
        return []
    n = len(DECODE_POINTS)
    return [f"decode: the decode-step timings ({n} grid points of config decode, and the append timing) need a "
            f"CUDA GPU; this run's device is {DEVICE_KIND}, so rule decode did not run (the decode table and figure "
            "show the reference runs' rows, if any)"]


def accuracy_records():
    """This run's raw accuracy records, one per workload x dtype."""
    return _records(ACCURACY_JSON)


def _existing_dir(path):
    # Relative paths: the working directory first (--directory), then the repository.
    for candidate in (Path(path), Path(workflow.basedir) / path):
        if candidate.is_dir():
            return str(candidate)
    return None


def reference_dirs():
    """config['reference_dirs'] that exist (results of record measured elsewhere, e.g. on an H100)."""
    found = (_existing_dir(p) for p in config["reference_dirs"])
    return [d for d in found if d is not None]


def reference_records(stage):
    """The raw records of one stage folder ('benchmark', 'accuracy', 'decode', 'e2e', 'int4') found in reference_dirs()."""
    return sorted(str(p) for d in reference_dirs() for p in Path(d).glob(f"{stage}/*.json"))


def reference_serving_records():
    """The serving records (issue 18) of reference_dirs(): kvpack.report.tables.SERVING_RECORDS."""
    return sorted(str(p) for d in reference_dirs() for pattern in kvpack.report.tables.SERVING_RECORDS
                  for p in Path(d).glob(pattern))


def final_outputs():
    """The targets of the default run: every table, figure and the report, as the report stage
    names them (REPORT_OUTPUTS, workflow/rules/tables.smk; the report alone until it is defined),
    and the raw records themselves, so a record deleted after the report was made is made again."""
    report_stage = globals().get("REPORT_OUTPUTS", [REPORT_HTML])
    study = globals().get("ACCURACY_STUDY_OUTPUTS", [])
    return [*report_stage, *study, *benchmark_records(), *accuracy_records(), *decode_records(),
            *decode_accuracy_records(), *e2e_records()]


def kernel_sources():
    """The sources this run's build compiles: the build reruns (and with it every job) when one
    changes. A CPU run compiles the C++ half only, so CUDA sources do not invalidate it."""
    kernels = Path(workflow.basedir) / "kernels"
    suffixes = {".cpp", ".h"} | ({".cu", ".cuh"} if DEVICE_KIND == "cuda" else set())
    sources = [p for p in kernels.rglob("*") if p.suffix in suffixes]
    if DEVICE_KIND == "cpu":
        sources = [p for p in sources if p.suffix == ".h" or p.name in kvpack.build.CPU_SOURCES]
    return sorted(str(p) for p in sources)


# ---- params ----
def workload(wildcards):
    """The {name, T, D, dtype, seed} of one job, from its wildcards."""
    return kvpack.pipeline.config.find_workload(config, wildcards.T, wildcards.D, wildcards.dtype)


def job_settings(stage):
    """config[stage] plus seed, variants and granularities: what kvpack.study.bench / kvpack.study.accuracy read."""
    return kvpack.pipeline.config.job_settings(config, stage)


# ---- threads and resources ----
def job_threads(wildcards):
    """All the cores snakemake was given: a job runs alone and owns the machine while it times.

    Inside a cluster job snakemake runs with --cores all (the node's count), more than the job
    asked for: there the profile's set-threads decides what was requested."""
    if workflow.remote_exec:
        return 1
    try:
        return workflow.cores
    except WorkflowError:  # a cluster executor without --cores: the profile's set-threads decides
        return 1


def _elements(wildcards):
    return int(wildcards.T) * int(wildcards.D)


def _esize(wildcards):
    return 4 if wildcards.dtype == "float32" else 2


def mem_mb(stage):
    """Host memory of one job, a generous estimate from the shape (for a cluster's scheduler)."""

    def estimate(wildcards):
        n, esize = _elements(wildcards), _esize(wildcards)
        if stage == "benchmark":  # x, q, x_hat and fp32 temporaries of the peers, + the copy ceiling
            need = n * (3 * esize + 1 + 12)
        else:  # x, q, x_hat, and the float64 reference (~48 bytes/element) up to its size limit
            need = n * (2 * esize + 1 + 4) + 48 * min(n, config["accuracy"]["reference_max_elements"])
        return 2048 + math.ceil(need / 2**20)

    return estimate


def runtime_min(wildcards):
    """Minutes of one job, generous: CPU ops are capped by cpu_time_budget_s, the GPU is quick."""
    return 20 + 2 * math.ceil(_elements(wildcards) / 2**24)


def job_resources(stage):
    """resources: a GPU only when the run's device is CUDA (a CPU run asks for none)."""
    res = {"mem_mb": mem_mb(stage), "runtime": runtime_min}
    if DEVICE_KIND == "cuda":
        res["gpu"] = 1
    return res


BUILD_RESOURCES = {"mem_mb": 4096, "runtime": 30, **({"gpu": 1} if DEVICE_KIND == "cuda" else {})}
# decode: the caches live on the GPU (up to ~100 GB at B = 32, T = 131072); the host holds little
DECODE_RESOURCES = {"mem_mb": 8192, "runtime": 20, **({"gpu": 1} if DEVICE_KIND == "cuda" else {})}
# e2e: an 8B model and its caches on the GPU; the host builds nothing large (weights made on the device)
E2E_RESOURCES = {"mem_mb": 16384, "runtime": 60, **({"gpu": 1} if DEVICE_KIND == "cuda" else {})}
