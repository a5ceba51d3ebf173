"""Reasons from facts: the claim checker on hand-written cases, the fixed sentence, the item space.

The checker must accept what is true of an item and reject a wrong genre, a wrong year, an
invented plot noun, a title outside the facts and a repeated phrase; the fixed sentence
must pass it for every item, evidence source and constraint. The item space is read from a
real saved item-token base.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from llmrec.data import Catalog, Item
from llmrec.model.item_space import ItemSpace
from llmrec.recommend.reasons import (
    Asked,
    ClaimChecker,
    Facts,
    Reasoner,
    phrase_reason,
    repeated_ngram_rate,
    repeated_phrases,
    write_reason,
)

CATALOG = Catalog(
    [
        Item("411", "The Nightmare Before Christmas", 1993, ("Children's", "Comedy", "Musical")),
        Item("94", "Home Alone", 1990, ("Children's", "Comedy")),
        Item("200", "The Shining", 1980, ("Horror",)),
        Item("1", "Toy Story", 1995, ("Animation", "Children's", "Comedy")),
        Item("6", "Heat", 1995, ("Action", "Crime", "Thriller")),
        Item("95", "Aladdin", 1992, ("Animation", "Children's", "Comedy", "Musical")),
    ]
)
HISTORY = ["6", "200", "1", "95"]


@pytest.fixture
def checker() -> ClaimChecker:
    return ClaimChecker(sorted({g for item in CATALOG for g in item.genres}))


def nightmare(asked: Asked | None = None):
    return Reasoner(CATALOG).facts("411", HISTORY, asked)


def test_the_checker_accepts_true_claims(checker):
    facts = nightmare()
    assert facts.evidence == ("Aladdin (1992)", "Toy Story (1995)")
    for text in (
        "A funny Musical from 1993, close to Aladdin (1992) in your history.",
        "The Nightmare Before Christmas is a Children's comedy, like Toy Story.",
        "You liked Aladdin and Toy Story; this 1993 musical fits your taste.",
        "A family film from the 90s that shares Comedy with Toy Story (1995).",
    ):
        assert checker.problems(text, facts) == [], text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("The Nightmare Before Christmas (1993) is a horror film.", "genre 'horror'"),
        ("A scary pick, close to Aladdin.", "genre 'scary'"),
        ("A Comedy from 1995, close to Aladdin.", "year 1995"),
        ("A Comedy from the 1980s.", "decade '1980s'"),
        ("It is about their relationship with technology.", "unsupported word 'relationship'"),
        ("A masterpiece of Comedy.", "unsupported word 'masterpiece'"),
        ("You watched Fargo (1996), and this is a Comedy too.", "Fargo (1996)' is not the item"),
        (
            "A Musical of the supernatural, the supernatural, and the supernatural.",
            "repeated phrase 'the supernatural'",
        ),
        ("", "no reason written"),
    ],
)
def test_the_checker_rejects_what_the_facts_do_not_support(checker, text, problem):
    found = checker.problems(text, nightmare())
    assert any(problem in p for p in found), found


def test_an_excluded_genre_may_be_said_as_excluded(checker):
    asked = Asked(genres_out=frozenset({"Horror"}))
    assert checker.problems("A Comedy with no horror, as you asked.", nightmare(asked)) == []
    assert checker.problems("A Comedy with horror, as you asked.", nightmare(asked))
    # not asked: the checker does not take the negation on trust
    assert checker.problems("A Comedy with no horror.", nightmare())


def test_titles_that_are_words_or_remade_are_cut_whole(checker):
    """Found by bench/text.py on the real catalog: a history with two films of one title, or
    a one-letter title, made the checker see titles that were not there."""
    facts = Facts(
        "70", "When Harry Met Sally... (1989)", 1989, ("Comedy", "Romance"),
        ("Sabrina (1995)", "Contact (1997)", "Sabrina (1954)", "M (1931)"), "model",
    )  # fmt: skip
    text = (
        "When Harry Met Sally... (1989): Comedy and Romance from 1989. Your model puts it "
        "closest to Contact (1997) and Sabrina (1954) of what you watched."
    )
    assert checker.problems(text, facts) == []
    assert checker.problems(text.replace("Contact (1997)", "Fargo (1996)"), facts)


def test_the_users_years_are_theirs_not_the_items(checker):
    asked = Asked(years="up to 1995")
    text = write_reason(nightmare(asked))
    assert "up to 1995" in text and checker.problems(text, nightmare(asked)) == []


def test_the_fixed_sentence_passes_for_every_item_and_constraint(checker):
    rng = random.Random(0)
    ids = list(CATALOG.ids)
    rows = np.random.default_rng(0).normal(size=(len(ids), 8))
    space = ItemSpace.from_rows(ids, rows)
    genres = sorted({g for item in CATALOG for g in item.genres})
    for reasoner in (Reasoner(CATALOG), Reasoner(CATALOG, space)):
        for item_id in ids:
            for _ in range(5):
                history = rng.sample(ids, rng.randint(0, len(ids)))
                item_genres = set(CATALOG[item_id].genres)
                asked = Asked(
                    genres_in=frozenset(rng.sample(sorted(item_genres), 1) if item_genres else ()),
                    genres_out=frozenset(g for g in rng.sample(genres, 2) if g not in item_genres),
                    years=rng.choice([None, f"from {CATALOG[item_id].year}", "up to 2000"]),
                    anchor=rng.choice([None, "Heat (1995)"]),
                )
                facts = reasoner.facts(item_id, history, asked)
                text = write_reason(facts)
                assert checker.problems(text, facts) == [], text
                assert CATALOG[item_id].display not in facts.evidence


def test_evidence_by_genres_says_which_genres_are_shared():
    facts = Reasoner(CATALOG).facts("94", HISTORY)
    assert facts.evidence_by == "genres"
    # Aladdin and Toy Story share Children's and Comedy; the most recent comes first
    assert facts.evidence == ("Aladdin (1992)", "Toy Story (1995)")
    text = write_reason(facts)
    assert text.startswith("Children's and Comedy from 1990.")
    assert "It shares all of them with Aladdin (1992) and Toy Story (1995)" in text


def test_evidence_by_the_model_is_the_nearest_history_items():
    ids = list(CATALOG.ids)
    rows = np.zeros((len(ids), 3))
    rows[ids.index("411")] = [1, 0, 0]
    rows[ids.index("200")] = [0.9, 0.1, 0]  # The Shining: nearest in this space
    rows[ids.index("6")] = [0.5, 0.5, 0]
    rows[ids.index("1")] = [0, 1, 0]
    rows[ids.index("95")] = [-1, 0, 0]
    facts = Reasoner(CATALOG, ItemSpace.from_rows(ids, rows)).facts("411", HISTORY)
    assert facts.evidence_by == "model"
    assert facts.evidence == ("The Shining (1980)", "Heat (1995)")
    assert "Your model puts it closest to The Shining (1980) and Heat (1995)" in write_reason(facts)


def test_repeats_are_measured():
    assert repeated_phrases("of the night, of the day") == []  # stopwords only
    assert repeated_phrases("I'm sorry for that. I'm sorry for this.") == ["i'm sorry", "sorry for"]
    said = "I'm sorry for your loss. " * 5
    assert repeated_ngram_rate(said) > 0.7
    assert repeated_ngram_rate("A Comedy from 1993, close to Aladdin (1992).") == 0.0


def test_the_item_space_is_the_saved_bases_item_rows(tiny_model_dir, tiny_dataset):
    from llmrec.model import load_model
    from llmrec.model.item_vocab import ItemVocab, prepare_item_base

    base = prepare_item_base(tiny_model_dir, tiny_dataset.catalog)
    space = ItemSpace.from_model_dir(base)
    vocab = ItemVocab.read(base)
    model, _ = load_model(str(base))
    weight = model.get_input_embeddings().weight.detach().float().numpy()
    rows = weight[vocab.first_token_id : vocab.first_token_id + len(vocab)]
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert space.item_ids == tuple(tiny_dataset.catalog.ids)
    np.testing.assert_allclose(space.rows, rows, atol=1e-2)  # bf16 on disk
    first = space.item_ids[0]
    near = space.nearest(first, space.item_ids, 3)
    cos = rows[1:] @ rows[0]
    assert [i for i, _ in near] == [space.item_ids[1 + j] for j in np.argsort(-cos)[:3]]
    assert space.nearest("not-an-item", space.item_ids, 3) == []


def test_a_models_phrasing_stands_only_when_every_claim_checks(checker, tokenizer_prompts):
    facts = nightmare()
    good = "A Musical from 1993, close to Aladdin (1992) in your history."

    async def phrase(line: str):
        async def write(messages):
            assert "Genres: Children's, Comedy, Musical" in messages[-1]["content"]
            return line + "\nand a second line"

        return await phrase_reason(facts, ["Aladdin (1992)"], tokenizer_prompts, write, checker)

    assert asyncio.run(phrase(good)) == (good, [])
    reason, problems = asyncio.run(phrase("A classic horror film."))
    assert reason == write_reason(facts) and problems
    reason, problems = asyncio.run(phrase("A Musical. " + "It fits. " * 40))
    assert reason == write_reason(facts) and "longer than" in problems[-1]


@pytest.fixture(scope="module")
def tokenizer_prompts(tiny_model_dir):
    from llmrec.model import load_tokenizer
    from llmrec.prompts import PromptBuilder

    return PromptBuilder(load_tokenizer(str(tiny_model_dir)), max_prompt_tokens=256)
