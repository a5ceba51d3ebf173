"""Trie-constrained beam search on a real (tiny) Llama with the real tokenizer.

The decisive check: with a beam as wide as the catalog, beam search returns
exactly the brute-force ranking of every unseen title by its log-probability.
"""

import pytest
import torch

from llmrec.model import load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Recommender


@pytest.fixture(scope="module")
def recommender(tiny_model_dir, tiny_dataset):
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    return Recommender(model, tokenizer, tiny_dataset.catalog, prompts, beam_width=8)


def brute_force(rec: Recommender, history, excluded):
    """Log-probability of every allowed title, by one full forward pass each."""
    prompt = rec.prompts.recommend_prompt_ids(rec.history_titles(history))
    scores = {}
    for item in rec.catalog:
        if item.item_id in excluded:
            continue
        target = rec.prompts.target_ids(item.display)
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(rec.model(input_ids=ids).logits[0].float(), -1)
        positions = range(len(prompt) - 1, len(prompt) + len(target) - 1)
        scores[item.item_id] = sum(
            logp[p, t].item() for p, t in zip(positions, target, strict=True)
        )
    return sorted(scores, key=scores.get, reverse=True), scores


def test_results_are_unseen_catalog_items_best_first(recommender, tiny_dataset):
    user = next(u for u, h in tiny_dataset.histories.items() if len(h) >= 5)
    history = tiny_dataset.histories[user]
    recs = recommender.recommend(history, k=5)
    assert len(recs) == 5
    assert all(r.item_id in tiny_dataset.catalog for r in recs)
    assert not {r.item_id for r in recs} & set(history)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert all(r.title == tiny_dataset.catalog.display(r.item_id) for r in recs)


def test_wide_beam_equals_brute_force_ranking(recommender, tiny_dataset):
    user = next(iter(tiny_dataset.histories))
    history = tiny_dataset.histories[user][:3]
    wide = Recommender(
        recommender.model,
        recommender.tokenizer,
        recommender.catalog,
        recommender.prompts,
        beam_width=len(tiny_dataset.catalog),
    )
    recs = wide.recommend(history, k=10)
    order, scores = brute_force(wide, history, set(history))
    assert [r.item_id for r in recs] == order[:10]
    for r in recs:
        assert r.score == pytest.approx(scores[r.item_id], abs=1e-3)


def test_exclusions_and_seen_items(recommender, tiny_dataset):
    history = tiny_dataset.histories[next(iter(tiny_dataset.histories))][:3]
    everything_else = [i for i in tiny_dataset.catalog.ids if i not in history]
    banned = everything_else[:-2]
    recs = recommender.recommend(history, k=10, exclude=banned)
    assert sorted(r.item_id for r in recs) == sorted(everything_else[-2:])
    # Seen items come back only when asked for.
    again = recommender.recommend(history, k=30, exclude_seen=False)
    assert set(history) <= {r.item_id for r in again}


def test_bad_k_is_rejected(recommender):
    with pytest.raises(ValueError, match="k"):
        recommender.recommend([], k=0)
