"""rules decode and decode_append: one decode grid point (kvpack.study.decode_step.run_decode_point_job),
or the one-token append timing (run_append_job), on the GPU."""

from kvpack.pipeline.jobs import hold_gpu, job_provenance, log_to_file

log = log_to_file(snakemake.log[0], "decode")
gpu_slot = hold_gpu()  # a local GPU run: this job's own GPU, before anything touches CUDA

from kvpack.pipeline import environment
from kvpack.study import decode_step, records

device = environment.resolve_device(snakemake.params.device)
settings = dict(snakemake.params.settings)
point = snakemake.params.point
payload = {"settings": settings, "device": device, **({"point": point} if point else {})}
provenance = job_provenance(device, snakemake.wildcards.device, payload)
log.info("decode %s %s on %s (%s)", point or "append", settings, device, provenance["device_name"])
if point:
    record = decode_step.run_decode_point_job(point, settings, device, provenance)
else:
    record = decode_step.run_append_job(settings, device, provenance)
records.write_record(record, snakemake.output[0])
