# The accuracy study beyond the paper (issue 6): KV formats on KV-like distributions (one raw record
# per distribution) and on a real transformer's K/V, then their tables and figures.
# Switched by config `accuracy_study: {formats: true, real_model: false, ...}` (kvpack.study.formats.
# STUDY_CONFIG_DEFAULTS lists every key and default). Runs on the CPU whatever the run's device: the
# numbers are device-independent (the INT8 kernels are bit-exact with the CPU arithmetic) and need no
# GPU build. Reads config with defaults, so it also works where the schema has no accuracy_study yet;
# works with or without common.smk (it takes DEVICE and log_path from it when present).

from pathlib import Path as _Path

import kvpack.pipeline.config
import kvpack.study.formats
import kvpack.study.realmodel
import kvpack.study.workloads

ACCURACY_STUDY = kvpack.study.formats.study_settings(config)

if "DEVICE" not in globals():  # included without common.smk (a standalone test Snakefile)
    DEVICE = kvpack.pipeline.config.device_slug({"device": config.get("device", "auto"), "device_name": config.get("device_name")})

# logs mirror results under logs/ (common.smk's log_path where it is defined)
_formats_log = globals().get("log_path") or (lambda result: str(_Path("logs", *_Path(result).with_suffix(".log").parts[1:])))

FORMATS_RECORD = "results/{device}/formats/{distribution}.json"
REALMODEL_RECORD = "results/{device}/realmodel.json"
FORMATS_TABLES = {n: f"results/tables/{n}.csv" for n in kvpack.study.formats.FORMATS_TABLE_NAMES}
REALMODEL_TABLES = {n: f"results/tables/{n}.csv" for n in ("realmodel", "realmodel_stats", "realmodel_attention")}
FORMATS_FIGURE = "results/figures/formats_error_vs_D"
REALMODEL_FIGURE = "results/figures/realmodel_formats"


# This run's raw format-study records (one per distribution), and the study's final outputs as
# switched on in config: what rule all must request.
FORMATS_RECORDS = [FORMATS_RECORD.format(device=DEVICE, distribution=d) for d in ACCURACY_STUDY["distributions"]]
ACCURACY_STUDY_OUTPUTS = (
    [*FORMATS_TABLES.values(), f"{FORMATS_FIGURE}.png", f"{FORMATS_FIGURE}.svg"] if ACCURACY_STUDY["formats"] else []
) + (
    [*REALMODEL_TABLES.values(), f"{REALMODEL_FIGURE}.png", f"{REALMODEL_FIGURE}.svg"]
    if ACCURACY_STUDY["real_model"]
    else []
)


rule formats:
    """Every KV format (INT8 per channel/token/group, FP8, Hadamard + INT8 per token) on one seeded
    distribution, every D and dtype: attention metrics vs unquantized, one raw record."""
    output:
        FORMATS_RECORD,
    log:
        _formats_log(FORMATS_RECORD),
    wildcard_constraints:
        distribution="|".join(sorted(kvpack.study.workloads.DISTRIBUTIONS)),
    params:
        settings=ACCURACY_STUDY,
    threads: 1
    resources:
        mem_mb=4096,
        runtime=20,
    conda:
        "../../environment.yml"
    script:
        "../scripts/formats.py"


rule formats_tables:
    """The format study's tables: every row, the format-by-distribution summary, and the winners
    for keys and for values at equal bytes."""
    input:
        records=FORMATS_RECORDS,
    output:
        **{
            n: report(p, caption="../report/formats_tables.rst", category="Accuracy beyond the paper")
            for n, p in FORMATS_TABLES.items()
        },
    log:
        _formats_log(FORMATS_TABLES["formats"]),
    params:
        bytes_budget=ACCURACY_STUDY["bytes_budget"],
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/formats_tables.py"


rule realmodel:
    """all-MiniLM-L6-v2 on data/corpus.txt with K and V of every layer quantized in each format:
    embedding cosine, retrieval agreement, K/V statistics and per-layer attention metrics. Without the
    model package ([model] extra) the record says 'skipped' and why, and the run goes on."""
    input:
        corpus=str(kvpack.study.realmodel.CORPUS_PATH),  # data/corpus.txt of the repository
    output:
        REALMODEL_RECORD,
    log:
        _formats_log(REALMODEL_RECORD),
    params:
        settings=ACCURACY_STUDY,
    threads: 1
    resources:
        mem_mb=4096,
        runtime=30,
    conda:
        "../../environment.yml"
    script:
        "../scripts/realmodel.py"


rule realmodel_tables:
    """The real-model record as tables: downstream metrics per format, K/V statistics per layer,
    attention metrics per layer."""
    input:
        record=REALMODEL_RECORD.format(device=DEVICE),
    output:
        **{
            n: report(p, caption="../report/realmodel_tables.rst", category="Accuracy beyond the paper")
            for n, p in REALMODEL_TABLES.items()
        },
    log:
        _formats_log(REALMODEL_TABLES["realmodel"]),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/realmodel_tables.py"


rule figure_formats:
    """Attention-output error vs head dimension D, per format, distribution and role."""
    input:
        table=FORMATS_TABLES["formats"],
    output:
        png=report(f"{FORMATS_FIGURE}.png", caption="../report/formats_error_vs_D.rst", category="Accuracy beyond the paper"),
        svg=f"{FORMATS_FIGURE}.svg",
    log:
        _formats_log(f"{FORMATS_FIGURE}.png"),
    params:
        name="formats_error_vs_D",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure_formats.py"


rule figure_realmodel:
    """The real model per format: embedding cosine and retrieval agreement with the unquantized model."""
    input:
        table=REALMODEL_TABLES["realmodel"],
    output:
        png=report(f"{REALMODEL_FIGURE}.png", caption="../report/realmodel_formats.rst", category="Accuracy beyond the paper"),
        svg=f"{REALMODEL_FIGURE}.svg",
    log:
        _formats_log(f"{REALMODEL_FIGURE}.png"),
    params:
        name="realmodel_formats",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure_formats.py"
