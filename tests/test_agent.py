"""The personal agent on the tiny model: constraints, follow-ups, feedback, grounding.

Real parts throughout: the tiny Llama ranks through the trie search and writes the
reasons, MiniLM grounds the titles people type, SQLite keeps the profile.
"""

from __future__ import annotations

import asyncio

import pytest

from llmrec.agent import Agent, AgentEvent, LocalTools, ProfileStore, UnknownConversationError
from llmrec.model import load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Grounder, Recommender
from llmrec.recommend.reasons import Asked


@pytest.fixture(scope="module")
def agent(tmp_path_factory, tiny_model_dir, tiny_dataset):
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    recommender = Recommender(model, tokenizer, tiny_dataset.catalog, prompts, beam_width=8)
    db = tmp_path_factory.mktemp("agent") / "profiles.db"
    profiles = ProfileStore(f"sqlite:///{db}", tiny_dataset.catalog, tiny_dataset.histories)
    return Agent(
        tiny_dataset.catalog,
        profiles,
        LocalTools(recommender),
        Grounder(tiny_dataset.catalog),
        prompts,
        reason_tokens=12,
    )


def say(agent: Agent, user: str, message: str, conversation: str | None = None):
    async def run() -> list[AgentEvent]:
        return [e async for e in agent.respond(user, message, conversation)]

    events = asyncio.run(run())
    assert events[0].type == "conversation" and events[-1].type == "done"
    cards = [c for e in events if e.type == "cards" for c in e.cards]
    return events[0].conversation_id, events[-1].text, cards


def test_constraints_are_hard(agent, tiny_dataset):
    catalog = tiny_dataset.catalog
    seen = set(tiny_dataset.histories["1"])
    _, text, cards = say(agent, "1", "something funny from the 90s")
    assert cards and "Comedy" in text and "1990s" in text
    for card in cards:
        item = catalog[card.item_id]
        assert "Comedy" in item.genres and 1990 <= item.year <= 1999
        assert card.item_id not in seen
        assert card.title == item.display and card.genres == list(item.genres)
        assert card.reason and "\n" not in card.reason
    _, _, cards = say(agent, "1", "no comedy, no romance")
    assert cards
    assert all(not {"Comedy", "Romance"} & set(catalog[c.item_id].genres) for c in cards)


def test_like_x_but_funnier(agent, tiny_dataset):
    _, text, cards = say(agent, "2", "something like Rust Moon but funnier")
    assert "Rust Moon (2001)" in text
    assert cards and all("Comedy" in tiny_dataset.catalog[c.item_id].genres for c in cards)
    assert "m3" not in {c.item_id for c in cards}


def test_follow_ups_refer_to_the_previous_answer(agent):
    conversation, _, first = say(agent, "3", "recommend three movies")
    assert len(first) == 3
    _, text, why = say(agent, "3", "why the second?", conversation)
    assert [c.item_id for c in why] == [first[1].item_id] and first[1].title in text
    _, _, more = say(agent, "3", "more like the second", conversation)
    assert more and not {c.item_id for c in more} & {c.item_id for c in first}
    _, text, _ = say(agent, "3", "why the fifth?", conversation)
    assert "only" in text  # the previous answer had fewer picks


def test_feedback_changes_the_next_answer_at_once(agent, tiny_dataset):
    profiles = agent.profiles
    conversation, _, first = say(agent, "4", "recommend something")
    liked = first[0].item_id
    say(agent, "4", "I watched it, loved it", conversation)
    assert profiles.history("4")[-1] == liked and "4" in profiles.queued()
    assert profiles.feedback("4")[-1].sentiment == "positive"
    disliked = tiny_dataset.catalog[first[1].item_id]
    say(agent, "4", f"never show me {disliked.title}", conversation)
    assert disliked.item_id in profiles.exclusions("4")
    _, _, after = say(agent, "4", "recommend five movies")
    assert {liked, disliked.item_id}.isdisjoint(c.item_id for c in after)


def test_seen_items_only_when_asked(agent, tiny_dataset):
    seen = set(tiny_dataset.histories["5"])
    _, _, cards = say(agent, "5", "something I've seen before")
    assert cards and {c.item_id for c in cards} <= seen


def test_unknown_titles_are_never_guessed(agent):
    _, text, cards = say(agent, "6", "never show me Zyzzyx Quarterback Blues")
    assert "couldn't find" in text and cards == []
    assert agent.profiles.exclusions("6") == []


def test_nothing_left(agent):
    _, text, cards = say(agent, "7", "a comedy from the 1950s")
    assert cards == [] and "Nothing" in text


def test_conversations_persist_and_stay_private(agent):
    conversation, _, _ = say(agent, "8", "recommend something")
    roles = [m.role for m in agent.profiles.messages("8", conversation)]
    assert roles == ["user", "assistant"]
    with pytest.raises(UnknownConversationError):
        say(agent, "9", "why that one?", conversation)


@pytest.mark.parametrize("mode", ["facts", "model"])
def test_reasons_state_only_facts(agent, tiny_dataset, mode):
    """Whoever writes the line (the fixed sentence, or the tiny model phrasing the facts),
    what reaches the user passes the claim checker against the item's own facts."""
    agent.reasons = mode
    try:
        _, text, cards = say(agent, "10", "something funny, no sci-fi")
    finally:
        agent.reasons = "facts"
    history = agent.profiles.history("10")
    asked = Asked(genres_in=frozenset({"Comedy"}), genres_out=frozenset({"Sci-Fi"}))
    assert cards
    for card in cards:
        facts = agent.reasoner.facts(card.item_id, history, asked)
        assert agent.reasoner.checker.problems(card.reason, facts) == [], card.reason
        assert card.because == list(facts.evidence) and card.reason in text
        assert {tiny_dataset.catalog.display(i) for i in history} >= set(card.because)
