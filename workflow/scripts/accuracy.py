"""rule accuracy: errors of every variant on one workload (kvpack.study.accuracy.run_accuracy_job) and
write its raw record (docs/records.md) atomically."""

from kvpack.pipeline.jobs import hold_gpu, job_provenance, log_to_file

log = log_to_file(snakemake.log[0], "accuracy")
gpu_slot = hold_gpu()  # a local GPU run: this job's own GPU, before anything touches CUDA

import torch

from kvpack.pipeline import environment
from kvpack.study import accuracy, records

torch.set_num_threads(snakemake.threads)
device = environment.resolve_device(snakemake.params.device)  # fails clearly on a node without the device
workload, settings = dict(snakemake.params.workload), dict(snakemake.params.settings)
provenance = job_provenance(device, snakemake.wildcards.device, {"workload": workload, "settings": settings, "device": device})
log.info("accuracy %s on %s (%s)", workload, device, provenance["device_name"])
records.write_record(accuracy.run_accuracy_job(workload, device, settings, provenance), snakemake.output[0])
