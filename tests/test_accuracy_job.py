"""The accuracy job on the CPU: measured errors beside the closed forms, bit-exact flags, memory."""

import pytest

from kvpack.pipeline import environment
from kvpack.study import accuracy


def test_accuracy_record_on_paper_data():
    rec = accuracy.run_accuracy_job({"name": "Small", "T": 2048, "D": 128, "seed": 0}, "cpu", {},
                                    environment.provenance("cpu"))
    rows = rec["rows"]
    assert [r["impl"] for r in rows] == ["cpu_serial", "cpu_torch"]
    for r in rows:
        assert r["bit_exact_vs_reference"] is True
        assert r["max_abs_error"] <= r["predicted_max_abs_error"] * (1 + 1e-6)
        assert r["max_abs_error"] < 0.004  # the paper's claim
        assert r["l2_error"] == pytest.approx(r["predicted_l2_error"], rel=0.02)
        assert r["attention_score_error"] == pytest.approx(r["predicted_attention_score_error"], rel=0.1)
        assert r["compression_ratio"] == pytest.approx(4 * 2048 * 128 / (2048 * 128 + 4 * 128))
    # the paper's own numbers for this workload (raw_results.csv, "Small")
    assert rows[0]["l2_error"] == pytest.approx(1.163537, rel=0.02)
    assert rows[0]["attention_score_error"] == pytest.approx(0.012125, rel=0.25)
