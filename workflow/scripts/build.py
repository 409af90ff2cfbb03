"""rule build: build (or load from the cache) the kvpack extension; write what was built as JSON.

The extension cache is kvpack's (build/extension/, or $KVPACK_BUILD_DIR): a rerun recompiles only
what changed. On a CPU run the CUDA half is not built; the JSON lists the GPU variants skipped and why.
"""

import logging
import os
import sys

# Everything, the compiler's output included, goes to the log (open for the whole job).
logfile = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115
os.dup2(logfile.fileno(), 1)
os.dup2(logfile.fileno(), 2)
sys.stdout = sys.stderr = logfile
logging.basicConfig(stream=logfile, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
log = logging.getLogger("kvpack.workflow.build")
os.environ.setdefault("MAX_JOBS", str(snakemake.threads))  # ninja's parallel compile jobs

from kvpack import build, environment, ops, records  # noqa: E402

device = environment.resolve_device(snakemake.params.device)
info = build.load(cpu_only=device == "cpu", verbose=True)
if device == "cpu":
    possible, why = build.cuda_build_possible()
    info["cuda_skipped_reason"] = why if not possible else "the run's device is 'cpu' (a GPU is present, not used)"
info["variants"] = list(ops.available_variants(device)) + (list(ops.CPU_VARIANTS) if device == "cuda" else [])
info["gpu_variants_skipped"] = [] if info["cuda"] else list(ops.CUDA_VARIANTS)
info["provenance"] = environment.provenance(device)
if not info["cuda"]:
    log.info("built the CPU half only; GPU variants %s skipped: %s", info["gpu_variants_skipped"],
                 info["cuda_skipped_reason"])
records.write_record(info, snakemake.output[0])
