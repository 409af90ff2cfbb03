# kvpack: INT8 KV-cache quantization, a reproducible replication of arXiv 2601.04719.
#   snakemake --cores all                                  the default run (config/config.yaml)
#   snakemake --cores all --configfile config/paper.yaml   the paper's ten workloads + D sweep
# The stages, in data-flow order: build -> benchmark, accuracy, decode, e2e (GPU) -> tables -> figures -> report;
# the accuracy study beyond the paper (formats.smk) runs beside them on the CPU.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/build.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/accuracy.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/e2e.smk"
include: "workflow/rules/formats.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
