"""The personal agent: one chat turn in, actions on the profile and a short answer out.

A turn is read by ``llmrec.agent.intent`` (rules: see why there), then:

- a request ranks the catalog with the user's own adapter under the turn's constraints:
  genre and year filters from the catalog's metadata, the user's exclusions, seen items
  (unless asked for), an anchor item ("like Heat") appended to the history the model sees;
  the trie-constrained search can only return catalog items, and every constraint is a
  hard exclusion in that search, so no prompt wording can break one;
- a follow-up ("why that one?", "more like the second") refers to the items of the
  conversation's previous answer, kept in the profile database;
- feedback ("I watched it, loved it", "never show me X") writes to the profile at once,
  so the very next request sees it, and queues a personal-adapter refresh.

Every item a turn names is grounded to the catalog (``Grounder``); an item that cannot be
is answered with "not in the catalog", never guessed. Each card's one-line reason states
only facts (``llmrec.recommend.reasons``): the item's catalog genres and year, the history
items nearest it in the model's own item space, and the constraints the user stated. The
adapter phrases them only when asked to (``reasons="model"``), and its line is kept only
if the claim checker finds nothing unsupported in it.

The agent is async and model-agnostic: it ranks and writes through :class:`AgentTools`,
for one user at a time (:class:`LocalTools` here run a local
:class:`~llmrec.recommend.Recommender`; the gateway plugs in tools over its multi-adapter
engine).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from llmrec.agent.intent import IntentParser, Parsed, Ref
from llmrec.agent.profile import ProfileStore
from llmrec.data import Catalog
from llmrec.prompts import PromptBuilder
from llmrec.pseudonyms import pseudonym
from llmrec.recommend import Grounder, Recommender
from llmrec.recommend.reasons import (
    Asked,
    Facts,
    Reasoner,
    ReasonMode,
    phrase_reason,
    write_reason,
)

log = logging.getLogger(__name__)


class AgentTools(Protocol):
    """The tools the agent calls: rank the catalog and write a short text, for one user."""

    async def rank(
        self, user_id: str, history: Sequence[str], k: int, excluded: set[str]
    ) -> list[tuple[str, float]]:
        """Top-k ``(item_id, log-prob)`` not in ``excluded``, best first, with the user's
        adapter."""
        ...

    def write(
        self, user_id: str, messages: list[dict[str, str]], max_tokens: int
    ) -> AsyncIterator[str]:
        """Stream the user's adapter's answer to chat ``messages`` (greedy, one line)."""
        ...


class Card(BaseModel):
    """One item as the chat page shows it."""

    item_id: str
    title: str
    """Display title, "Title (Year)"."""
    year: int | None
    genres: list[str]
    reason: str
    """One line: why it fits, from facts only (see ``llmrec.recommend.reasons``)."""
    because: list[str]
    """Display titles of the history items that drove it, strongest first."""
    score: float | None = None
    """Log-probability of the title under the user's adapter (recommendations only)."""


class Action(BaseModel):
    """A change the turn made to the user's profile."""

    kind: Literal["history", "positive", "negative", "excluded"]
    item_ids: list[str]


class AgentEvent(BaseModel):
    """One event of an answer stream (the gateway sends each as a server-sent event)."""

    type: Literal["conversation", "text", "cards", "action", "done", "error"]
    conversation_id: str | None = None
    text: str | None = None
    """A piece of the answer (``text``), the whole answer (``done``), or why the answer
    stopped (``error``: the gateway's, when the stream has already started)."""
    cards: list[Card] | None = None
    action: Action | None = None


@dataclass(frozen=True)
class _Context:
    """What the conversation so far lets a turn refer to."""

    picks: list[str]
    """The last recommendation's items, in order ("the second")."""
    focus: str | None
    """The item the last answer was about first ("it", "that one")."""
    shown: set[str]
    """Every item recommended in the conversation ("more", "something else")."""


class Agent:
    """The personal agent over one catalog, profile database and set of tools."""

    def __init__(
        self,
        catalog: Catalog,
        profiles: ProfileStore,
        tools: AgentTools,
        grounder: Grounder,
        prompts: PromptBuilder,
        k: int = 3,
        max_k: int = 10,
        reason_tokens: int = 40,
        reasoner: Reasoner | None = None,
        reasons: ReasonMode = "facts",
    ):
        self.catalog = catalog
        self.profiles = profiles
        self.tools = tools
        self.grounder = grounder
        self.prompts = prompts
        self.k = k
        self.max_k = max_k
        self.reason_tokens = reason_tokens
        self.reasoner = reasoner or Reasoner(catalog)
        self.reasons = reasons
        self.parser = IntentParser(catalog.genres)

    # ----------------------------------------------------------------- the turn

    async def respond(
        self, user_id: str, message: str, conversation_id: str | None = None
    ) -> AsyncIterator[AgentEvent]:
        """Answer one user turn as a stream of events; the first names the conversation
        (a new one when ``conversation_id`` is None), the last (``done``) holds the whole
        answer. Raises ``UnknownConversationError`` for a conversation of someone else."""
        profiles = self.profiles
        if conversation_id is None:
            conversation_id = await asyncio.to_thread(profiles.new_conversation, user_id)
        previous = await asyncio.to_thread(self._context, user_id, conversation_id)
        await asyncio.to_thread(profiles.add_message, user_id, conversation_id, "user", message)
        yield AgentEvent(type="conversation", conversation_id=conversation_id)

        parsed = self.parser.parse(message, has_previous=bool(previous.focus))
        log.debug("user %s: %s", pseudonym(user_id), parsed)
        turn = {
            "recommend": self._recommend,
            "why": self._why,
            "feedback": self._feedback,
            "never": self._never,
        }[parsed.act]
        texts: list[str] = []
        shown: list[str] = []
        async for event in turn(user_id, parsed, previous):
            if event.type == "text" and event.text:
                texts.append(event.text)
            if event.type == "cards" and event.cards:
                shown = [c.item_id for c in event.cards]
            yield event
        answer = "".join(texts).strip()
        await asyncio.to_thread(
            profiles.add_message, user_id, conversation_id, "assistant", answer, shown, parsed.act
        )
        yield AgentEvent(type="done", conversation_id=conversation_id, text=answer)

    def _context(self, user_id: str, conversation_id: str) -> _Context:
        answers = [
            m for m in self.profiles.messages(user_id, conversation_id) if m.role == "assistant"
        ]
        lists = [m.items for m in answers if m.kind == "recommend" and m.items]
        focus = next((m.items[0] for m in reversed(answers) if m.items), None)
        return _Context(
            picks=list(lists[-1]) if lists else [],
            focus=focus,
            shown={i for items in lists for i in items},
        )

    # ----------------------------------------------------------------- references

    def _resolve(self, ref: Ref | None, previous: _Context) -> tuple[str | None, str]:
        """``(item_id, "")`` for a reference, or ``(None, why not)``."""
        if ref is None:
            return None, "Which movie do you mean?"
        if ref.ordinal is not None:
            picks = previous.picks
            if not picks:
                return None, "I haven't suggested anything yet: ask me for a recommendation."
            if -len(picks) <= ref.ordinal < len(picks):
                return picks[ref.ordinal], ""
            return None, f"My last answer had only {len(picks)} pick(s)."
        if ref.pronoun:
            if previous.focus is not None:
                return previous.focus, ""
            return None, "Which movie do you mean?"
        hit = self.grounder.ground_one(ref.mention or "")
        if hit is None:
            return None, f"I couldn't find “{ref.mention}” in the catalog."
        return hit.item_id, ""

    # ----------------------------------------------------------------- requests

    def _allowed(self, parsed: Parsed) -> set[str]:
        """Catalog items that satisfy the turn's genre and year constraints."""
        out = set()
        for item in self.catalog:
            genres = set(item.genres)
            if parsed.genres_in and not genres & parsed.genres_in:
                continue
            if genres & parsed.genres_out:
                continue
            if parsed.years is not None and item.year not in parsed.years:
                continue
            out.add(item.item_id)
        return out

    async def _recommend(
        self, user_id: str, parsed: Parsed, previous: _Context
    ) -> AsyncIterator[AgentEvent]:
        history = await asyncio.to_thread(self.profiles.history, user_id)
        excluded = await asyncio.to_thread(self.profiles.exclusions, user_id)
        notes = []
        anchor = None
        if parsed.anchor is not None:
            anchor, why_not = self._resolve(parsed.anchor, previous)
            if anchor is None:
                notes.append(why_not)
        allowed = self._allowed(parsed)
        if parsed.include_seen:
            allowed &= set(history)  # "one I've seen before": a rewatch
        else:
            allowed -= set(history)
        allowed -= set(excluded)
        if anchor is not None:
            allowed.discard(anchor)
        if parsed.more or (parsed.anchor is not None and parsed.anchor.mention is None):
            allowed -= previous.shown  # "more like the second": new items, please
        k = min(parsed.k or self.k, self.max_k)
        what = self._describe(parsed, anchor)
        if not allowed:
            text = f"Nothing in the catalog is left {what}."
            yield AgentEvent(type="text", text=" ".join([*notes, text]))
            return
        # The anchor goes last: the adapter continues the user's list right after it. The
        # constraints are exclusions in the search, not prompt text: the adapters are
        # trained on history-only prompts, and an exclusion cannot be ignored.
        seen = [i for i in history if i != anchor] + ([anchor] if anchor else [])
        ranked = await self.tools.rank(
            user_id, seen, min(k, len(allowed)), set(self.catalog.ids) - allowed
        )
        intro = f"Here {'are' if len(ranked) != 1 else 'is'} {len(ranked)} " + (
            f"pick{'s' if len(ranked) != 1 else ''} {what}:"
        )
        yield AgentEvent(type="text", text=" ".join([*notes, intro]) + "\n")
        asked = Asked(
            genres_in=parsed.genres_in,
            genres_out=parsed.genres_out,
            years=parsed.years.describe() if parsed.years is not None else None,
            anchor=self.catalog.display(anchor) if anchor is not None else None,
        )
        cards = []
        for n, (item_id, score) in enumerate(ranked, 1):
            card = await self._card(user_id, seen, item_id, score, asked)
            cards.append(card)
            yield AgentEvent(type="text", text=f"{n}. {card.title} — {card.reason}\n")
        yield AgentEvent(type="cards", cards=cards)

    def _describe(self, parsed: Parsed, anchor: str | None) -> str:
        parts = []
        if parsed.genres_in:
            parts.append("in " + " or ".join(sorted(parsed.genres_in)))
        if parsed.genres_out:
            parts.append("without " + " or ".join(sorted(parsed.genres_out)))
        if parsed.years is not None:
            parts.append(parsed.years.describe())
        if anchor is not None:
            parts.append(f"like {self.catalog.display(anchor)}")
        parts.append("that you have seen" if parsed.include_seen else "that you haven't seen")
        return ", ".join(parts)

    # ----------------------------------------------------------------- follow-ups

    async def _why(self, user_id: str, parsed: Parsed, previous: _Context):
        item_id, why_not = self._resolve(parsed.refs[0] if parsed.refs else None, previous)
        if item_id is None:
            yield AgentEvent(type="text", text=why_not)
            return
        history = await asyncio.to_thread(self.profiles.history, user_id)
        card = await self._card(user_id, history, item_id, None)
        yield AgentEvent(type="text", text=f"{card.title}: {card.reason}")
        yield AgentEvent(type="cards", cards=[card])

    # ----------------------------------------------------------------- feedback

    async def _feedback(self, user_id: str, parsed: Parsed, previous: _Context):
        item_id, why_not = self._resolve(parsed.refs[0] if parsed.refs else None, previous)
        if item_id is None:
            yield AgentEvent(type="text", text=why_not)
            return
        title = self.catalog.display(item_id)
        if parsed.sentiment is not None:
            # A liked item joins the history; a disliked one is excluded, not learned from.
            await asyncio.to_thread(
                self.profiles.record_feedback, user_id, item_id, parsed.sentiment, "chat"
            )
            yield AgentEvent(
                type="action", action=Action(kind=parsed.sentiment, item_ids=[item_id])
            )
            text = (
                f"Glad you liked {title}! It is in your history now, and your next picks "
                "build on it."
                if parsed.sentiment == "positive"
                else f"Noted: {title} wasn't for you. I won't suggest it again."
            )
        else:
            await asyncio.to_thread(self.profiles.add_history, user_id, [item_id], "chat")
            yield AgentEvent(type="action", action=Action(kind="history", item_ids=[item_id]))
            text = f"Added {title} to your history; your next picks build on it."
        yield AgentEvent(type="text", text=text)
        history = await asyncio.to_thread(self.profiles.history, user_id)
        yield AgentEvent(type="cards", cards=[self._plain_card(history, item_id, text)])

    async def _never(self, user_id: str, parsed: Parsed, previous: _Context):
        item_id, why_not = self._resolve(parsed.refs[0], previous)
        if item_id is None:
            yield AgentEvent(type="text", text=why_not)
            return
        await asyncio.to_thread(self.profiles.exclude, user_id, [item_id])
        yield AgentEvent(type="action", action=Action(kind="excluded", item_ids=[item_id]))
        yield AgentEvent(
            type="text", text=f"Done: I will never show you {self.catalog.display(item_id)} again."
        )

    # ----------------------------------------------------------------- cards and reasons

    def _plain_card(self, history: Sequence[str], item_id: str, reason: str) -> Card:
        return self._facts_card(self.reasoner.facts(item_id, history), reason)

    def _facts_card(self, facts: Facts, reason: str) -> Card:
        item = self.catalog[facts.item_id]
        return Card(
            item_id=item.item_id,
            title=item.display,
            year=item.year,
            genres=list(item.genres),
            reason=reason,
            because=list(facts.evidence),
        )

    async def _card(
        self,
        user_id: str,
        history: Sequence[str],
        item_id: str,
        score: float | None,
        asked: Asked | None = None,
    ) -> Card:
        facts = self.reasoner.facts(item_id, history, asked)
        reason = write_reason(facts)
        if self.reasons == "model":
            titles = [self.catalog.display(i) for i in history if i in self.catalog]

            async def write(messages: list[dict[str, str]]) -> str:
                tokens = self.tools.write(user_id, messages, self.reason_tokens)
                return "".join([t async for t in tokens])

            reason, problems = await phrase_reason(
                facts, titles, self.prompts, write, self.reasoner.checker
            )
            if problems:
                log.info("the adapter's reason for %s was dropped: %s", item_id, problems)
        return self._facts_card(facts, reason).model_copy(update={"score": score})


class LocalTools:
    """:class:`AgentTools` over one local :class:`Recommender` (one adapter, every user):
    for the CLI and tests. Calls run one at a time in a worker thread."""

    def __init__(self, recommender: Recommender):
        self.recommender = recommender
        self._lock = asyncio.Lock()

    async def rank(
        self, user_id: str, history: Sequence[str], k: int, excluded: set[str]
    ) -> list[tuple[str, float]]:
        """Top-k with the local model (``user_id`` is not used: one model)."""
        async with self._lock:
            recs = await asyncio.to_thread(
                self.recommender.recommend, list(history), k, None, sorted(excluded), False
            )
        return [(r.item_id, r.score) for r in recs]

    async def write(
        self, user_id: str, messages: list[dict[str, str]], max_tokens: int
    ) -> AsyncIterator[str]:
        """The local model's greedy answer, in one piece."""
        async with self._lock:
            yield await asyncio.to_thread(self.recommender.generate, messages, max_tokens)
