"""Genre words: the ways people and models name a catalog's genres.

One lexicon serves both directions: the agent reads constraints ("no horror", "funnier")
from a user's turn, and the claim checker (``llmrec.recommend.reasons``) finds the genre
claims a written reason makes. Keys are canonical genre names as catalogs spell them
(ML-100K's list); only those a catalog really has are used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Words that point at a genre; keys are canonical genre names as catalogs spell them
# (ML-100K's list). Only those the catalog really has are used.
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("action", "action-packed", "explosive", "explosions"),
    "Adventure": ("adventure", "adventures", "adventurous", "quest"),
    "Animation": ("animation", "animated", "cartoon", "cartoons", "anime"),
    "Children's": ("children's", "childrens", "kids", "kid", "family", "children"),
    "Comedy": (
        "comedy", "comedies", "funny", "funnier", "funniest", "hilarious", "laugh", "laughs",
        "humor", "humour", "lighter", "light-hearted", "lighthearted",
    ),
    "Crime": ("crime", "heist", "gangster", "gangsters", "mafia", "mob", "cop", "cops"),
    "Documentary": ("documentary", "documentaries", "doc", "docs"),
    "Drama": ("drama", "dramas", "dramatic", "sadder", "tearjerker", "serious"),
    "Fantasy": ("fantasy", "magic", "magical", "wizards", "dragons"),
    "Film-Noir": ("noir", "film-noir", "film noir"),
    "Horror": ("horror", "scary", "scarier", "scariest", "frightening", "slasher", "creepy"),
    "Musical": ("musical", "musicals", "singing"),
    "Mystery": ("mystery", "mysteries", "whodunit", "detective"),
    "Romance": (
        "romance", "romantic", "romcom", "rom-com", "love story", "love stories", "date night",
    ),
    "Sci-Fi": (
        "sci-fi", "scifi", "science fiction", "science-fiction", "space", "aliens", "alien",
        "futuristic", "robots",
    ),
    "Thriller": ("thriller", "thrillers", "suspense", "suspenseful", "tense", "thrilling"),
    "War": ("war", "wartime", "battle", "soldiers"),
    "Western": ("western", "westerns", "cowboy", "cowboys"),
}  # fmt: skip


class GenreLexicon:
    """Genre words mapped onto the genre names one catalog uses."""

    def __init__(self, catalog_genres: Iterable[str]):
        by_fold = {g.casefold(): g for g in catalog_genres}
        self.words: dict[str, str] = {}
        for genre in by_fold.values():
            self.words[genre.casefold()] = genre
        for canonical, words in GENRE_WORDS.items():
            genre = by_fold.get(canonical.casefold())
            if genre is not None:
                for word in words:
                    self.words.setdefault(word, genre)
        alternatives = sorted(self.words, key=len, reverse=True)
        self._re = (
            re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, alternatives)) + r")(?![\w-])")
            if alternatives
            else None
        )

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, genre) of each genre word in lowercased ``text``."""
        if self._re is None:
            return []
        return [(m.start(), m.end(), self.words[m.group(1)]) for m in self._re.finditer(text)]
