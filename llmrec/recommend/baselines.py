"""Non-LLM baselines on the same split: Popularity and item-based KNN.

Both score the whole catalog and mask the user's own history, so their
rankings follow the same full-ranking protocol as the LLM recommender.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from llmrec.data import Catalog


def top_k(scores: np.ndarray, catalog: Catalog, seen: Sequence[str], k: int) -> list[str]:
    """Top-k catalog ids by score with the seen items masked out (ties broken by id order)."""
    scores = scores.astype(np.float64, copy=True)
    for item_id in seen:
        scores[catalog.index(item_id)] = -np.inf
    # A stable sort on -score keeps catalog order among ties: deterministic across runs.
    order = np.argsort(-scores, kind="stable")[:k]
    return [catalog.ids[i] for i in order if np.isfinite(scores[i])]


class Popularity:
    """Ranks items by how many training users interacted with them."""

    def __init__(self, catalog: Catalog, train: Mapping[str, Sequence[str]]):
        self.catalog = catalog
        self.counts = np.zeros(len(catalog))
        for items in train.values():
            for item_id in set(items):
                self.counts[catalog.index(item_id)] += 1

    def recommend(self, history: Sequence[str], k: int = 10) -> list[str]:
        """The k most popular items the user has not seen."""
        return top_k(self.counts, self.catalog, history, k)


class ItemKNN:
    """Item-based collaborative filtering with cosine similarity (Sarwar et al., WWW 2001).

    Keeps the ``neighbors`` most similar items per item; a user's score for an
    item is the summed similarity to the items in their history.
    """

    def __init__(
        self,
        catalog: Catalog,
        train: Mapping[str, Sequence[str]],
        neighbors: int = 50,
        shrink: float = 10.0,
    ):
        self.catalog = catalog
        users = sorted(train)
        x = np.zeros((len(users), len(catalog)), dtype=np.float32)
        for row, user_id in enumerate(users):
            for item_id in train[user_id]:
                x[row, catalog.index(item_id)] = 1.0
        co = x.T @ x
        norms = np.sqrt(np.diag(co))
        # The shrink term damps similarities supported by only a few co-occurrences.
        sim = co / (np.outer(norms, norms) + shrink + 1e-9)
        np.fill_diagonal(sim, 0.0)
        if neighbors < sim.shape[1]:
            cutoff = -np.partition(-sim, neighbors - 1, axis=1)[:, neighbors - 1 : neighbors]
            sim = np.where(sim >= cutoff, sim, 0.0)
        self.sim = sim

    def scores(self, history: Sequence[str]) -> np.ndarray:
        """Every catalog item's summed similarity to ``history`` (zeros for no history)."""
        idx = [self.catalog.index(i) for i in history]
        return self.sim[idx].sum(axis=0) if idx else np.zeros(len(self.catalog))

    def recommend(self, history: Sequence[str], k: int = 10) -> list[str]:
        """Items most similar to the user's history, unseen ones only."""
        return top_k(self.scores(history), self.catalog, history, k)
