"""The decode-step overhead measurement, run small on the CPU (the real run is on the GPU)."""

import torch

from kvpack.pipeline import environment
from kvpack.study import decode_step


def test_decode_step_on_cpu():
    prev = torch.get_default_dtype()
    r = decode_step.decode_step_times(T=256, heads=2, head_dim=16, device="cpu", repeats=2)
    assert torch.get_default_dtype() == prev
    assert r["variant"] == "cpu_torch"
    assert r["attention_fp16_median_ms"] > 0 and r["dequant_attention_median_ms"] > 0
    assert r["overhead_ratio"] == r["dequant_attention_median_ms"] / r["attention_fp16_median_ms"]
    assert r["cache_int8_bytes"] < r["cache_fp16_bytes"] / 1.9
    # INT8 K and V change the attention output by about the quantization step, no more
    assert 0 < r["max_abs_output_difference"] < 0.02


def test_decode_record():
    rec = decode_step.run_decode_job({"T": [64], "heads": 1, "head_dim": 8, "repeats": 2}, "cpu", environment.provenance("cpu"))
    assert rec["kind"] == "decode" and rec["rows"][0]["status"] == "ok" and rec["rows"][0]["T"] == 64


def _decode_record(tmp_path, ratio):
    """A synthetic decode record (test data, not a measurement) in a reference-dir layout."""
    from kvpack.study import records

    row = {"status": "ok", "T": 131072, "heads": 32, "head_dim": 128, "batch": 1, "variant": "fast", "device": "cuda",
           "attention_fp16_median_ms": 1.0, "dequant_attention_median_ms": ratio, "overhead_ratio": ratio}
    rec = {"kind": "decode", "workload": {"name": "decode step"}, "rows": [row],
           "provenance": {"device_slug": "test-gpu", "gpu_name": "Test GPU (synthetic)"}}
    records.write_record(rec, tmp_path / "ref" / "decode" / "decode.json")
    return tmp_path / "ref"


def test_decode_table_and_claim(tmp_path):
    from kvpack.report import assemble, claims

    for ratio, verdict in [(2.7, claims.NOT_REPRODUCED), (1.05, claims.REPRODUCED)]:
        ref = _decode_record(tmp_path, ratio)
        t = assemble.build_tables(reference_dirs=[ref])
        assert len(t.decode) == 1 and t.decode.iloc[0]["overhead_ratio"] == ratio
        row = t.claims.set_index("claim_id").loc["decode_overhead"]
        assert row["verdict"] == verdict and f"{ratio:.2f}x" in row["our_value"]
    t = assemble.build_tables()
    assert t.claims.set_index("claim_id").loc["decode_overhead", "verdict"] == claims.NEEDS_GPU
