rule decode:
    """What the INT8 cache costs per decode step on the GPU: fp16 attention over the cache against
    dequantize-then-attention (kvpack.study.decode_step). Requested only when the run's device is CUDA."""
    input:
        build=BUILD_JSON,
    output:
        DECODE_JSON,
    log:
        log_path(DECODE_JSON),
    params:
        device=DEVICE_KIND,
        settings=config["decode"],
    threads: 1
    resources:
        **DECODE_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/decode.py"
