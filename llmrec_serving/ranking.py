"""Recommendations over any backend: one-pass item scoring or the trie search, then reasons.

On an item-token base (``llmrec.model.item_vocab``) a recommendation is ONE engine request:
the history rendered as the model was trained to read it, the unseen items' tokens as the
only allowed next tokens, the top k back with their log-probabilities over those items, the
ranking ``llmrec.recommend.ItemScorer`` computes. On a plain base the search is
``llmrec.recommend.trie_beam_search`` (the exact code the library runs), driven here
asynchronously, one engine request per beam step. Either way every result is a catalog
item, never an excluded one. Reasons state facts only (``llmrec.recommend.reasons``): the
item's catalog metadata and the history items nearest it in the model's item space, in a
fixed sentence, or phrased by the same adapter and kept only if the claim checker passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from llmrec.data import Catalog
from llmrec.model.item_vocab import ItemVocab
from llmrec.prompts import PromptBuilder
from llmrec.recommend import catalog_trie, trie_beam_search
from llmrec.recommend.item_scorer import history_prompt
from llmrec.recommend.reasons import Reasoner, ReasonMode, phrase_reason, write_reason
from llmrec_serving.engines import Backend, Delta, GenerationParams, Messages, ServedAdapter


@dataclass(frozen=True)
class Ranked:
    """One recommended item."""

    item_id: str
    title: str
    score: float
    reason: str | None = None


@dataclass(frozen=True)
class ItemReading:
    """How an item-token base reads a history: its vocabulary, rendering and window."""

    vocab: ItemVocab
    render: str
    window: int


@dataclass(frozen=True)
class Lease:
    """What one admitted request runs on: an engine, the adapter pinned on it, and the
    ranker of the foundation-model release it was admitted on."""

    backend: Backend
    adapter: ServedAdapter | None
    """None: the bare base model."""
    ranker: Ranker

    @property
    def model(self) -> str:
        """The served name a response reports: the adapter's, or ``base``."""
        return self.adapter.name if self.adapter is not None else "base"

    def chat(self, messages: Messages, params: GenerationParams) -> AsyncIterator[Delta]:
        """The backend's :meth:`Backend.chat` with this request's adapter."""
        return self.backend.chat(self.adapter, messages, params)


class Ranker:
    """Ranks the catalog for a history on a request's engine and adapter (in one pass when
    ``items`` is given)."""

    def __init__(
        self,
        catalog: Catalog,
        prompts: PromptBuilder,
        beam_width: int,
        items: ItemReading | None = None,
        reasoner: Reasoner | None = None,
        reasons: ReasonMode = "facts",
    ):
        self.catalog = catalog
        self.prompts = prompts
        self.beam_width = beam_width
        self.items = items
        self.reasoner = reasoner or Reasoner(catalog)
        self.reasons = reasons
        if items is not None:
            items.vocab.check_catalog(catalog)
        self.trie = catalog_trie(catalog, prompts)

    async def rank(
        self,
        lease: Lease,
        history: Sequence[str],
        k: int,
        context: str | None,
        excluded: set[str],
    ) -> list[Ranked]:
        """Top-k catalog items not in ``excluded``, best first."""
        if self.items is not None:
            return await self._rank_items(lease, history, k, context, excluded)
        prompt = self.prompts.recommend_prompt_ids(self.catalog.displays(history), context)
        search = trie_beam_search(self.trie, k, self.beam_width, excluded)
        async with lease.backend.scorer(lease.adapter, prompt) as score:
            try:
                step = next(search)
                while True:
                    step = search.send(await score(step))
            except StopIteration as done:
                ranked = done.value
        return [Ranked(item_id, self.catalog.display(item_id), s) for s, item_id in ranked]

    async def _rank_items(
        self,
        lease: Lease,
        history: Sequence[str],
        k: int,
        context: str | None,
        excluded: set[str],
    ) -> list[Ranked]:
        items = self.items
        assert items is not None
        prompt = history_prompt(
            self.prompts, items.vocab, self.catalog, history, items.render, items.window, context
        )
        allowed = [items.vocab.token_id(i) for i in self.catalog.ids if i not in excluded]
        if not allowed:
            return []
        top = await lease.backend.top_tokens(lease.adapter, prompt, allowed, k)
        first = items.vocab.first_token_id
        ranked = [(items.vocab.item_ids[token - first], score) for token, score in top]
        return [Ranked(i, self.catalog.display(i), s) for i, s in ranked]

    async def explain(
        self,
        lease: Lease,
        history: Sequence[str],
        items: list[Ranked],
        params: GenerationParams,
    ) -> AsyncIterator[tuple[int, Ranked]]:
        """Each item with a one-line reason from its facts (phrased by the lease's adapter with
        ``params`` under ``reasons="model"``, when the claim checker passes it), as
        ``(index in items, item)`` in the order the reasons are ready: the engine writes
        them all at once, and a stream sends each as soon as it is done."""
        reasoner = self.reasoner
        if self.reasons == "facts":
            for index, item in enumerate(items):
                line = write_reason(reasoner.facts(item.item_id, history))
                yield index, replace(item, reason=line)
            return
        titles = self.catalog.displays(history)

        async def write(messages: list[dict[str, str]]) -> str:
            return "".join([d.text async for d in lease.chat(messages, params)])

        async def reason(index: int, item: Ranked) -> tuple[int, Ranked]:
            facts = reasoner.facts(item.item_id, history)
            line, _ = await phrase_reason(facts, titles, self.prompts, write, reasoner.checker)
            return index, replace(item, reason=line)

        tasks = [asyncio.ensure_future(reason(i, item)) for i, item in enumerate(items)]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()
