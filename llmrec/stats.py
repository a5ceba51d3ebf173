"""Uncertainty over users: bootstrap intervals and paired tests of per-user metric values.

Every function takes one value per user (HR@k is 0/1, NDCG@k in [0, 1]); paired tests take
two methods' values for the same users in the same order. Seeded, so a report is
reproducible to the digit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 10_000


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("need a non-empty 1-D array of per-user values")
    return arr


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users (users resampled with
    replacement)."""
    arr = _values(values)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # chunks bound the index matrix's memory
        stop = min(start + 1000, n_resamples)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def sign_flip_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean of a - b, two-sided p) of a paired sign-flip permutation test over users.

    Under the null that the two methods are exchangeable for every user, each user's
    difference is as likely positive as negative; p counts the random sign flips whose mean
    is at least as far from zero as the observed one (with the observed one included, so
    p is never 0).
    """
    diff = _values(a) - _values(b)
    observed = diff.mean()
    nonzero = diff[diff != 0]  # a zero difference flips to itself
    if nonzero.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_resamples, 1000):
        stop = min(start + 1000, n_resamples)
        signs = rng.choice((-1.0, 1.0), size=(stop - start, nonzero.size))
        means = (signs * nonzero).sum(axis=1) / diff.size
        extreme += int((np.abs(means) >= abs(observed) - 1e-12).sum())
    return float(observed), (extreme + 1) / (n_resamples + 1)


def mcnemar_exact(
    hits_a: Sequence[float] | np.ndarray, hits_b: Sequence[float] | np.ndarray
) -> float:
    """Two-sided exact McNemar p for paired hits (0/1 per user): a binomial test on the
    users where exactly one of the two methods hits."""
    a, b = _values(hits_a).astype(bool), _values(hits_b).astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: int, seed: int = 0
) -> dict[str, object]:
    """A against B on the same users: the NDCG@k difference with its bootstrap interval and
    sign-flip p, and McNemar's exact p on HR@k where both HR@k are per-user hits (0/1).

    ``a`` and ``b`` map metric names (``NDCG@k``, ``HR@k``) to per-user values; a per-user
    mean over several seeds is a valid input (its HR@k is then a rate, and McNemar is left
    out).
    """
    ndcg, hr = f"NDCG@{k}", f"HR@{k}"
    delta, p = sign_flip_test(a[ndcg], b[ndcg], seed=seed)
    out: dict[str, object] = {
        "metric": ndcg,
        "delta": round(delta, 4),
        "delta_ci95": [round(v, 4) for v in bootstrap_ci(a[ndcg] - b[ndcg], seed=seed)],
        "p": round(p, 4),
    }
    if all(np.isin(m[hr], (0.0, 1.0)).all() for m in (a, b)):
        out[f"{hr}_p_mcnemar"] = round(mcnemar_exact(a[hr], b[hr]), 4)
    return out
