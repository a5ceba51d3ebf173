"""HR@K and NDCG@K on hand-computed cases."""

import math

import pytest

from llmrec.recommend import hit_rate_at_k, mean_metrics, ndcg_at_k


def test_hit_and_ndcg_by_rank():
    ranked = ["a", "b", "c", "d"]
    assert hit_rate_at_k(ranked, "a", 3) == 1.0
    assert ndcg_at_k(ranked, "a", 3) == 1.0  # rank 1: 1/log2(2)
    assert ndcg_at_k(ranked, "b", 3) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(ranked, "c", 3) == pytest.approx(0.5)  # rank 3: 1/log2(4)
    assert hit_rate_at_k(ranked, "d", 3) == 0.0  # rank 4 is outside the cut-off
    assert ndcg_at_k(ranked, "d", 3) == 0.0
    assert ndcg_at_k(ranked, "z", 10) == 0.0


def test_mean_over_users():
    rankings = [(["a", "b"], "a"), (["a", "b"], "b"), (["a", "b"], "x"), (["c"], "c")]
    m = mean_metrics(rankings, k=2)
    assert m["HR@2"] == pytest.approx(3 / 4)
    assert m["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3) + 0 + 1) / 4)
    assert m["users"] == 4


def test_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        mean_metrics([], k=10)
