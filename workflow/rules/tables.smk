# Raw records (this run + reference dirs) -> tables (results/tables/*.csv), with the claims' verdicts.
# Also the names and paths of every table and figure, and REPORT_OUTPUTS: every final output of the
# tables, figures and report stages (rule all gets them through the report, whose inputs they are).

import kvpack.report.tables

PAPER_DIR = str(Path(workflow.basedir) / "reports" / "paper")
REPORT_NOTEBOOK = str(Path(workflow.basedir) / "reports" / "report.ipynb")
REPORT_IPYNB = "results/report/report.ipynb"

TABLE_NAMES = list(kvpack.report.tables.TABLE_NAMES)  # performance, accuracy, memory, workloads, paper, speedups, claims, ...
FIGURE_NAMES = ["time", "speedup", "roofline", "accuracy", "memory", "peers", "decode", "e2e"]  # keys of kvpack.report.figures.FIGURES
TABLES_DIR = "results/tables"
FIGURES_DIR = "results/figures"
TABLE_CSV = "results/tables/{name}.csv"
FIGURE_PNG = "results/figures/{name}.png"
FIGURE_SVG = "results/figures/{name}.svg"
TABLE_CSVS = [TABLE_CSV.format(name=n) for n in TABLE_NAMES]
FIGURE_PNGS = [FIGURE_PNG.format(name=n) for n in FIGURE_NAMES]

REPORT_OUTPUTS = (
    TABLE_CSVS
    + FIGURE_PNGS
    + [FIGURE_SVG.format(name=n) for n in FIGURE_NAMES]
    + [REPORT_IPYNB, REPORT_HTML]
)


rule tables:
    """Flatten the raw records of this run and of the reference dirs into tables, beside the paper's
    published numbers; check every claim of reports/paper/claims.yaml against them."""
    input:
        benchmark=benchmark_records(),
        accuracy=accuracy_records(),
        decode=decode_records() + decode_accuracy_records(),
        e2e=e2e_records(),
        reference=reference_records("benchmark") + reference_records("accuracy") + reference_records("decode")
        + reference_records("e2e") + reference_records("int4") + reference_serving_records(),
        paper=[f"{PAPER_DIR}/raw_results.csv", f"{PAPER_DIR}/claims.yaml"],
    output:
        **{
            name: report(TABLE_CSV.format(name=name), caption=f"../report/table_{name}.rst", category="Tables")
            for name in TABLE_NAMES
        },
    log:
        log_path(TABLE_CSV.format(name="tables")),
    params:
        reference_dirs=reference_dirs(),
        paper_dir=lambda wildcards, input: os.path.dirname(input.paper[0]),
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        grid=WORKLOADS,
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        "../../environment.yml"
    script:
        "../scripts/tables.py"
