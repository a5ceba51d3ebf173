"""SASRec on a tiny synthetic catalog: learns an order, masks history, is deterministic."""

import numpy as np
import pytest
import torch

from llmrec.data import Catalog, Item
from llmrec.recommend import SASRec, SASRecConfig

N_ITEMS = 20
CATALOG = Catalog(Item(str(i), f"Movie {i}", 2000, ()) for i in range(1, N_ITEMS + 1))


def _chain_histories() -> dict[str, list[str]]:
    """Users walk the catalog in order, item i always followed by i+1, from every start."""
    train = {}
    for start in range(1, N_ITEMS - 2):
        for length in (4, 8):
            end = min(start + length, N_ITEMS + 1)
            train[f"u{start}-{length}"] = [str(i) for i in range(start, end)]
    return train


TRAIN = _chain_histories()
FAST = SASRecConfig(max_len=8, hidden=32, blocks=1, heads=2, dropout=0.0, epochs=60, lr=5e-3)


@pytest.fixture(scope="module")
def model() -> SASRec:
    return SASRec(CATALOG, TRAIN, FAST)


def test_learns_the_next_item_in_a_sequence(model):
    for last in (3, 9, 15):
        history = [str(i) for i in range(last - 2, last + 1)]
        assert model.recommend(history, k=1) == [str(last + 1)], history
    assert model.losses[-1] < model.losses[0] / 4


def test_bce_objective_also_learns_the_order():
    bce = SASRec(CATALOG, TRAIN, SASRecConfig(**{**vars(FAST), "loss": "bce", "epochs": 120}))
    assert bce.recommend(["5", "6", "7"], k=1) == ["8"]


def test_never_returns_seen_or_unknown_items(model):
    history = [str(i) for i in range(1, 16)]
    ranked = model.recommend(history, k=N_ITEMS)
    assert sorted(ranked, key=int) == [str(i) for i in range(16, N_ITEMS + 1)]
    assert all(item_id in CATALOG for item_id in model.recommend(["2"], k=N_ITEMS))
    assert len(model.recommend(["2"], k=5)) == 5


def test_scores_cover_the_catalog_and_history_beyond_max_len_is_cut(model):
    assert model.scores(["1"]).shape == (N_ITEMS,)
    long = [str(i) for i in range(1, 16)]
    # Only the last max_len items are attended to.
    np.testing.assert_allclose(model.scores(long), model.scores(long[-FAST.max_len :]))


def test_deterministic_for_a_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    cfg = SASRecConfig(**{**vars(FAST), "epochs": 3, "dropout": 0.2, "loss": "bce"})
    a, b = SASRec(CATALOG, TRAIN, cfg), SASRec(CATALOG, TRAIN, cfg)
    assert torch.rand(1) == before  # training ran in a forked RNG
    assert a.losses == b.losses
    np.testing.assert_array_equal(a.scores(["4", "5"]), b.scores(["4", "5"]))
    other = SASRec(CATALOG, TRAIN, SASRecConfig(**{**vars(cfg), "seed": 1}))
    assert not np.array_equal(a.scores(["4", "5"]), other.scores(["4", "5"]))


def test_empty_history_falls_back_to_popularity(model):
    # Items 3..17 start histories of both lengths: the most users hold them.
    top = model.recommend([], k=3)
    assert len(top) == 3 and set(top) <= {str(i) for i in range(3, 18)}
    with pytest.raises(ValueError, match="at least one history item"):
        model.scores([])


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="two or more items"):
        SASRec(CATALOG, {"u": ["1"]}, FAST)
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRecConfig(hidden=10, heads=3)
