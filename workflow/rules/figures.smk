# One rule per figure of the report: each reads the tables and draws one PNG (in the snakemake
# report) and one SVG, through kvpack.report.figures.FIGURES[<name>].


rule figure_time:
    """Quantize + dequantize time vs elements, per implementation, log-log, with the paper's points."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="time"), caption="../report/time.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="time"),
    log:
        log_path(FIGURE_PNG.format(name="time")),
    params:
        name="time",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_speedup:
    """Speedup over both CPU baselines, with the paper's speedups."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="speedup"), caption="../report/speedup.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="speedup"),
    log:
        log_path(FIGURE_PNG.format(name="speedup")),
    params:
        name="speedup",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_roofline:
    """Achieved bandwidth vs bytes moved, with the measured copy ceiling of each device."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="roofline"), caption="../report/roofline.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="roofline"),
    log:
        log_path(FIGURE_PNG.format(name="roofline")),
    params:
        name="roofline",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_accuracy:
    """Measured errors vs their closed-form predictions and the paper's."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="accuracy"), caption="../report/accuracy.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="accuracy"),
    log:
        log_path(FIGURE_PNG.format(name="accuracy")),
    params:
        name="accuracy",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_memory:
    """Memory footprint and compression ratio."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="memory"), caption="../report/memory.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="memory"),
    log:
        log_path(FIGURE_PNG.format(name="memory")),
    params:
        name="memory",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_peers:
    """kvpack vs PyTorch's own quantizers on the GPU."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="peers"), caption="../report/peers.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="peers"),
    log:
        log_path(FIGURE_PNG.format(name="peers")),
    params:
        name="peers",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_decode:
    """Time per decode step against T: best fp16 SDPA, dequantize-then-SDPA, fused INT8 and the int8 byte bound."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="decode"), caption="../report/decode.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="decode"),
    log:
        log_path(FIGURE_PNG.format(name="decode")),
    params:
        name="decode",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"


rule figure_e2e:
    """A real model's decode step by method: ms per step per (T, batch), with the fp16 and INT8 byte bounds."""
    input:
        tables=TABLE_CSVS,
    output:
        png=report(FIGURE_PNG.format(name="e2e"), caption="../report/e2e.rst", category="Figures"),
        svg=FIGURE_SVG.format(name="e2e"),
    log:
        log_path(FIGURE_PNG.format(name="e2e")),
    params:
        name="e2e",
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/figure.py"
