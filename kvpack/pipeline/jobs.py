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


def hold_gpu():
    """In a GPU job of a local run: take one of the run's GPU slots (KVPACK_GPU_SLOTS, set by the
    workflow) and make it this process's only GPU, before anything touches CUDA. The slot is held
    until the process ends (a crashed job gives it back). Elsewhere (a CPU run, a cluster job, whose
    scheduler assigns its GPU) nothing happens. Returns the slot or None."""
    from . import gpu_slots

    ids = [g for g in os.environ.get(gpu_slots.SLOTS_ENV, "").split(",") if g]
    if not ids:
        return None
    slot = gpu_slots.acquire(ids)
    logging.getLogger("kvpack.workflow").info("holding GPU %s of %s (CUDA_VISIBLE_DEVICES=%s)", slot.gpu, ids, slot.gpu)
    return slot


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
