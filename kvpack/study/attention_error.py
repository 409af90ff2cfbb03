"""Accuracy on real attention, in float64 (issue 6): what a quantized K or V does to the softmax
attention of a set of queries, beside the paper's surrogate.

For queries q [n, D], keys K and values V [T, D] (T tokens, D head dimension) and their
quantized copies K_hat, V_hat:

  probabilities   p = softmax(q K^T / sqrt(D)) per query (temperature 1/sqrt(D))
  kl_divergence   KL(p || p_hat) = sum_t p log(p / p_hat), mean over the queries (nats)
  max_prob_abs_diff   max over queries and tokens of |p - p_hat|
  topk_agreement  |top-k(p) & top-k(p_hat)| / k, mean over queries: the attended tokens kept
  output_rel_error    ||o - o_hat||_F / ||o||_F over all queries, o = p V, o_hat = p_hat V_hat
  surrogate_score_error   the paper's attention-score error (kvpack.study.metrics.attention_score_error),
                  mean over the queries

Everything is widened to float64 on the inputs' device (exactly: fp32/fp16/bf16 embed in float64).
Leading batch dimensions are allowed (q [..., n, D], K and V [..., T, D], e.g. one matrix per head):
KL and top-k agreement are then means over every query of every batch entry, the maximum is over
all, and the relative error is a Frobenius ratio over all.
"""

from __future__ import annotations

import math

import torch

from . import metrics

DEFAULT_TOPK = 8


def _f64(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.to(device if device is not None else t.device, torch.float64)


def _check(q: torch.Tensor, K: torch.Tensor) -> None:
    if q.dim() < 2 or K.dim() < 2 or q.shape[-1] != K.shape[-1] or q.shape[:-2] != K.shape[:-2]:
        raise ValueError(f"queries must be [..., n, D] and keys [..., T, D] with one D and the same batch "
                         f"dimensions, got {tuple(q.shape)} and {tuple(K.shape)}")


def attention_log_probs(q, K) -> torch.Tensor:
    """log softmax(q K^T / sqrt(D)), float64 [..., n, T]."""
    K = _f64(K)
    q = _f64(q, K.device)
    _check(q, K)
    return torch.log_softmax(q @ K.mT / math.sqrt(K.shape[-1]), dim=-1)


def attention_probs(q, K) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)), float64 [..., n, T]."""
    return torch.exp(attention_log_probs(q, K))


def attention_output(q, K, V) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V, float64 [..., n, D_v]."""
    p = attention_probs(q, K)
    return p @ _f64(V, p.device)


def kl_divergence(logp: torch.Tensor, logp_hat: torch.Tensor) -> float:
    """KL(p || p_hat) of each row (query), averaged over the rows, from log-probabilities (nats)."""
    return float(torch.mean(torch.sum(torch.exp(logp) * (logp - logp_hat), dim=-1)))


def max_prob_abs_diff(p: torch.Tensor, p_hat: torch.Tensor) -> float:
    return float(torch.max(torch.abs(p - p_hat)))


def topk_agreement(p: torch.Tensor, p_hat: torch.Tensor, k: int = DEFAULT_TOPK) -> float:
    """Mean over queries of the fraction of the k most attended tokens that both attend (k <= T)."""
    k = min(int(k), p.shape[-1])
    a = torch.topk(p, k, dim=-1).indices
    b = torch.topk(p_hat, k, dim=-1).indices
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return float(torch.mean(shared.double()) / k)


def output_relative_error(o: torch.Tensor, o_hat: torch.Tensor) -> float:
    """||o - o_hat||_F / ||o||_F over all queries (0 when o is 0 and o_hat equals it)."""
    num, den = float(torch.linalg.norm(o - o_hat)), float(torch.linalg.norm(o))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def surrogate_score_error(x, x_hat, queries) -> float:
    """The paper's attention-score surrogate (kvpack.study.metrics.attention_score_error), mean over queries."""
    x = _f64(x)  # widened once here, not once per query
    x_hat, qs = _f64(x_hat, x.device), _f64(queries, x.device)
    return float(sum(metrics.attention_score_error(x, x_hat, qs[i]) for i in range(qs.shape[0])) / qs.shape[0])


def attention_errors(q, K, V, K_hat=None, V_hat=None, k: int = DEFAULT_TOPK) -> dict:
    """Every attention metric of (K_hat, V_hat) against (K, V) for the queries q [n, D].

    ``K_hat=None`` or ``V_hat=None``: that tensor is not quantized (the value-only or key-only case).
    """
    K, V = _f64(K), _f64(V)
    K_hat = K if K_hat is None else _f64(K_hat, K.device)
    V_hat = V if V_hat is None else _f64(V_hat, K.device)
    logp, logp_hat = attention_log_probs(q, K), attention_log_probs(q, K_hat)
    p, p_hat = torch.exp(logp), torch.exp(logp_hat)
    return {
        "kl_divergence": kl_divergence(logp, logp_hat),
        "max_prob_abs_diff": max_prob_abs_diff(p, p_hat),
        "topk_agreement": topk_agreement(p, p_hat, k),
        "output_rel_error": output_relative_error(p @ V, p_hat @ V_hat),
    }


__all__ = [
    "DEFAULT_TOPK",
    "attention_errors",
    "attention_log_probs",
    "attention_output",
    "attention_probs",
    "kl_divergence",
    "max_prob_abs_diff",
    "output_relative_error",
    "surrogate_score_error",
    "topk_agreement",
]
