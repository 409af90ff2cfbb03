rule build:
    """Build (or load from the cache) the kvpack extension for this run's device, and record what
    was built. A CPU run builds the CPU half; build.json says which GPU variants were skipped and why."""
    input:
        kernel_sources(),
    output:
        BUILD_JSON,
    log:
        log_path(BUILD_JSON),
    params:
        device=DEVICE_KIND,
    threads: job_threads
    resources:
        **BUILD_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/build.py"
