"""The decode-step overhead measurement, run small on the CPU (the real run is on the GPU)."""

import torch

from kvpack import decode, environment


def test_decode_step_on_cpu():
    prev = torch.get_default_dtype()
    r = decode.decode_step_times(T=256, heads=2, head_dim=16, device="cpu", repeats=2)
    assert torch.get_default_dtype() == prev
    assert r["variant"] == "cpu_torch"
    assert r["attention_fp16_median_ms"] > 0 and r["dequant_attention_median_ms"] > 0
    assert r["overhead_ratio"] == r["dequant_attention_median_ms"] / r["attention_fp16_median_ms"]
    assert r["cache_int8_bytes"] < r["cache_fp16_bytes"] / 1.9
    # INT8 K and V change the attention output by about the quantization step, no more
    assert 0 < r["max_abs_output_difference"] < 0.02


def test_decode_record():
    rec = decode.run_decode_job({"T": [64], "heads": 1, "head_dim": 8, "repeats": 2}, "cpu", environment.provenance("cpu"))
    assert rec["kind"] == "decode" and rec["rows"][0]["status"] == "ok" and rec["rows"][0]["T"] == 64
