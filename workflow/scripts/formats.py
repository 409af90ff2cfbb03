"""rule formats: every KV format on one seeded distribution (kvpack.study.formats.run_formats_job), on the
CPU; write its raw record atomically."""


from kvpack.pipeline.jobs import log_to_file

log = log_to_file(snakemake.log[0], "formats")

import torch

from kvpack.pipeline import environment
from kvpack.study import formats, records

torch.set_num_threads(snakemake.threads)
settings = dict(snakemake.params.settings)
distribution = snakemake.wildcards.distribution
provenance = environment.provenance("cpu", environment.config_hash({"distribution": distribution, "settings": settings}))
provenance["device_slug_of_run"] = snakemake.wildcards.device  # results/{device}/: the run's device
log.info("formats study: %s, formats %s, Ds %s, T %s, dtypes %s", distribution, settings["format_names"],
         settings["Ds"], settings["T"], settings["dtypes"])
record = formats.run_formats_job(distribution, settings, provenance)
records.write_record(record, snakemake.output[0])
log.info("%d rows", len(record["rows"]))
