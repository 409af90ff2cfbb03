"""What every measuring job of the workflow (and kvpack.pipeline.runner) does around its kvpack call:
send all output to the job's log, resolve the device on the node the job runs on, and stamp
provenance that names the results/{device}/ folder the record lands in."""

from __future__ import annotations

import logging
import os
import sys

from . import environment


def log_to_file(path: str, name: str) -> logging.Logger:
    """Everything the job prints, C++/CUDA output included, goes to ``path`` (open for the whole job)."""
    logfile = open(path, "w", buffering=1)  # noqa: SIM115
    os.dup2(logfile.fileno(), 1)
    os.dup2(logfile.fileno(), 2)
    sys.stdout = sys.stderr = logfile
    logging.basicConfig(stream=logfile, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        force=True)
    return logging.getLogger(f"kvpack.workflow.{name}")


def job_provenance(device: str, slug: str | None, payload: dict) -> dict:
    """Provenance of one job; ``payload`` (workload, settings, device) is hashed into config_hash,
    so that a change of an unrelated key (the report's title) reruns nothing.

    ``slug`` is the results/{device}/ name the run chose (config device_name on a cluster); the
    detected one is kept beside it when they differ."""
    prov = environment.provenance(device, environment.config_hash(payload))
    if slug and prov["device_slug"] != slug:
        prov["device_slug_detected"] = prov["device_slug"]
        prov["device_slug"] = slug
    return prov
