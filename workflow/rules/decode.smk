# The decode-step study (kvpack.study.decode_step): one job per grid point of config `decode`
# (results/{device}/decode/T{T}_B{B}_H{Hq}x{Hkv}_D{D}.json), the append timing as a small job of its
# own, both requested only when the run's device is CUDA (decode_records(), common.smk); and the
# accuracy of fused INT8 decoding (kvpack.study.decode_accuracy), on every run.


rule decode:
    """One decode grid point on the GPU: the copy bandwidth of this job, then fp16 SDPA (every backend),
    dequantize-then-SDPA and the fused INT8 kernel; a point that does not fit is a skipped row."""
    input:
        build=BUILD_JSON,
    output:
        DECODE_JSON,
    log:
        log_path(DECODE_JSON),
    wildcard_constraints:
        B=r"[1-9][0-9]*",
        Hq=r"[1-9][0-9]*",
        Hkv=r"[1-9][0-9]*",
    params:
        device=DEVICE_KIND,
        point=decode_point,
        settings=job_settings("decode"),
    threads: 1
    resources:
        **DECODE_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/decode.py"


rule decode_append:
    """The append of one token to every sequence of an INT8 cache, one launch, on the GPU: its own
    job, since it times the write path at a shape of its own (decode.append_shape)."""
    input:
        build=BUILD_JSON,
    output:
        DECODE_APPEND_JSON,
    log:
        log_path(DECODE_APPEND_JSON),
    params:
        device=DEVICE_KIND,
        point=None,
        settings=job_settings("decode_append"),
    threads: 1
    resources:
        **DECODE_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/decode.py"


rule decode_accuracy:
    """Fused INT8 decoding against attention over the unquantized cache: output error and top-1
    attention agreement on uniform, outlier and the real model's K/V (the CPU path on a CPU run)."""
    input:
        build=BUILD_JSON,
    output:
        DECODE_ACCURACY_JSON,
    log:
        log_path(DECODE_ACCURACY_JSON),
    params:
        device=DEVICE_KIND,
        settings=job_settings("decode_accuracy"),
    threads: 1
    resources:
        **DECODE_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/decode_accuracy.py"


onstart:
    # a CPU-only run says what it leaves out of the decode study (the report says so too)
    for note in decode_skipped_notes():
        print(f"kvpack: {note}", file=sys.stderr)
