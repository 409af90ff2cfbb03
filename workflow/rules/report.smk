# The report: papermill runs reports/report.ipynb over the tables and figures, then nbconvert writes
# it as HTML without code cells.


rule report:
    """Execute the report notebook (papermill, kernel python3) and convert it to HTML (--no-input)."""
    input:
        notebook=REPORT_NOTEBOOK,
        tables=TABLE_CSVS,
        figures=FIGURE_PNGS,
        study=ACCURACY_STUDY_OUTPUTS,  # the accuracy study's tables and figures (formats.smk), as switched on
    output:
        notebook=REPORT_IPYNB,
        html=report(REPORT_HTML, caption="../report/report.rst", category="Report"),
    log:
        log_path(REPORT_HTML),
    params:
        device=DEVICE,
        title=config["report"]["title"],
        paper_dir=PAPER_DIR,
        notes=decode_skipped_notes() + e2e_skipped_notes(),  # extra lines for "What was skipped" (the tables' own notes are added by the notebook)
    threads: 1
    resources:
        mem_mb=4096,
        runtime=15,
    conda:
        "../../environment.yml"
    script:
        "../scripts/report.py"
