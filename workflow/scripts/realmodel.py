"""rule realmodel: all-MiniLM-L6-v2 with K/V quantized in each format (kvpack.study.realmodel.run_realmodel_job);
write its raw record atomically. Without the model package the record says 'skipped' and why."""


from kvpack.pipeline.jobs import log_to_file

log = log_to_file(snakemake.log[0], "realmodel")

import torch

from kvpack.pipeline import environment
from kvpack.study import realmodel, records

torch.set_num_threads(snakemake.threads)  # more threads than cores slows the small matmuls down a lot
settings = dict(snakemake.params.settings)
provenance = environment.provenance("cpu", environment.config_hash({"settings": settings}))
provenance["device_slug_of_run"] = snakemake.wildcards.device
ok, why = realmodel.model_status()
log.info("real model: %s", why if not ok else f"{realmodel.MODEL_NAME} from {why}")
record = realmodel.run_realmodel_job(settings, provenance, snakemake.input.corpus)
records.write_record(record, snakemake.output[0])
for row in record["rows"]:
    log.info("%s", row)
