"""Reading user turns: constraints, follow-ups, feedback (rules, no model)."""

from __future__ import annotations

import pytest

from llmrec.agent import IntentParser, Ref, YearRange

ML100K_GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip


@pytest.fixture(scope="module")
def parser():
    return IntentParser(ML100K_GENRES)


@pytest.mark.parametrize(
    ("message", "anchor", "genres_in", "genres_out", "years"),
    [
        ("Something like Heat but funnier", "Heat", {"Comedy"}, set(), None),
        ("no horror please", None, set(), {"Horror"}, None),
        ("something from the 80s", None, set(), set(), YearRange(1980, 1989)),
        ("a sci-fi movie from the 1990s, nothing scary", None, {"Sci-Fi"}, {"Horror"},
         YearRange(1990, 1999)),
        ("I'd like something romantic before 1970", None, {"Romance"}, set(),
         YearRange(None, 1969)),
        ("a western since 1990", None, {"Western"}, set(), YearRange(1990, None)),
        ("an eighties comedy", None, {"Comedy"}, set(), YearRange(1980, 1989)),
        ('something like "Star Wars" without romance', "Star Wars", set(), {"Romance"}, None),
        ("recommend me a movie", None, set(), set(), None),
    ],
)  # fmt: skip
def test_requests_with_constraints(parser, message, anchor, genres_in, genres_out, years):
    parsed = parser.parse(message)
    assert parsed.act == "recommend"
    assert (parsed.anchor.mention if parsed.anchor else None) == anchor
    assert parsed.genres_in == genres_in and parsed.genres_out == genres_out
    assert parsed.years == years


def test_counts_seen_and_more(parser):
    assert parser.parse("give me 5 comedies").k == 5
    assert parser.parse("three more movies please", has_previous=True).k == 3
    assert parser.parse("something I've seen before").include_seen
    assert parser.parse("something else", has_previous=True).more
    assert not parser.parse("something else").more  # nothing was shown yet


@pytest.mark.parametrize(
    ("message", "ref"),
    [
        ("why that one?", Ref(pronoun=True)),
        ("Why the second?", Ref(ordinal=1)),
        ("why number 3", Ref(ordinal=2)),
        ("why the last one?", Ref(ordinal=-1)),
        ("why Heat?", Ref(mention="Heat")),
        ("why?", Ref(pronoun=True)),
    ],
)
def test_why_follow_ups(parser, message, ref):
    parsed = parser.parse(message, has_previous=True)
    assert parsed.act == "why" and parsed.refs == (ref,)


def test_more_like_an_earlier_pick(parser):
    parsed = parser.parse("more like the second", has_previous=True)
    assert parsed.act == "recommend" and parsed.anchor == Ref(ordinal=1) and parsed.more


@pytest.mark.parametrize(
    ("message", "ref", "sentiment", "watched"),
    [
        ("I watched it, loved it", Ref(pronoun=True), "positive", True),
        ("I saw Toy Story, it was boring", Ref(mention="Toy Story"), "negative", True),
        ("I loved the third one", Ref(ordinal=2), "positive", False),
        ("just watched Heat", Ref(mention="Heat"), None, True),
    ],
)
def test_feedback(parser, message, ref, sentiment, watched):
    parsed = parser.parse(message, has_previous=True)
    assert parsed.act == "feedback"
    assert (parsed.refs, parsed.sentiment, parsed.watched) == ((ref,), sentiment, watched)


@pytest.mark.parametrize(
    ("message", "ref"),
    [
        ("never show me Heat again", Ref(mention="Heat")),
        ("Never show me the first one", Ref(ordinal=0)),
        ("forget Star Wars", Ref(mention="Star Wars")),
        ("don't recommend 'Fargo' ever again", Ref(mention="Fargo")),
    ],
)
def test_never(parser, message, ref):
    parsed = parser.parse(message, has_previous=True)
    assert parsed.act == "never" and parsed.refs == (ref,)


def test_never_with_a_genre_is_a_constraint(parser):
    parsed = parser.parse("no more horror")
    assert parsed.act == "recommend" and parsed.genres_out == {"Horror"}


def test_only_the_catalogs_genres_are_used():
    parsed = IntentParser(["Comedy", "Drama"]).parse("a scary comedy")
    assert parsed.genres_in == {"Comedy"}  # no "Horror" in this catalog
