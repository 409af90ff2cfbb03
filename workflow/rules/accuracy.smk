rule accuracy:
    """Reconstruction and attention-score errors of every variant on one workload (T x D, dtype),
    with their closed-form predictions and the memory footprint: one raw accuracy record."""
    input:
        build=BUILD_JSON,
    output:
        ACCURACY_JSON,
    log:
        log_path(ACCURACY_JSON),
    params:
        workload=workload,
        device=DEVICE_KIND,
        settings=job_settings("accuracy"),
    threads: job_threads
    resources:
        **job_resources("accuracy"),
    conda:
        "../../environment.yml"
    script:
        "../scripts/accuracy.py"
