"""Catalog titles in display form: trailing articles moved to the front, placeholders known."""

from __future__ import annotations

import re

# Titles that stand for "no movie" in ML-100K (item 267 is literally "unkonwn").
PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn"})

# Articles that catalogs move to the end ("Postino, Il"). Case-sensitive on purpose:
# a lowercase trailing word ("Yo, la peor de todas") is part of the title, not a moved article.
ARTICLES = (
    "The", "A", "An",  # English
    "La", "Le", "Les", "L'", "Un", "Une",  # French
    "Il", "Lo", "Gli", "Uno", "Una",  # Italian
    "El", "Los", "Las",  # Spanish
    "Der", "Die", "Das", "Ein", "Eine",  # German
    "Det", "Den", "De", "Het", "O", "Os",  # Scandinavian, Dutch, Portuguese
)  # fmt: skip
_ARTICLE_RE = re.compile(r"^(?P<body>.+), (?P<article>" + "|".join(map(re.escape, ARTICLES)) + ")$")
# A title = main part + trailing parenthesised groups, e.g. "Blue Angel, The (Blaue Engel, Der)".
# The lazy main part makes the trailing groups as long as possible.
_PARENS_RE = re.compile(r"^(?P<main>.*?)(?P<groups>(?: \([^()]*\))*)$")
_PAREN_GROUP_RE = re.compile(r" \(([^()]*)\)")


def _move_article(title: str) -> str:
    """``"Shawshank Redemption, The"`` -> ``"The Shawshank Redemption"``; else unchanged."""
    match = _ARTICLE_RE.match(title)
    if match is None:
        return title
    article, body = match["article"], match["body"]
    # "Enfer, L'" -> "L'Enfer": an elided article takes no space.
    return f"{article}{body}" if article.endswith("'") else f"{article} {body}"


def fix_title(title: str) -> str:
    """Display form of a catalog title: trailing articles moved to the front.

    The main part and each trailing parenthesised alternative title are fixed on their
    own, so ``"Blue Angel, The (Blaue Engel, Der)"`` becomes ``"The Blue Angel (Der
    Blaue Engel)"`` and an article is never pulled across a parenthesis.
    """
    title = " ".join(title.split())
    match = _PARENS_RE.match(title)
    assert match is not None  # the pattern matches every string
    main = _move_article(match["main"])
    groups = "".join(f" ({_move_article(g)})" for g in _PAREN_GROUP_RE.findall(match["groups"]))
    return main + groups


def is_placeholder_title(title: str) -> bool:
    """True for titles that stand for "no movie" (ML-100K item 267, ``unkonwn``)."""
    return title.strip().casefold() in PLACEHOLDER_TITLES
