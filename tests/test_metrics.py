"""Metrics (float64) against hand computations and the closed forms the paper's numbers obey."""

import math

import numpy as np
import pytest
import torch

from kvpack import reference
from kvpack.study import metrics, workloads


def test_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[1.5, 2.0], [3.0, 3.0]])
    assert metrics.l2_error(x, y) == pytest.approx(math.sqrt(0.25 + 1.0))
    assert metrics.max_abs_error(x, y) == 1.0
    q = torch.tensor([2.0, -1.0])
    # rows: (x - y) = [-0.5, 0] -> q.e = -1 ; [0, 1] -> -1 ; mean |.| = 1
    assert metrics.attention_score_error(x, y, q) == pytest.approx(1.0)


def test_float64_accumulation_does_not_saturate():
    # 2^25 errors of 1e-3: float32 accumulation of the squares would stall; float64 gets sqrt(N)*e
    n = 1 << 25
    x = torch.zeros((n // 1024, 1024))
    y = torch.full_like(x, 1e-3)
    assert metrics.l2_error(x, y) == pytest.approx(math.sqrt(n) * float(torch.tensor(1e-3)), rel=1e-9)


def test_paper_predictions_match_paper_numbers():
    p = metrics.paper_predictions(131072, 8192)
    assert p["predicted_attention_score_error"] == pytest.approx(0.0949, abs=5e-4)  # paper: 0.094911
    assert p["predicted_max_abs_error"] == pytest.approx(0.003937, abs=1e-6)  # paper: 0.003937
    small = metrics.paper_predictions(1024, 64)
    assert small["predicted_l2_error"] == pytest.approx(0.5815, abs=2e-3)  # paper: 0.581541


@pytest.mark.parametrize("T,D", [(4096, 64), (2048, 512)])
def test_closed_forms_predict_uniform_data(T, D):
    x = workloads.uniform(T, D, seed=3)
    qv = workloads.query(D, seed=4)
    q, s = reference.quantize(x)
    x_hat = torch.from_numpy(reference.dequantize(q, s))
    assert metrics.l2_error(x, x_hat) == pytest.approx(metrics.predicted_l2_error(s, (T, D)), rel=0.02)
    assert metrics.attention_score_error(x, x_hat, qv) == pytest.approx(
        metrics.predicted_attention_score_error(s, qv), rel=0.05)
    assert metrics.max_abs_error(x, x_hat) <= metrics.predicted_max_abs_error(s) * (1 + 1e-6)


def test_memory_footprint_is_4x_minus_scales():
    m = metrics.memory_footprint(131072, 8192)
    assert m["original_bytes"] == 4 * 131072 * 8192
    assert m["compressed_bytes"] == 131072 * 8192 + 4 * 8192
    assert m["compression_ratio"] == pytest.approx(4 / (1 + 4 / 131072))
    t = metrics.memory_footprint(16, 8, "token", source_bytes=2)
    assert t["compressed_bytes"] == 128 + 64 and t["compression_ratio"] == pytest.approx(256 / 192)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.l2_error(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="query"):
        metrics.attention_score_error(torch.zeros(2, 3), torch.zeros(2, 3), np.zeros(2))
