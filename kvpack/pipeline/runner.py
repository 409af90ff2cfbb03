"""Run the workflow's measurement jobs without Snakemake, writing the same records to the same paths.

For machines where Snakemake is not installed (a bare GPU box): the benchmark and accuracy jobs
of every workload of a config, and the decode stage (one record per decode grid point, the append
timing, the decode accuracy record), in one process (the extension loads once), skipping records
that already exist, stopping cleanly before ``--time-limit`` seconds so a partial run can be resumed.

    python -m kvpack.pipeline.runner --configfile config/config.yaml --configfile config/paper.yaml \
        --stages benchmark accuracy decode e2e --results results [--time-limit 540] [--device-name h200]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path

from ..study import accuracy, bench, records
from . import config as cfgmod
from .jobs import job_provenance

log = logging.getLogger("kvpack.pipeline.runner")


def record_path(results: Path, slug: str, stage: str, w: dict) -> Path:
    return results / slug / stage / f"{w['T']}x{w['D']}_{w['dtype']}.json"


def decode_jobs(config: dict, device: str, outdir: Path) -> list:
    """The decode stage's jobs as (record path, provenance payload, run(provenance) -> record), the
    paths and settings of workflow/rules/decode.smk: one per grid point and the append timing (CUDA
    only: on a CPU they are left out, and logged), and the decode accuracy record (every device)."""
    from ..study import decode_accuracy, decode_step

    jobs = []
    if device == "cuda":
        settings = cfgmod.job_settings(config, "decode")
        for p in cfgmod.decode_points(config):
            payload = {"settings": settings, "device": device, "point": p}
            jobs.append((outdir / f"{decode_step.point_name(p)}.json", payload,
                         partial(decode_step.run_decode_point_job, p, settings, device)))
        if config["decode"]["append"]:
            settings = cfgmod.job_settings(config, "decode_append")
            jobs.append((outdir / "append.json", {"settings": settings, "device": device},
                         partial(decode_step.run_append_job, settings, device)))
    else:
        log.info("decode: the %d grid points and the append timing need a CUDA GPU; this run's device is %s: "
                 "skipped", len(cfgmod.decode_points(config)), device)
    if config["decode"]["accuracy"]["enabled"]:
        settings = cfgmod.job_settings(config, "decode_accuracy")
        jobs.append((outdir / "accuracy.json", {"settings": settings, "device": device},
                     partial(decode_accuracy.run_decode_accuracy_job, settings, device)))
    return jobs


def e2e_jobs(config: dict, device: str, outdir: Path) -> list:
    """The e2e stage's jobs (workflow/rules/e2e.smk): one per context T, CUDA only (logged on a CPU)."""
    from ..study import e2e

    if device != "cuda":
        log.info("e2e: the end-to-end benchmark needs a CUDA GPU; this run's device is %s: skipped", device)
        return []
    settings = cfgmod.job_settings(config, "e2e")
    return [(outdir / e2e.record_name(settings["model"], T), {"settings": settings, "device": device, "T": T},
             partial(e2e.run_e2e_job, {**settings, "T": [T]}, device)) for T in cfgmod.e2e_contexts(config)]


class Pace:
    """What a stage's next job will take, from the largest job of that stage run so far in this process:
    its seconds per element times the next job's elements (the serial CPU baseline makes a paper job's
    time nearly proportional to its size; a small job's fixed costs make the estimate high, never low).
    Nothing is predicted before a stage's first job."""

    def __init__(self):
        self._largest: dict[str, tuple[int, float]] = {}  # stage -> (elements, seconds) of its largest job

    def observe(self, stage: str, elements: int, seconds: float) -> None:
        if elements >= self._largest.get(stage, (0, 0.0))[0]:
            self._largest[stage] = (elements, seconds)

    def predict(self, stage: str, elements: int) -> float:
        n, s = self._largest.get(stage, (0, 0.0))
        return s * elements / n if n else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", action="append", required=True)
    ap.add_argument("--stages", nargs="+", default=["benchmark", "accuracy"],
                    choices=["benchmark", "accuracy", "decode", "e2e"])
    ap.add_argument("--results", default="results")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no job after this many seconds, nor a benchmark or accuracy job predicted (Pace) "
                         "to end after them")
    ap.add_argument("--max-elements", type=int, default=None, help="only workloads with at most this many elements")
    ap.add_argument("--device-name", default=None,
                    help="name of <results>/<name>/ (config device_name; default: the device's slug)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    config = cfgmod.load_config(*args.configfile)
    if args.device_name:
        config["device_name"] = args.device_name
    device = cfgmod.resolve_run_device(config)
    slug = cfgmod.device_slug(config, device)
    results = Path(args.results)
    t0 = time.perf_counter()
    jobs = [(stage, w) for w in cfgmod.workloads(config) for stage in args.stages if stage in ("benchmark", "accuracy")]
    if args.max_elements:
        jobs = [(s, w) for s, w in jobs if w["T"] * w["D"] <= args.max_elements]
    done = skipped = 0
    pace = Pace()
    for stage, w in jobs:
        out = record_path(results, slug, stage, w)
        if out.exists():
            continue
        elements = w["T"] * w["D"]
        elapsed = time.perf_counter() - t0
        if args.time_limit and elapsed + pace.predict(stage, elements) > args.time_limit:
            log.info("%s %dx%d %s: left for a later run (%.0f s in, about %.0f s more predicted, limit %.0f s)",
                     stage, w["T"], w["D"], w["dtype"], elapsed, pace.predict(stage, elements), args.time_limit)
            skipped += 1
            continue
        log.info("%s %s %dx%d %s", stage, w["name"], w["T"], w["D"], w["dtype"])
        settings = cfgmod.job_settings(config, stage)
        prov = job_provenance(device, slug, {"workload": w, "settings": settings, "device": device})
        run = bench.run_benchmark_job if stage == "benchmark" else accuracy.run_accuracy_job
        started = time.perf_counter()
        records.write_record(run(w, device, settings, prov), out)
        pace.observe(stage, elements, time.perf_counter() - started)
        done += 1
    staged = [("decode", decode_jobs), ("e2e", e2e_jobs)]  # jobs that build their own provenance payload
    for stage, jobs_of in staged:
        if stage not in args.stages:
            continue
        for out, job, run in jobs_of(config, device, results / slug / stage):
            if out.exists():
                continue
            if args.time_limit and time.perf_counter() - t0 > args.time_limit:
                skipped += 1
                continue
            log.info("%s %s", stage, out.name)
            records.write_record(run(job_provenance(device, slug, job)), out)
            done += 1
    log.info("ran %d jobs in %.0f s; %d left for a later run (time limit)", done, time.perf_counter() - t0, skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
