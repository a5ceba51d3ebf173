"""Grounding free text to catalog items with the shipped all-MiniLM-L6-v2."""

import pytest

from llmrec.data import Catalog, Item
from llmrec.recommend import Grounder, extract_title_mentions, normalize_title, split_year

ITEMS = [
    Item("1", "Toy Story", 1995, ("Animation",)),
    Item("2", "The Shawshank Redemption", 1994, ("Drama",)),
    Item("3", "Heat", 1995, ("Crime",)),
    Item("4", "Seven (Se7en)", 1995, ("Thriller",)),
    Item("5", "The Godfather", 1972, ("Crime",)),
    Item("6", "The Godfather: Part II", 1974, ("Crime",)),
    Item("7", "Star Wars", 1977, ("Sci-Fi",)),
    Item("8", "Twelve Monkeys", 1995, ("Sci-Fi",)),
    Item("9", "Mr. Holland's Opus", 1995, ("Drama",)),
    Item("10", "Fargo", 1996, ("Crime",)),
    Item("11", "Hamlet", 1996, ("Drama",)),
    Item("12", "Hamlet", 1948, ("Drama",)),
    Item("13", "Casino", 1995, ("Crime",)),
    # One movie listed under two ids (generic data may do this).
    Item("14", "Chasing Amy", 1997, ("Comedy",)),
    Item("15", "Chasing Amy", 1997, ("Comedy",)),
]


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    """MiniLM loads once per module (a few seconds); all catalog titles are embedded once."""
    return Grounder(Catalog(ITEMS), threshold=0.8)


def _ids(items) -> list[str]:
    return [g.item_id for g in items]


# ----- matching one mention -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mention", "item_id"),
    [
        ("The Shawshank Redemption (1994)", "2"),
        ("the shawshank redemption", "2"),  # case
        ("Shawshank Redemption, The", "2"),  # catalog-style article
        ("Shawshank Redemption", "2"),  # article dropped
        ("Mr Hollands Opus", "9"),  # punctuation
        ("Se7en", "4"),  # alternative title in parentheses
        ("Heat (1996)", "3"),  # a year off by one is the same movie
        ("Godfather Part II", "6"),
    ],
)
def test_exact_matches_score_one(grounder, mention, item_id):
    hit = grounder.ground_one(mention)
    assert hit is not None and hit.item_id == item_id and hit.score == 1.0
    assert hit.mention == mention


@pytest.mark.parametrize(
    ("mention", "item_id"),
    [
        ("Shawshank Redemtion", "2"),
        ("Shawshank Redemtion (1994)", "2"),
        ("Shawshenk Redemption", "2"),
        ("12 Monkeys", "8"),
        ("Godfather Part 2", "6"),
        ("Star Wars: Episode IV - A New Hope (1977)", "7"),  # long name, same year
    ],
)
def test_fuzzy_matches(grounder, mention, item_id):
    hit = grounder.ground_one(mention)
    assert hit is not None and hit.item_id == item_id
    assert 0.8 <= hit.score < 1.0


@pytest.mark.parametrize(
    "mention",
    [
        "Toy Story 3 (2010)",  # sequel not in the catalog
        "Toy Story 3",  # close without years: the number rule rejects it
        "Toy Story (2019)",  # a stated year far off: another movie
        "Godfather Part III",
        "Hamlet (2000)",
        "The Dark Knight (2008)",
        "Largo",  # one letter from "Fargo"
        "I think you will love it",
        "",
    ],
)
def test_near_misses_are_rejected(grounder, mention):
    assert grounder.ground_one(mention) is None


def test_year_picks_among_remakes(grounder):
    assert grounder.ground_one("Hamlet (1948)").item_id == "12"
    assert grounder.ground_one("Hamlet (1996)").item_id == "11"
    # No year: an unseen one is preferred over an excluded one.
    assert grounder.ground_one("Hamlet", exclude={"11"}).item_id == "12"
    assert grounder.ground_one("Hamlet", exclude={"12"}).item_id == "11"


def test_excluded_movie_is_not_replaced(grounder):
    assert grounder.ground_one("Heat (1995)", exclude={"3"}) is None
    # Nor does a second id of the same movie bring it back.
    assert grounder.ground_one("Chasing Amy (1997)", exclude={"14"}) is None
    assert grounder.ground_one("Chasing Amy (1997)", exclude={"15"}) is None


# ----- grounding whole answers ----------------------------------------------------------

ANSWER = """Sure! Based on your history, here are some movies you might enjoy:

1. **Heat** (1995) - a tense crime thriller with De Niro and Pacino.
2. Toy Story 3 (2010): the sequel to a movie you loved.
3. "Casino" (1995) - Scorsese at his best.
4. Shawshank Redemtion (1994) - hope and friendship.
5. Heat (1995) - worth a second mention.
"""


def test_ground_answer(grounder):
    hits = grounder.ground(ANSWER)
    assert _ids(hits) == ["3", "13", "2"]  # the sequel is dropped, Heat appears once
    assert hits[0].display == "Heat (1995)" and hits[0].mention == "Heat (1995)"


def test_ground_never_returns_excluded_or_unknown(grounder):
    exclude = {"3", "2", "14"}
    text = ANSWER + "\nAlso: *Chasing Amy* (1997), *Fargo* (1996), *Titanic* (1997)."
    hits = grounder.ground(text, exclude=exclude)
    ids = _ids(hits)
    assert not set(ids) & (exclude | {"15"})
    assert set(ids) <= {item.item_id for item in ITEMS}
    assert ids == ["13", "10"]


def test_ground_k(grounder):
    assert _ids(grounder.ground(ANSWER, k=2)) == ["3", "13"]
    assert grounder.ground("nothing to see here") == []


def test_empty_catalog():
    assert Grounder(Catalog([])).ground("Heat (1995)") == []


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        Grounder(Catalog(ITEMS), threshold=1.5)


# ----- mention extraction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("The Shawshank Redemption (1994)", ["The Shawshank Redemption (1994)"]),
        (
            'I recommend "Heat" (1995). It matches your taste for crime thrillers.',
            ["Heat (1995)"],
        ),
        (
            "Based on your history, I'd suggest watching The Matrix (1999).",
            ["The Matrix (1999)"],
        ),
        ("You might enjoy *Toy Story (1995)* because you liked Aladdin.", ["Toy Story (1995)"]),
        (
            "1. The Godfather (1972) - a classic\n"
            "2. **Pulp Fiction** (1994): sharp\n3. Fargo - dark",
            ["The Godfather (1972)", "Pulp Fiction (1994)", "Fargo"],
        ),
        (
            "Here are some movies you might like:\n\n- Heat (1995)\n- Casino (1995)\n- Heat (1995)",
            ["Heat (1995)", "Casino (1995)"],
        ),
        (
            "**My picks:**\n* Star Wars (1977)\n* Return of the Jedi (1983) – the finale",
            ["Star Wars (1977)", "Return of the Jedi (1983)"],
        ),
        (
            "Try Beauty and the Beast (1991) and As Good as It Gets (1997), both great.",
            ["Beauty and the Beast (1991)", "As Good as It Gets (1997)"],
        ),
        ("I recommend Heat because you like crime movies.", ["Heat"]),
        ("Mr. Holland's Opus", ["Mr. Holland's Opus"]),
        ("Here is my recommendation: Twelve Monkeys.", ["Twelve Monkeys"]),
        ("I think you'd love 'Schindler's List' (1993).", ["Schindler's List (1993)"]),
        ("", []),
    ],
)
def test_extract_title_mentions(text, mentions):
    assert extract_title_mentions(text) == mentions


def test_normalization_helpers():
    assert split_year("Heat (1995)") == ("Heat", 1995)
    assert split_year("Heat") == ("Heat", None)
    assert normalize_title("Shawshank Redemption, The") == "shawshank redemption"
    assert normalize_title("Amélie & Me!") == normalize_title("amelie and me")
