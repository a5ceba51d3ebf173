"""What a chat message asks for: a rule-based reading of one user turn.

The personal agent runs on the user's own small adapter (SmolLM2-135M by default). A model
that size does not follow tool-calling or JSON formats reliably, and a misread intent
would record the wrong feedback or drop a constraint silently; so intents, references and
constraints are read with rules here, deterministically and testably, and the model does
what it is good at: ranking catalog titles and writing the one-line explanation.

The rules cover what people say to a recommender:

- requests with constraints: "like Heat but funnier" (an anchor item and a genre),
  "no horror" (a genre out), "something from the 80s" (a year range), "one I've seen
  before" (seen items allowed), "give me 5";
- follow-ups on the previous answer: "why that one?", "why the second?", "more like the
  second";
- feedback: "I watched it, loved it" (history + thumbs up), "I saw X, it was boring"
  (thumbs down), "never show me X" / "forget X" (exclusion).

The genre words map onto the catalog's own genre names (:class:`GenreLexicon`), so a
catalog without "Horror" never gets a horror constraint. This module parses only: it
resolves nothing against the catalog (see ``llmrec.agent``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from llmrec.data.genres import GenreLexicon

Act = Literal["recommend", "why", "feedback", "never"]


@dataclass(frozen=True)
class Ref:
    """A reference to one item: the n-th of the previous answer (``ordinal``, 0-based,
    -1 = the last), "it"/"that one" (``pronoun``), or a title as typed (``mention``)."""

    ordinal: int | None = None
    pronoun: bool = False
    mention: str | None = None


@dataclass(frozen=True)
class YearRange:
    """Inclusive release-year bounds (None = open)."""

    lo: int | None = None
    hi: int | None = None

    def __contains__(self, year: object) -> bool:
        if not isinstance(year, int):
            return False
        return (self.lo is None or year >= self.lo) and (self.hi is None or year <= self.hi)

    def describe(self) -> str:
        """ "from the 1980s", "from 1995", "before 1980", "since 2000"."""
        if self.lo is not None and self.hi is not None:
            if self.lo == self.hi:
                return f"from {self.lo}"
            if self.lo % 10 == 0 and self.hi == self.lo + 9:
                return f"from the {self.lo}s"
            return f"from {self.lo}-{self.hi}"
        if self.lo is not None:
            return f"from {self.lo} on"
        return f"up to {self.hi}"


@dataclass(frozen=True)
class Parsed:
    """One user turn, read."""

    act: Act
    refs: tuple[Ref, ...] = ()
    """The items the turn is about (feedback, never, why)."""
    sentiment: Literal["positive", "negative"] | None = None
    watched: bool = False
    """The user says they watched the item(s)."""
    anchor: Ref | None = None
    """"like X", "more like the second": the item the picks should resemble."""
    genres_in: frozenset[str] = frozenset()
    """Catalog genres the picks must have one of."""
    genres_out: frozenset[str] = frozenset()
    """Catalog genres the picks must not have."""
    years: YearRange | None = None
    include_seen: bool = False
    """The user asks for something they have already seen."""
    more: bool = False
    """"more", "others", "something else": skip the previous answer's items."""
    k: int | None = None
    """How many picks, when the user says ("give me 5")."""

    @property
    def constrained(self) -> bool:
        """Whether the request carries any structured constraint."""
        return bool(
            self.anchor or self.genres_in or self.genres_out or self.years or self.include_seen
        )


# --------------------------------------------------------------------------- patterns

_ORDINALS = {
    "first": 0, "1st": 0, "second": 1, "2nd": 1, "third": 2, "3rd": 2, "fourth": 3, "4th": 3,
    "fifth": 4, "5th": 4, "sixth": 5, "6th": 5, "seventh": 6, "7th": 6, "eighth": 7, "8th": 7,
    "ninth": 8, "9th": 8, "tenth": 9, "10th": 9, "last": -1,
}  # fmt: skip
_ORDINAL_RE = re.compile(
    r"\b(?:the\s+)?(" + "|".join(_ORDINALS) + r")\b(?:\s+(?:one|movie|film|pick))?"
    r"|(?:number|no\.?|#)\s*(\d{1,2})\b"
)
_PRONOUN_RE = re.compile(r"^(?:it|that|this|that one|this one|that movie|this movie|the film)$")
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "a couple of": 2, "a few": 3,
}  # fmt: skip
_COUNT_RE = re.compile(
    r"\b(\d{1,2}|" + "|".join(_NUMBER_WORDS) + r")\s+(?:more\s+|other\s+|new\s+|good\s+)?"
    r"(?:[\w'-]+\s+)?(?:movies|films|picks|recommendations|suggestions|titles|ideas|options"
    r"|ones|comedies|dramas|thrillers|westerns|musicals|documentaries|mysteries|romances)\b"
)
_DECADE_WORDS = {
    "twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
    "seventies": 1970, "eighties": 1980, "nineties": 1990,
}  # fmt: skip
_DECADE_RE = re.compile(r"(?<![\w'])'?(19|20)?([0-9])0'?s\b")
_DECADE_WORD_RE = re.compile(r"\b(" + "|".join(_DECADE_WORDS) + r")\b")
_BEFORE_RE = re.compile(r"\b(?:before|older than|prior to|pre)[-\s]((?:18|19|20)\d\d)\b")
_AFTER_RE = re.compile(r"\b(?:after|since|newer than|post)[-\s]((?:18|19|20)\d\d)\b")
_YEAR_RE = re.compile(r"\b(?:from|in|of|released in|made in)\s+((?:18|19|20)\d\d)\b")
_SEEN_RE = re.compile(
    r"\b(?:again|rewatch|re-watch|watch again|already (?:seen|watched)|"
    r"(?:i'?ve|i have) (?:already )?(?:seen|watched)|seen before|watched before|favou?rites?)\b"
)
_MORE_RE = re.compile(r"\b(?:more|others?|another|something else|anything else|different)\b")

_WHY_RE = re.compile(r"^\s*(?:and\s+)?(?:why|how come|what makes|explain|what'?s so good about)\b")
_NEVER_RE = re.compile(
    r"\b(?:never|don'?t|do not|stop)\s+(?:ever\s+)?(?:show|recommend|suggest|give)(?:ing)?"
    r"\s+(?:me\s+)?(?:again\s+)?(?P<ref>.+)"
    r"|\b(?:forget(?:\s+about)?|hide|block|ban|remove|drop)\s+(?P<ref2>.+)"
    r"|\bno more\s+(?P<ref3>.+)"
)
_WATCHED_RE = re.compile(
    r"\b(?:i\s+)?(?:just\s+|already\s+|finally\s+)?(?:watched|saw|have seen|'ve seen|seen|finished)"
    r"(?:\s+(?P<ref>.+?))?(?=\s*(?:,|;|\.|!|\?|\band\b|\bbut\b|\bit was\b|\bwhich\b|$))"
)
_POSITIVE_RE = re.compile(
    r"\b(?:loved|love|liked|like it|liked it|enjoyed|great|amazing|awesome|fantastic|"
    r"excellent|brilliant|wonderful|good|perfect|favou?rite|thumbs up|recommend it)\b"
)
_NEGATIVE_RE = re.compile(
    r"\b(?:hated|hate|disliked|didn'?t like|did not like|didn'?t enjoy|did not enjoy|boring|"
    r"awful|terrible|bad|meh|dull|not good|not for me|thumbs down|waste|worst)\b"
)
_FEEDBACK_REF_RE = re.compile(
    r"\b(?:loved|liked|enjoyed|hated|disliked|didn'?t like|did not like)\s+(?P<ref>.+?)"
    r"(?=\s*(?:,|;|\.|!|\?|\band\b|\bbut\b|$))"
)
_ANCHOR_RE = re.compile(
    r"(?<!i'd )(?<!i would )(?<!i )(?<!would )(?<!you )(?<!you'd )\b"
    r"(?:(?:more\s+)?like|similar to|in the style of|in the vein of|along the lines of|such as)"
    r"\s+(?P<ref>.+?)"
    r"(?=\s*(?:,|;|\.|!|\?|\bbut\b|\bonly\b|\bthough\b|\bfrom\b|\bwith\b|\bwithout\b|\bthat\b"
    r"|\bexcept\b|\band\b|\bin the\b|$))"
)
_NEGATION_RE = re.compile(
    r"(?:\bno|\bnot|\bwithout|\bnothing|\bavoid|\bexcept|\bskip|\bhate|\bdon'?t want|"
    r"\bno more|\bnever|\bnon|\banything but|\bless|\bfewer|\bnot a|\bnot an|\bnot too)"
    r"(?:\s+\w+){0,2}\s*$"
)
_FILLER = frozenset(
    "something anything a movie film movies films one ones them those these stuff that this "
    "what".split()
)
_QUOTED_RE = re.compile(r"\"([^\"]{2,80})\"|“([^”]{2,80})”|(?<!\w)'([^'\n]{2,80})'(?!\w)")
_TRIM = " \t\"“”'*_`.,;:!?"


def _ref(text: str | None, previous_nonempty: bool) -> Ref | None:
    """A reference from a span of text: ordinal, pronoun or title mention (or None)."""
    if text is None:
        return None
    span = text.strip(_TRIM)
    span = re.sub(r"^(?:the movie|the film|movie|film)\s+", "", span).strip(_TRIM)
    span = re.sub(r"\s+(?:again|ever again|anymore|any more|please)$", "", span).strip(_TRIM)
    if not span or span in _FILLER:
        return None
    m = _ORDINAL_RE.fullmatch(span) or (_ORDINAL_RE.match(span) if len(span.split()) <= 3 else None)
    if m:
        index = _ORDINALS[m.group(1)] if m.group(1) else int(m.group(2)) - 1
        return Ref(ordinal=index)
    if _PRONOUN_RE.match(span):
        return Ref(pronoun=True) if previous_nonempty else None
    return Ref(mention=span)


def _restore_case(original: str, lowered: str, ref: Ref | None) -> Ref | None:
    """Mentions are found in lowercased text; give them back their typed spelling."""
    if ref is None or ref.mention is None:
        return ref
    at = lowered.find(ref.mention)
    return Ref(mention=original[at : at + len(ref.mention)]) if at >= 0 else ref


class IntentParser:
    """Reads user turns against one catalog's genre names."""

    def __init__(self, catalog_genres: Iterable[str]):
        self.genres = GenreLexicon(catalog_genres)

    def parse(self, message: str, has_previous: bool = False) -> Parsed:
        """Read one user message; ``has_previous`` tells whether the conversation already
        showed items (so "it" and "the second" can refer to them)."""
        original = " ".join(message.split())
        text = original.lower().replace("’", "'")
        # Quoted titles are taken as typed, whatever the rules below would make of them.
        quoted = [
            Ref(mention=next(g for g in groups if g).strip())
            for groups in _QUOTED_RE.findall(original)
        ]

        def ref(span: str | None) -> Ref | None:
            return _restore_case(original, text, _ref(span, has_previous))

        never = _NEVER_RE.search(text)
        if never:
            span = never.group("ref") or never.group("ref2") or never.group("ref3")
            # "no more horror" / "never show me horror" is a genre constraint, not an item.
            genre_only = self.genres.find(span) and not quoted and len(span.split()) <= 3
            target = quoted[:1] or [r for r in [ref(span)] if r]
            if target and not genre_only:
                return Parsed(act="never", refs=tuple(target))

        if _WHY_RE.match(text):
            after = _WHY_RE.sub("", text, count=1)
            after = re.sub(r"^\s*(?:did you (?:pick|choose|recommend)|is|was|about)\s+", "", after)
            target = quoted[:1] or [r for r in [ref(after)] if r]
            if not target and has_previous:
                target = [Ref(pronoun=True)]
            return Parsed(act="why", refs=tuple(target))

        watched = _WATCHED_RE.search(text)
        positive = _POSITIVE_RE.search(text) is not None
        negative = _NEGATIVE_RE.search(text) is not None
        request = self._is_request(text)
        # "something I've seen before" is a request; "I watched X, loved it" is feedback.
        if (watched and not (request and not (positive or negative))) or (
            (positive or negative) and not request
        ):
            sentiment = "negative" if negative else ("positive" if positive else None)
            spans = [watched.group("ref")] if watched and watched.group("ref") else []
            spans += [m.group("ref") for m in _FEEDBACK_REF_RE.finditer(text)]
            refs = quoted[:1] or [r for r in map(ref, spans) if r][:1]
            if not refs and has_previous:
                refs = [Ref(pronoun=True)]
            if refs:
                return Parsed(
                    act="feedback",
                    refs=tuple(refs),
                    sentiment=sentiment,
                    watched=watched is not None,
                )

        return self._request(original, text, quoted, has_previous)

    @staticmethod
    def _is_request(text: str) -> bool:
        return bool(
            re.search(
                r"\b(?:recommend|suggest|something|anything|what should|give me|show me|"
                r"any ideas|movie for|film for|looking for|in the mood|want to watch|"
                r"more like|similar)\b",
                text,
            )
        )

    def _request(self, original: str, text: str, quoted: list[Ref], has_previous: bool) -> Parsed:
        anchor = None
        m = _ANCHOR_RE.search(text)
        if m:
            anchor = _restore_case(original, text, _ref(m.group("ref"), has_previous))
        if quoted and (anchor is None or anchor.mention is not None):
            anchor = quoted[0]
        genres_in, genres_out = set(), set()
        for start, _end, genre in self.genres.find(text):
            if (
                anchor is not None
                and anchor.mention
                and m
                and m.start("ref") <= start < m.end("ref")
            ):
                continue  # a genre word inside the anchor's title ("like Space Jam")
            (genres_out if _NEGATION_RE.search(text[:start]) else genres_in).add(genre)
        genres_in -= genres_out
        count = _COUNT_RE.search(text)
        k = None
        if count:
            word = count.group(1)
            k = int(word) if word.isdigit() else _NUMBER_WORDS[word]
        return Parsed(
            act="recommend",
            anchor=anchor,
            genres_in=frozenset(genres_in),
            genres_out=frozenset(genres_out),
            years=_years(text),
            include_seen=_SEEN_RE.search(text) is not None,
            more=has_previous and _MORE_RE.search(text) is not None,
            k=k,
        )


def _years(text: str) -> YearRange | None:
    """The release-year constraint a request states, if any."""
    if m := _BEFORE_RE.search(text):
        return YearRange(hi=int(m.group(1)) - 1)
    if m := _AFTER_RE.search(text):
        return YearRange(lo=int(m.group(1)))
    if m := _DECADE_WORD_RE.search(text):
        lo = _DECADE_WORDS[m.group(1)]
        return YearRange(lo, lo + 9)
    if m := _DECADE_RE.search(text):
        century = m.group(1)
        digit = int(m.group(2))
        # "the 80s" -> 1980s; "the 00s"/"the 10s" -> 2000s/2010s; "1950s" as written.
        lo = (
            int(century) * 100 + digit * 10
            if century
            else (1900 if digit >= 2 else 2000) + digit * 10
        )
        return YearRange(lo, lo + 9)
    if m := _YEAR_RE.search(text):
        year = int(m.group(1))
        return YearRange(year, year)
    return None
