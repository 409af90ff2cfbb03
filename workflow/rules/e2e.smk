# The end-to-end decode benchmark (kvpack.study.e2e): one job per context T of config e2e
# (results/{device}/e2e/{model}_T{T}.json), every method and batch in it, requested only when the
# run's device is CUDA (e2e_records(), common.smk).


rule e2e:
    """A real model's decode step at one context T on the GPU: transformers' caches, fp16 in a captured
    graph and kvpack's INT8 cache, eager and graphed, beside the copy bandwidth of this job; a method
    that does not fit is a skipped row, and the largest batch of each capacity method at capacity_T."""
    input:
        build=BUILD_JSON,
    output:
        E2E_JSON,
    log:
        log_path(E2E_JSON),
    wildcard_constraints:
        model=r"[a-z0-9._-]+",
    params:
        device=DEVICE_KIND,
        settings=job_settings("e2e"),
    threads: 1
    resources:
        **E2E_RESOURCES,
    conda:
        "../../environment.yml"
    script:
        "../scripts/e2e.py"


onstart:
    for note in e2e_skipped_notes():
        print(f"kvpack: {note}", file=sys.stderr)
