"""rule decode_accuracy: fused INT8 decoding against attention over the unquantized cache
(kvpack.study.decode_accuracy.run_decode_accuracy_job), on the run's device."""

from kvpack.pipeline.jobs import hold_gpu, job_provenance, log_to_file

log = log_to_file(snakemake.log[0], "decode_accuracy")
gpu_slot = hold_gpu()  # a local GPU run: this job's own GPU, before anything touches CUDA

from kvpack.pipeline import environment
from kvpack.study import decode_accuracy, records

device = environment.resolve_device(snakemake.params.device)
settings = dict(snakemake.params.settings)
provenance = job_provenance(device, snakemake.wildcards.device, {"settings": settings, "device": device})
log.info("decode accuracy %s on %s (%s)", settings, device, provenance["device_name"])
records.write_record(decode_accuracy.run_decode_accuracy_job(settings, device, provenance), snakemake.output[0])
