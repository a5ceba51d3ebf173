"""The generative recommender: history in, ranked catalog items out.

``recommend`` runs beam search constrained to a trie of catalog titles: the
model can only spell items that exist, seen items are closed off in the trie,
and each item's score is the log-probability of its full title. Because
log-probabilities only fall as a beam grows, the search stops as soon as the
k-th finished item beats every open beam, so the top-k it returns is exact
within the beam. ``chat`` is the free-text path: the model writes an answer
and the grounder maps the titles it names onto catalog items.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmrec.data import Catalog
from llmrec.grounding import GroundedItem, Grounder
from llmrec.prompts import PromptBuilder
from llmrec.trie import TitleTrie, TrieNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """One ranked catalog item; ``score`` is the log-probability of its title."""

    item_id: str
    title: str
    score: float


@dataclass
class _Beam:
    score: float
    node: TrieNode
    token: int  # the last token, fed to the model at the next step
    parent: int  # row in the previous step's batch (for the KV cache)


class Recommender:
    """Ranks catalog items for a history with a causal LM (optionally LoRA-adapted)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        catalog: Catalog,
        prompts: PromptBuilder,
        beam_width: int = 20,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.prompts = prompts
        self.beam_width = beam_width
        self.trie = TitleTrie.build(
            ((item.item_id, item.display) for item in catalog), prompts.target_ids
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def history_titles(self, history: Sequence[str]) -> list[str]:
        """Display titles of a history of item ids (unknown ids are skipped)."""
        return [self.catalog.display(i) for i in history if i in self.catalog]

    @torch.inference_mode()
    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        context: str | None = None,
        exclude: Sequence[str] = (),
        exclude_seen: bool = True,
    ) -> list[Recommendation]:
        """Top-k unseen catalog items for ``history``, best first.

        ``exclude`` adds items never to return (e.g. "never show me X");
        ``exclude_seen=False`` allows items from the history itself.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        excluded = set(exclude) | (set(history) if exclude_seen else set())
        blocked = self.trie.exclusion(excluded)
        prompt = self.prompts.recommend_prompt_ids(self.history_titles(history), context)
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        beams = [_Beam(0.0, self.trie.root, -1, 0)]
        finished: list[tuple[float, str]] = []
        width = max(self.beam_width, k)
        while beams:
            logp = torch.log_softmax(logits.float(), dim=-1)
            candidates: list[_Beam] = []
            for row, beam in enumerate(beams):
                children = self.trie.open_children(beam.node, blocked)
                if not children:
                    continue
                tokens = list(children)
                scores = logp[row, tokens].tolist()
                candidates += [
                    _Beam(beam.score + s, children[t], t, row)
                    for t, s in zip(tokens, scores, strict=True)
                ]
            candidates.sort(key=lambda b: b.score, reverse=True)
            beams = []
            for cand in candidates:
                if not cand.node.children:  # a leaf: the title is complete
                    finished += [(cand.score, i) for i in self.trie.open_items(cand.node, excluded)]
                elif len(beams) < width:
                    beams.append(cand)
            if len(finished) >= k:
                kth = sorted((s for s, _ in finished), reverse=True)[k - 1]
                # Scores only decrease as beams grow: an open beam below the k-th is hopeless.
                beams = [b for b in beams if b.score > kth]
            if not beams:
                break
            cache.reorder_cache(torch.tensor([b.parent for b in beams], device=self.device))
            out = self.model(
                input_ids=torch.tensor([[b.token] for b in beams], device=self.device),
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
        finished.sort(key=lambda f: f[0], reverse=True)
        return [
            Recommendation(item_id, self.catalog.display(item_id), score)
            for score, item_id in finished[:k]
        ]

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], max_new_tokens: int = 96, temperature: float = 0.0
    ) -> str:
        """Free-text answer to chat ``messages`` (greedy when temperature is 0)."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {key: value.to(self.device) for key, value in ids.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        out = self.model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **({"do_sample": False} | sampling),
        )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def chat(
        self,
        history: Sequence[str],
        message: str,
        grounder: Grounder,
        k: int = 5,
        exclude: Sequence[str] = (),
        max_new_tokens: int = 96,
    ) -> ChatAnswer:
        """Answer a free-text request; the items it names are grounded to the catalog.

        Named titles that match no catalog item (above the grounder's threshold),
        or that the user has seen or excluded, are dropped from ``items``.
        """
        titles = self.history_titles(history)
        excluded = set(history) | set(exclude)
        messages = [
            {
                "role": "system",
                "content": self.prompts.chat_system(
                    titles[-self.prompts.max_history_items :],
                    [self.catalog.display(i) for i in exclude if i in self.catalog],
                ),
            },
            {"role": "user", "content": message},
        ]
        text = self.generate(messages, max_new_tokens=max_new_tokens)
        return ChatAnswer(text, grounder.ground(text, exclude=excluded, k=k))


@dataclass(frozen=True)
class ChatAnswer:
    """The model's free text and the catalog items grounded from it."""

    text: str
    items: list[GroundedItem]
