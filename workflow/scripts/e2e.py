"""rule e2e: the end-to-end decode benchmark at one context T (kvpack.study.e2e.run_e2e_job), on the GPU."""

from kvpack.pipeline.jobs import hold_gpu, job_provenance, log_to_file

log = log_to_file(snakemake.log[0], "e2e")
gpu_slot = hold_gpu()  # a local GPU run: this job's own GPU, before anything touches CUDA

from kvpack.pipeline import environment
from kvpack.study import e2e, records

device = environment.resolve_device(snakemake.params.device)
settings = dict(snakemake.params.settings)
T = int(snakemake.wildcards.T)
provenance = job_provenance(device, snakemake.wildcards.device, {"settings": settings, "device": device, "T": T})
log.info("e2e %s T=%d on %s (%s)", settings["model"], T, device, provenance["device_name"])
record = e2e.run_e2e_job({**settings, "T": [T]}, device, provenance,
                         log=lambda row: log.info("%s B=%s %s %s", row["method"], row["batch"], row["status"],
                                                  row.get("step_median_ms", row.get("skip_reason"))))
records.write_record(record, snakemake.output[0])
