"""Validation on the client, with the user's own adapter, and the personal-scale pick.

Measure and pick (``decoupling.personal_scales``): at export each client scores the items
nobody trained on (its ``holdout_targets`` and validation item) with its adapter moved from
the shared part alone (0) to as trained (1) and publishes the best. A personal part that
memorized its user's titles instead of learning their taste is turned down for that user
alone; the pick never leaves the client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llmrec.data import Split
from llmrec.federated.batched import batched_losses
from llmrec.federated.client import client_examples, holdout_examples
from llmrec.federated.client_state import load_personal
from llmrec.federated.dual_lora import DualLora, State, init_personal_state
from llmrec.federated.gates import scale_personal
from llmrec.finetune import IGNORE_INDEX, Example, collate
from llmrec.recommend.item_scorer import ItemScorer
from llmrec.recommend.recommender import Recommender

Ranker = Recommender | ItemScorer
"""What validation ranks with: the trie decoder (titles head) or the item scorer."""

VAL_K = 10
"""Cut-off of the validation HR/NDCG."""


def validate_user(
    dual: DualLora,
    recommender: Ranker,
    split: Split,
    client_dir: Path,
    user_id: str,
    shared_state: State,
    server_round: int,
) -> tuple[list[str], str, float]:
    """(top-k item ids, validation item, its answer NLL) with the user's own adapter.

    The adapter is ``shared_state`` plus the user's personal state after ``server_round``
    (the shared part alone for a user never trained). The NLL of the validation title is a
    cheap, continuous companion to HR@10: on a small cohort a hit rate moves in steps of
    1/users, the loss shows smaller differences.
    """
    dual.model.eval()
    personal = load_personal(client_dir, user_id, before=server_round + 1)
    if personal is None:
        personal = init_personal_state(dual, dual.cfg.seed, user_id)
    dual.load(shared_state, personal)
    target = split.valid[user_id]
    ranked = recommender.recommend(split.history_for_valid(user_id), k=VAL_K)
    return [x.item_id for x in ranked], target, validation_loss(dual, recommender, split, user_id)


def validation_loss(dual: DualLora, recommender: Ranker, split: Split, user_id: str) -> float:
    """Mean answer-token NLL of the user's validation item with what the dual LoRA holds now."""
    return _answer_loss(dual, [_validation_example(recommender, split, user_id)])


def _validation_example(recommender: Ranker, split: Split, user_id: str) -> Example:
    if isinstance(recommender, ItemScorer):  # the item-token head: the next item's index
        ids = recommender.sequence(split.history_for_valid(user_id))
        label = recommender.vocab.index(split.valid[user_id])
        return Example(ids, [IGNORE_INDEX] * (len(ids) - 1) + [label])
    prompts = recommender.prompts
    history = recommender.history_titles(split.history_for_valid(user_id))
    prompt = prompts.recommend_prompt_ids(history)
    answer = prompts.target_ids(recommender.catalog.display(split.valid[user_id]))
    return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def _answer_loss(dual: DualLora, examples: Sequence[Example]) -> float:
    """Mean answer-token NLL over ``examples`` (one at a time: no padding)."""
    total, tokens = 0.0, 0
    dual.model.eval()
    with torch.inference_mode():
        for example in examples:
            n = dual.scored_positions(example.labels)
            total += float(dual.loss(collate([example], dual.pad_id))) * n
            tokens += n
    return total / tokens


def pick_personal_scale(
    dual: DualLora,
    recommender: Ranker,
    split: Split,
    user_id: str,
    shared_state: State,
    personal_state: State,
) -> tuple[float, dict[float, float]]:
    """Measure and pick: the ``decoupling.personal_scales`` value with the lowest loss on
    the items the personal part never trained on (the holdout targets and the validation
    item), ties to the smaller (the shared side); and every value's loss.

    It runs where the user's data is (the client), so a personal part that memorized rather
    than generalized is turned down for that user only.
    """
    scored, losses = _scale_pick_examples(dual, recommender, split, user_id), {}
    for scale in sorted(set(dual.cfg.decoupling.personal_scales)):
        dual.load(shared_state, scale_personal(personal_state, scale))
        losses[scale] = _answer_loss(dual, scored)
    return _lowest(losses), losses


def pick_personal_scales(
    dual: DualLora,
    recommender: Ranker,
    split: Split,
    shared_state: State,
    personal_states: Mapping[str, State],
) -> dict[str, tuple[float, dict[float, float]]]:
    """:func:`pick_personal_scale` for each user of ``personal_states`` (user -> state).

    With the item-token head, ``fed.client_batch`` users times every scale are scored in
    one batched forward (:func:`~llmrec.federated.batched.batched_losses`: the same losses
    to float rounding); with the titles head, one user at a time.
    """
    if dual.items is None:
        return {
            u: pick_personal_scale(dual, recommender, split, u, shared_state, s)
            for u, s in personal_states.items()
        }
    scales = sorted(set(dual.cfg.decoupling.personal_scales))
    users = list(personal_states)
    size = max(dual.cfg.client_batch, 1)
    out = {}
    for i in range(0, len(users), size):
        group = users[i : i + size]
        scored = [_scale_pick_examples(dual, recommender, split, u) for u in group]
        values = batched_losses(
            dual,
            shared_state,
            [scale_personal(personal_states[u], s) for u in group for s in scales],
            [examples for examples in scored for _ in scales],
        )
        for j, user in enumerate(group):
            losses = dict(zip(scales, values[j * len(scales) : (j + 1) * len(scales)], strict=True))
            out[user] = (_lowest(losses), losses)
    return out


def _scale_pick_examples(
    dual: DualLora, recommender: Ranker, split: Split, user_id: str
) -> list[Example]:
    """What the scale pick scores: the user's holdout targets and validation item."""
    examples = client_examples(
        split, recommender.catalog, recommender.prompts, dual.cfg, user_id, dual.vocab
    )
    return holdout_examples(examples) + [_validation_example(recommender, split, user_id)]


def _lowest(losses: Mapping[float, float]) -> float:
    """The scale of the lowest loss, ties to the smaller (the shared side)."""
    return min(losses, key=lambda s: (losses[s], s))
