"""rule decode: the decode-step cost of an INT8 cache on the GPU (kvpack.study.decode_step.run_decode_job)."""

from kvpack.pipeline.jobs import job_provenance, log_to_file

log = log_to_file(snakemake.log[0], "decode")

from kvpack.pipeline import environment
from kvpack.study import decode_step, records

device = environment.resolve_device(snakemake.params.device)
settings = dict(snakemake.params.settings)
provenance = job_provenance(device, snakemake.wildcards.device, {"settings": settings, "device": device})
log.info("decode %s on %s (%s)", settings, device, provenance["device_name"])
records.write_record(decode_step.run_decode_job(settings, device, provenance), snakemake.output[0])
