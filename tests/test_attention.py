"""kvpack.study.attention_error: the float64 attention metrics against a NumPy reference written here, their
edge cases, and how they differ from the paper's surrogate."""

import math

import numpy as np
import pytest
import torch

from kvpack.study import attention_error as A
from kvpack.study import formats as F
from kvpack.study import metrics
from kvpack.study import workloads as w


def np_softmax_probs(q, K):
    s = q @ K.T / math.sqrt(K.shape[1])
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def np_metrics(q, K, V, Kh, Vh, k):
    p, ph = np_softmax_probs(q, K), np_softmax_probs(q, Kh)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(ph)), axis=1)))
    top = [len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(p, ph)]
    o, oh = p @ V, ph @ Vh
    return {"kl_divergence": kl, "max_prob_abs_diff": float(np.abs(p - ph).max()),
            "topk_agreement": float(np.mean(top)), "output_rel_error": float(np.linalg.norm(o - oh) / np.linalg.norm(o))}


@pytest.fixture(scope="module")
def data():
    q = w.queries("gaussian", 16, 64, seed=1)
    K = w.gaussian(300, 64, seed=2)
    V = w.gaussian(300, 64, seed=3)
    return q, K, V


@pytest.mark.parametrize("name", ["int8_channel", "int8_token", "fp8_e4m3"])
def test_metrics_match_numpy(data, name):
    q, K, V = data
    fmt = F.FORMATS[name]
    Kh, Vh = fmt.roundtrip(K), fmt.roundtrip(V)
    got = A.attention_errors(q, K, V, Kh, Vh, k=8)
    ref = np_metrics(*(t.double().numpy() for t in (q, K, V, Kh, Vh)), k=8)
    for key, v in ref.items():
        assert got[key] == pytest.approx(v, rel=1e-9, abs=1e-15), key
    assert got["kl_divergence"] > 0 and 0 < got["topk_agreement"] <= 1


def test_probs_and_output(data):
    q, K, V = data
    p = A.attention_probs(q, K)
    assert p.dtype == torch.float64 and p.shape == (16, 300)
    np.testing.assert_allclose(p.numpy(), np_softmax_probs(q.double().numpy(), K.double().numpy()), rtol=1e-12)
    assert torch.allclose(p.sum(-1), torch.ones(16, dtype=torch.float64))
    o = A.attention_output(q, K, V)
    np.testing.assert_allclose(o.numpy(), p.numpy() @ V.double().numpy(), rtol=1e-12)


def test_unquantized_is_exact(data):
    q, K, V = data
    m = A.attention_errors(q, K, V)
    assert m == {"kl_divergence": 0.0, "max_prob_abs_diff": 0.0, "topk_agreement": 1.0, "output_rel_error": 0.0}
    m = A.attention_errors(q, K, V, K.clone(), V.clone())
    assert m["output_rel_error"] == 0.0 and m["kl_divergence"] == 0.0


def test_value_only_leaves_probabilities(data):
    q, K, V = data
    m = A.attention_errors(q, K, V, None, F.int8_channel(V))
    assert m["kl_divergence"] == 0 and m["max_prob_abs_diff"] == 0 and m["topk_agreement"] == 1
    assert m["output_rel_error"] > 0


def test_surrogate_is_not_attention(data):
    """A shift of every key by one vector c moves every score of a query by q . c: softmax ignores it,
    the paper's surrogate does not (it reports |q . c| on every row)."""
    q, K, V = data
    c = torch.full((64,), 0.01)
    Kh = K + c
    m = A.attention_errors(q, K, V, Kh, None)
    assert m["kl_divergence"] < 1e-12 and m["output_rel_error"] < 1e-6
    sur = A.surrogate_score_error(K, Kh, q)
    assert sur > 1e-3


def test_surrogate_reuses_the_paper_metric(data):
    q, K, _ = data
    Kh = F.int8_channel(K)
    assert A.surrogate_score_error(K, Kh, q[:1]) == pytest.approx(metrics.attention_score_error(K, Kh, q[0]), rel=1e-12)
    many = A.surrogate_score_error(K, Kh, q)
    assert many == pytest.approx(np.mean([metrics.attention_score_error(K, Kh, q[i]) for i in range(16)]), rel=1e-12)


def test_topk_agreement_by_hand():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    ph = torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    # row 0: top-2 {0,1} vs {0,3} -> 1/2; row 1: {3,2} vs {0,1} -> 0
    assert A.topk_agreement(p, ph, 2) == pytest.approx(0.25)
    assert A.topk_agreement(p, ph, 10) == 1.0  # k capped at T: every token is in the top-T


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    ph = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert A.kl_divergence(p.log(), ph.log()) == pytest.approx(expected, rel=1e-12)


def test_batched_matches_per_head():
    q = w.gaussian(3 * 5, 32, seed=1).reshape(3, 5, 32)
    K = w.gaussian(3 * 20, 32, seed=2).reshape(3, 20, 32)
    V = w.gaussian(3 * 20, 32, seed=3).reshape(3, 20, 32)
    Kh, Vh = F.int8_token(K), F.int8_token(V)
    m = A.attention_errors(q, K, V, Kh, Vh, k=4)
    per = [A.attention_errors(q[i], K[i], V[i], Kh[i], Vh[i], k=4) for i in range(3)]
    assert m["kl_divergence"] == pytest.approx(np.mean([x["kl_divergence"] for x in per]), rel=1e-12)
    assert m["topk_agreement"] == pytest.approx(np.mean([x["topk_agreement"] for x in per]), rel=1e-12)
    assert m["max_prob_abs_diff"] == max(x["max_prob_abs_diff"] for x in per)
    o, oh = A.attention_output(q, K, V), A.attention_output(q, Kh, Vh)
    assert m["output_rel_error"] == pytest.approx(float(torch.linalg.norm(o - oh) / torch.linalg.norm(o)), rel=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="same batch"):
        A.attention_probs(torch.zeros(4, 8), torch.zeros(5, 9))
    with pytest.raises(ValueError, match="same batch"):
        A.attention_probs(torch.zeros(2, 4, 8), torch.zeros(3, 5, 8))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_widen_exactly(dtype):
    q = w.queries("gaussian", 4, 32, seed=1)
    K = w.gaussian(50, 32, seed=2, dtype=dtype)
    V = w.gaussian(50, 32, seed=3, dtype=dtype)
    m = A.attention_errors(q, K, V, K.float(), V.float())  # the same values in fp32: no error at all
    assert m["output_rel_error"] == 0 and m["kl_divergence"] == 0
