"""rule build: build (or load from the cache) the kvpack extension; write what was built as JSON.

The extension cache is kvpack's (build/extension/, or $KVPACK_BUILD_DIR): a rerun recompiles only
what changed. On a CPU run the CUDA half is not built; the JSON lists the GPU variants skipped and why.
"""

import os

from kvpack.pipeline.jobs import hold_gpu, log_to_file

log = log_to_file(snakemake.log[0], "build")  # the compiler's output included
gpu_slot = hold_gpu()  # a local GPU run: this job's own GPU, before anything touches CUDA
os.environ.setdefault("MAX_JOBS", str(snakemake.threads))  # ninja's parallel compile jobs

from kvpack import build, ops
from kvpack.pipeline import environment
from kvpack.study import records

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
