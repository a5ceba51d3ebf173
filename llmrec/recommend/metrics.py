"""Ranking metrics for the leave-last-out protocol: one held-out item per user.

With a single relevant item, HR@K is 1 if it is in the top K, and NDCG@K is
1/log2(rank + 1) for a 1-based rank within K (the ideal DCG is 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def hit_rate_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """1.0 if ``target`` is among the first ``k`` of ``ranked``, else 0.0."""
    return 1.0 if target in ranked[:k] else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """NDCG@k for one relevant item: 1/log2(rank+1) if it is ranked within k."""
    top = list(ranked[:k])
    if target not in top:
        return 0.0
    return 1.0 / math.log2(top.index(target) + 2)


def mean_metrics(rankings: Iterable[tuple[Sequence[str], str]], k: int = 10) -> dict[str, float]:
    """Mean HR@k and NDCG@k over (ranked item ids, target item id) pairs."""
    hr, ndcg = [], []
    for ranked, target in rankings:
        hr.append(hit_rate_at_k(ranked, target, k))
        ndcg.append(ndcg_at_k(ranked, target, k))
    if not hr:
        raise ValueError("no rankings to evaluate")
    return {f"HR@{k}": float(np.mean(hr)), f"NDCG@{k}": float(np.mean(ndcg)), "users": len(hr)}


def ranking_metrics(
    rankings: Sequence[Sequence[str]], targets: Sequence[str], k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user HR@k and NDCG@k arrays of ranked lists against their targets, in order:
    the per-user values that confidence intervals and paired tests need."""
    if len(rankings) != len(targets):
        raise ValueError("one target per ranking")
    hr = np.array([hit_rate_at_k(r, t, k) for r, t in zip(rankings, targets, strict=True)])
    ndcg = np.array([ndcg_at_k(r, t, k) for r, t in zip(rankings, targets, strict=True)])
    return hr, ndcg
