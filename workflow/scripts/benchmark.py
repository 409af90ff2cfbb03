"""rule benchmark: time every variant of one workload side by side (kvpack.bench.run_benchmark_job)
and write its raw record (docs/records.md) atomically."""

import logging
import os
import sys

logfile = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 (the log stays open for the whole job)
os.dup2(logfile.fileno(), 1)
os.dup2(logfile.fileno(), 2)
sys.stdout = sys.stderr = logfile
logging.basicConfig(stream=logfile, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
log = logging.getLogger("kvpack.workflow.benchmark")

import torch  # noqa: E402

from kvpack import bench, environment, records  # noqa: E402

torch.set_num_threads(snakemake.threads)
device = environment.resolve_device(snakemake.params.device)
workload, settings = dict(snakemake.params.workload), dict(snakemake.params.settings)
provenance = environment.provenance(
    device, environment.config_hash({"workload": workload, "settings": settings, "device": device})
)
if provenance["device_slug"] != snakemake.wildcards.device:  # config device_name names this machine
    provenance["device_slug_detected"] = provenance["device_slug"]
    provenance["device_slug"] = snakemake.wildcards.device
log.info("benchmark %s on %s (%s)", workload, device, provenance["device_name"])
record = bench.run_benchmark_job(workload, device, settings, provenance)
records.write_record(record, snakemake.output[0])
