"""Popularity and ItemKNN: full-catalog rankings that never return a seen item."""

from llmrec.data import Catalog, Item
from llmrec.recommend import ItemKNN, Popularity

CATALOG = Catalog(Item(str(i), f"Movie {i}", 2000, ()) for i in range(1, 7))
TRAIN = {
    "u1": ["1", "2", "3"],
    "u2": ["1", "2"],
    "u3": ["1", "4"],
    "u4": ["5", "6"],
}


def test_popularity_counts_users_and_masks_history():
    pop = Popularity(CATALOG, TRAIN)
    assert pop.recommend([], k=3) == ["1", "2", "3"]  # 3 users, 2 users, then ties in catalog order
    assert pop.recommend(["1"], k=2) == ["2", "3"]


def test_itemknn_follows_co_occurrence():
    knn = ItemKNN(CATALOG, TRAIN, neighbors=3, shrink=0.0)
    ranked = knn.recommend(["5"], k=2)
    assert ranked[0] == "6"  # 5 and 6 always appear together
    assert "5" not in knn.recommend(["5"], k=6)
    # "2" co-occurs with "1" in two histories, "3" and "4" only once each.
    assert knn.recommend(["1"], k=1) == ["2"]


def test_never_returns_more_than_unseen_items():
    pop = Popularity(CATALOG, TRAIN)
    assert sorted(pop.recommend(["1", "2", "3", "4"], k=10)) == ["5", "6"]
