"""Bootstrap intervals and paired tests over users."""

import math

import numpy as np
import pytest

from llmrec.quality import per_user
from llmrec.stats import bootstrap_ci, mcnemar_exact, paired_comparison, sign_flip_test


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(1)
    small, large = rng.random(50), rng.random(2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # The interval of a mean of 0/1 values is close to the normal approximation.
    hits = (rng.random(943) < 0.18).astype(float)
    lo, hi = bootstrap_ci(hits)
    half = 1.96 * math.sqrt(hits.mean() * (1 - hits.mean()) / hits.size)
    assert hi - lo == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_is_seeded():
    v = np.arange(10.0)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)


def test_sign_flip_test():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    delta, p = sign_flip_test(a, a)
    assert (delta, p) == (0.0, 1.0)
    delta, p = sign_flip_test(a + 0.1, a)
    assert delta == pytest.approx(0.1) and p < 0.001
    noise = rng.normal(0, 1, 300)
    _, p = sign_flip_test(a + noise, a - noise[::-1] * 0)  # pure noise around zero
    assert p > 0.01


def test_mcnemar_exact_matches_the_binomial_tail():
    # 10 users only a hits, 2 users only b hits: two-sided binomial(12, 0.5) tail at 2.
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 20)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 20)
    expected = 2 * sum(math.comb(12, i) for i in range(3)) / 2**12
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(a, a) == 1.0


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_paired_comparison_pairs_users_and_tests_hits_only_when_they_are_hits():
    rng = np.random.default_rng(0)
    ranks_a, ranks_b = rng.integers(0, 30, 400), rng.integers(0, 30, 400)
    a, b = per_user(ranks_a, 10), per_user(ranks_b, 10)
    out = paired_comparison(a, b, 10, seed=0)
    assert out["delta"] == round(float((a["NDCG@10"] - b["NDCG@10"]).mean()), 4)
    lo, hi = out["delta_ci95"]
    assert lo <= out["delta"] <= hi
    assert out["HR@10_p_mcnemar"] == round(mcnemar_exact(a["HR@10"], b["HR@10"]), 4)
    assert paired_comparison(a, a, 10)["p"] == 1.0
    # a mean over seeds is a rate, not a hit: no McNemar
    mean = {m: (a[m] + b[m]) / 2 for m in a}
    assert "HR@10_p_mcnemar" not in paired_comparison(mean, b, 10)
