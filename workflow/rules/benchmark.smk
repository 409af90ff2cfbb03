rule benchmark:
    """Time every variant of one workload (T x D, dtype) side by side in one job, on one warm
    device, with the CPU baselines and the peers beside them: one raw benchmark record."""
    input:
        build=BUILD_JSON,
    output:
        BENCHMARK_JSON,
    log:
        log_path(BENCHMARK_JSON),
    params:
        workload=workload,
        device=DEVICE_KIND,
        settings=job_settings("benchmark"),
    threads: job_threads
    resources:
        **job_resources("benchmark"),
    conda:
        "../../environment.yml"
    script:
        "../scripts/benchmark.py"
