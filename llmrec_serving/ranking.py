"""Recommendations over any backend: the shared trie beam search, then one-line reasons.

The search is ``llmrec.recommend.trie_beam_search`` (the exact code the library and the
evaluation run), driven here asynchronously: each step's scores come from the backend's
scorer, so every result is a catalog item, never an excluded one, ranked by the
log-probability of its title. Reasons come from the same adapter through the explain prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from llmrec.data import Catalog
from llmrec.prompts import PromptBuilder
from llmrec.recommend import catalog_trie, trie_beam_search
from llmrec_serving.engines import Backend, GenerationParams, ServedAdapter


@dataclass(frozen=True)
class Ranked:
    """One recommended item."""

    item_id: str
    title: str
    score: float
    reason: str | None = None


class Ranker:
    """Ranks the catalog for a history on a backend."""

    def __init__(self, backend: Backend, catalog: Catalog, prompts: PromptBuilder, beam_width: int):
        self.backend = backend
        self.catalog = catalog
        self.prompts = prompts
        self.beam_width = beam_width
        self.trie = catalog_trie(catalog, prompts)

    async def rank(
        self,
        adapter: ServedAdapter | None,
        history: Sequence[str],
        k: int,
        context: str | None,
        excluded: set[str],
    ) -> list[Ranked]:
        """Top-k catalog items not in ``excluded``, best first."""
        prompt = self.prompts.recommend_prompt_ids(self.catalog.displays(history), context)
        search = trie_beam_search(self.trie, k, self.beam_width, excluded)
        async with self.backend.scorer(adapter, prompt) as score:
            try:
                step = next(search)
                while True:
                    step = search.send(await score(step))
            except StopIteration as done:
                ranked = done.value
        return [Ranked(item_id, self.catalog.display(item_id), s) for s, item_id in ranked]

    async def explain(
        self,
        adapter: ServedAdapter | None,
        history: Sequence[str],
        items: list[Ranked],
        max_tokens: int,
    ) -> list[Ranked]:
        """The same items, each with a one-line reason written by ``adapter``."""
        titles = self.catalog.displays(history)
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))

        async def reason(item: Ranked) -> Ranked:
            messages = self.prompts.explain_messages(titles, item.title)
            text = "".join([d.text async for d in self.backend.chat(adapter, messages, params)])
            line = " ".join(text.split())  # one line, whatever the model wrote
            return Ranked(item.item_id, item.title, item.score, line)

        return list(await asyncio.gather(*(reason(item) for item in items)))
