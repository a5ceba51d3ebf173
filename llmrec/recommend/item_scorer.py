"""Full-catalog ranking in one forward pass over an item-token model.

The history is rendered (``PromptBuilder.item_sequence``), the model runs once, and the
logits of the item-token block at the last position are the next-item distribution over
the whole catalog: the top-k over every unseen item is exact, with no beam and no trie.
Histories are scored in batches (left-padded, with position ids that ignore the padding,
so a history scores the same alone or in any batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmrec.data import Catalog
from llmrec.model.item_vocab import ItemVocab
from llmrec.prompts import PromptBuilder


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    """Log-probability of the item as the next one, over the items that could be returned
    (the unseen, not excluded ones): what an engine with those tokens allowed reports."""


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded ``sequences``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def history_prompt(
    prompts: PromptBuilder,
    vocab: ItemVocab,
    catalog: Catalog,
    history: Sequence[str],
    render: str,
    window: int,
    context: str | None = None,
) -> list[int]:
    """Token ids whose last position predicts the item after the last ``window`` catalog
    items of ``history``, rendered as ``render`` (what every engine is sent)."""
    recent = [i for i in history if i in catalog][-window:]
    ids, _ = prompts.item_sequence(
        [vocab.token_id(i) for i in recent], catalog.displays(recent), render, context
    )
    return ids


def mask_seen(scores: torch.Tensor, seen: Sequence[Sequence[int]]) -> torch.Tensor:
    """``scores`` (B, n_items) with each row's ``seen`` columns set to -inf (in place)."""
    for row, cols in enumerate(seen):
        if cols:
            scores[row, torch.tensor(list(cols), dtype=torch.long)] = float("-inf")
    return scores


class ItemScorer:
    """Scores every catalog item as the next one after a history, one forward pass per batch.

    ``window`` caps how many of the most recent history items the model reads; items seen
    anywhere in the history (and any ``exclude``) are still never returned.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        vocab: ItemVocab,
        catalog: Catalog,
        prompts: PromptBuilder,
        render: str = "items",
        window: int = 50,
        batch_size: int = 64,
    ) -> None:
        vocab.check_catalog(catalog)
        if window < 1:
            raise ValueError("window must be at least 1")
        self.model = model
        self.vocab = vocab
        self.catalog = catalog
        self.prompts = prompts
        self.render = render
        self.window = window
        self.batch_size = batch_size
        self.pad_id = prompts.tokenizer.pad_token_id

    def sequence(self, history: Sequence[str], context: str | None = None) -> list[int]:
        """Token ids whose last position predicts the item after ``history``."""
        return history_prompt(
            self.prompts, self.vocab, self.catalog, history, self.render, self.window, context
        )

    @torch.no_grad()  # not inference_mode: callers mask the returned scores in place
    def log_probs(
        self, histories: Sequence[Sequence[str]], contexts: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        """(len(histories), n_items) float32 log-probabilities of every item as the next one."""
        contexts = contexts or [None] * len(histories)
        seqs = [self.sequence(h, c) for h, c in zip(histories, contexts, strict=True)]
        first, n = self.vocab.first_token_id, len(self.vocab)
        out = torch.empty((len(seqs), n))
        # Similar lengths share a batch: padding costs as much as real tokens.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask, positions = left_pad([seqs[i] for i in rows], self.pad_id)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits[:, -1, first : first + n]
            out[rows] = torch.log_softmax(logits.float(), dim=-1)
        return out

    def rank(
        self,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
        contexts: Sequence[str | None] | None = None,
    ) -> list[list[ScoredItem]]:
        """The ``k`` best unseen items after each history, best first."""
        return self.top_unseen(self.log_probs(histories, contexts), histories, k, exclude)

    def top_unseen(
        self,
        scores: torch.Tensor,
        histories: Sequence[Sequence[str]],
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
    ) -> list[list[ScoredItem]]:
        """The ``k`` best items per row of ``scores`` (:meth:`log_probs` of ``histories``;
        masked in place) that are neither in the row's history nor excluded, renormalised
        over the items left."""
        exclude = exclude or [()] * len(histories)
        seen = [
            {self.vocab.index(i) for i in (*h, *x) if i in self.catalog}
            for h, x in zip(histories, exclude, strict=True)
        ]
        mask_seen(scores, [sorted(s) for s in seen])
        scores -= torch.logsumexp(scores, dim=1, keepdim=True)  # renormalise over the rest
        scores.nan_to_num_(nan=-math.inf, neginf=-math.inf)  # a row with every item masked
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1)
        ranked = []
        for row, cols in enumerate(top.indices.tolist()):
            values = top.values[row].tolist()
            ranked.append(
                [
                    ScoredItem(self.vocab.item_ids[c], v)
                    for c, v in zip(cols, values, strict=True)
                    if v != float("-inf")
                ]
            )
        return ranked

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        exclude: Sequence[str] = (),
        context: str | None = None,
    ) -> list[ScoredItem]:
        """The ``k`` best unseen items after ``history`` (one forward pass)."""
        return self.rank([history], k, [exclude], [context])[0]
