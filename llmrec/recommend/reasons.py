"""Reasons built from facts: what a recommendation's one line may say, and a check of it.

A reason states only what the system knows:

- the catalog's metadata of the item: its title, year and genres;
- the history items that drove the score, by the model's own signal: the user's history
  items nearest the recommended one in the item-token space (``ItemSpace``, the rows the
  model scores items with); on a base without item tokens, the history items that share
  the most genres with it (catalog metadata again, said as such);
- the constraints the user stated (genres in and out, years, an anchor item), which the
  ranking enforced as exclusions, so the item meets each one.

:func:`write_reason` puts those facts into a fixed sentence with slots: true by
construction, and instant. A model may phrase them instead (``reasons = "model"``, see
:func:`phrase_reason`); its line is kept only if :class:`ClaimChecker` finds nothing
unsupported in it, else the fixed sentence is used. The checker is rules, not a model,
because a 135M model judging its own claims would repeat its own mistakes: every genre
word must name one of the item's genres (or a genre the user ruled out, said as "no X"),
every year or decade must be the item's, every title must be the item or one of its
evidence items, every other word must come from a closed vocabulary of connectives and
reason words or from the facts themselves (an invented plot noun fails here), and no
phrase may repeat.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llmrec.data.genres import GenreLexicon
from llmrec.recommend.grounding import normalize_title, split_year

if TYPE_CHECKING:
    from llmrec.data import Catalog
    from llmrec.model.item_space import ItemSpace
    from llmrec.prompts import PromptBuilder

ReasonMode = Literal["facts", "model"]
"""How reasons are written: the fixed sentence, or a model's phrasing of the same facts
checked by :class:`ClaimChecker` (the fixed sentence when the check fails)."""
EVIDENCE_ITEMS = 2
"""History items a reason cites."""
MAX_REASON_CHARS = 240
"""Longest line a model's phrasing may take; a longer one is not a one-line reason."""

# Titles a text may name: "Title (1995)", or a quoted or emphasized span.
NAMED_TITLE_RE = re.compile(
    r"(?:[A-Z0-9][\w'’:&.,!-]*(?:\s+[\w'’:&.,!-]+){0,8}?)\s*\((?:18|19|20)\d\d\)"
    r"|[\"“*_]([^\"”*_\n]{2,80})[\"”*_]"
)
_YEAR_RE = re.compile(r"(?<!\d)((?:18|19|20)\d\d)(?!\d)")
_DECADE_RE = re.compile(r"(?<![\w'])'?((?:18|19|20)?\d)0'?s\b")
_WORD_RE = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_NEGATION_RE = re.compile(r"(?:\bno|\bnot|\bwithout|\bnon|\bfree of|\bzero)[\s-]+(?:\w+\s+)?$")

# Connectives and reason words a phrasing may use besides the facts' own words. A closed
# list on purpose: a word outside it and outside the facts is a claim nobody checked.
REASON_WORDS = frozenset(
    """
    a an the and or but nor of in on at to for with from by as into about than then so
    also too very just only both either each one two three it its it's this that these
    those there here which who whom what when where while if because since though yet
    i i'm i'd i've me my you you're you'd you've your yours we our they their them he she
    is are was were be been being am do does did has have had having will would could
    should can may might must shall not no without more most much many some any other
    another same such like likes liked love loves loved enjoy enjoys enjoyed enjoying fan
    fans watch watches watched watching seen see saw pick picks picked choice film films
    movie movies title titles fit fits fitting match matches matching suit suits close
    closer closest near nearer nearest next similar similarly alike kind sort mix blend
    taste tastes history list favorite favorites favourite favourites model ranks ranked
    rank high higher highest top puts put places place shares share sharing shared genre
    all them
    genres year released release asked ask asking wanted want wants request requested
    mood recommend recommended recommendation suggest suggested suggestion try give
    given gives well good great based along together among between over after before
    earlier recent recently last first second third new older newer
    """.split()
)


@dataclass(frozen=True)
class Asked:
    """The constraints a user stated, which every recommended item meets."""

    genres_in: frozenset[str] = frozenset()
    genres_out: frozenset[str] = frozenset()
    years: str | None = None
    """As said back: "from the 1990s", "up to 1980"."""
    anchor: str | None = None
    """The display title of the "like X" item."""


@dataclass(frozen=True)
class Facts:
    """Everything a reason for one recommended item may state."""

    item_id: str
    title: str
    """The item's display title, "Title (Year)"."""
    year: int | None
    genres: tuple[str, ...]
    evidence: tuple[str, ...]
    """Display titles of the history items that drove the score, strongest first."""
    evidence_by: Literal["model", "genres"]
    """Where the evidence comes from: the model's item space, or shared catalog genres."""
    shared: tuple[tuple[str, ...], ...] = ()
    """With ``evidence_by == "genres"``: the genres each evidence item shares with it."""
    asked: Asked = field(default_factory=Asked)


class Reasoner:
    """Gathers the facts of a recommended item for one user's history."""

    def __init__(
        self, catalog: Catalog, space: ItemSpace | None = None, evidence: int = EVIDENCE_ITEMS
    ):
        self.catalog = catalog
        self.space = space
        self.evidence = evidence
        self.checker = ClaimChecker(catalog.genres)

    def facts(self, item_id: str, history: Sequence[str], asked: Asked | None = None) -> Facts:
        """The facts of ``item_id`` after ``history`` (oldest first) under ``asked``."""
        item = self.catalog[item_id]
        seen = [h for h in history if h in self.catalog and h != item_id]
        shared: tuple[tuple[str, ...], ...] = ()
        if self.space is not None and item_id in self.space:
            # most recent first among equals: ``nearest`` keeps the order it is given
            evidence = [h for h, _ in self.space.nearest(item_id, reversed(seen), self.evidence)]
            by: Literal["model", "genres"] = "model"
        else:
            evidence, shared = self._by_genres(item.genres, seen)
            by = "genres"
        return Facts(
            item_id=item_id,
            title=item.display,
            year=item.year,
            genres=tuple(item.genres),
            evidence=tuple(self.catalog.display(h) for h in evidence),
            evidence_by=by,
            shared=shared,
            asked=asked or Asked(),
        )

    def _by_genres(
        self, genres: Sequence[str], seen: Sequence[str]
    ) -> tuple[list[str], tuple[tuple[str, ...], ...]]:
        """History items sharing the most genres with the item, most recent first."""
        mine = set(genres)
        scored = [(len(mine & set(self.catalog[h].genres)), pos, h) for pos, h in enumerate(seen)]
        scored = sorted((s for s in scored if s[0] > 0), reverse=True)[: self.evidence]
        picked = [h for _, _, h in scored]
        shared = tuple(tuple(g for g in genres if g in self.catalog[h].genres) for h in picked)
        return picked, shared


def write_reason(facts: Facts) -> str:
    """The reason as one fixed sentence with the facts in its slots."""
    parts = []
    what = _join(facts.genres)
    if what and facts.year is not None:
        parts.append(f"{what} from {facts.year}.")
    elif what:
        parts.append(f"{what}.")
    elif facts.year is not None:
        parts.append(f"From {facts.year}.")
    if facts.evidence and facts.evidence_by == "model":
        parts.append(f"Your model puts it closest to {_join(facts.evidence)} of what you watched.")
    elif facts.evidence:
        groups: dict[tuple[str, ...], list[str]] = {}
        for title, genres in zip(facts.evidence, facts.shared, strict=True):
            groups.setdefault(genres, []).append(title)
        said = [
            f"{'all of them' if len(g) > 1 and g == facts.genres else _join(g)} with {_join(t)}"
            for g, t in groups.items()
        ]
        parts.append(f"It shares {' and '.join(said)} from your history.")
    else:
        parts.append("Your model ranks it high after what you watched.")
    asked = facts.asked
    wanted = [*[g for g in facts.genres if g in asked.genres_in]]
    wanted += [f"no {g}" for g in sorted(asked.genres_out)]
    wanted += [asked.years] if asked.years else []
    wanted += [f"like {asked.anchor}"] if asked.anchor else []
    if wanted:
        parts.append(f"As you asked: {', '.join(wanted)}.")
    return " ".join(parts)


def _join(words: Sequence[str]) -> str:
    """ "A", "A and B", "A, B and C"."""
    words = list(words)
    if len(words) < 2:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def facts_prompt_line(facts: Facts) -> str:
    """The facts, as the explain prompt hands them to a model that phrases them."""
    lines = [f"Genres: {', '.join(facts.genres) or 'unknown'}"]
    if facts.year is not None:
        lines.append(f"Year: {facts.year}")
    if facts.evidence:
        lines.append(f"Closest in my history: {'; '.join(facts.evidence)}")
    return "\n".join(lines)


async def phrase_reason(
    facts: Facts,
    history_titles: Sequence[str],
    prompts: PromptBuilder,
    write: Callable[[list[dict[str, str]]], Awaitable[str]],
    checker: ClaimChecker,
) -> tuple[str, list[str]]:
    """A model's one-line phrasing of ``facts`` if the checker finds nothing unsupported in
    it, else the fixed sentence; with the problems found (empty when the phrasing stood)."""
    messages = prompts.explain_messages(history_titles, facts.title, facts_prompt_line(facts))
    line = " ".join((await write(messages)).strip().split("\n", 1)[0].split())
    problems = checker.problems(line, facts)
    if len(line) > MAX_REASON_CHARS:
        problems.append(f"longer than {MAX_REASON_CHARS} characters")
    return (write_reason(facts), problems) if problems else (line, [])


# --------------------------------------------------------------------------- the checker


class ClaimChecker:
    """Finds what a reason says that its :class:`Facts` do not support (rules, see top)."""

    def __init__(self, catalog_genres: Iterable[str]):
        self.lexicon = GenreLexicon(catalog_genres)

    def problems(self, text: str, facts: Facts) -> list[str]:
        """Each unsupported claim in ``text``, said plainly; empty when all is supported."""
        found: list[str] = []
        if len(text) < 8 or not any(c.isalpha() for c in text):
            return ["no reason written"]
        rest, titles_found = self._without_titles(text, facts)
        found += titles_found
        low = rest.lower()
        for start, end, genre in sorted(self.lexicon.find(low), reverse=True):
            if genre not in facts.genres and not (
                genre in facts.asked.genres_out and _NEGATION_RE.search(low[:start])
            ):
                found.append(f"genre {low[start:end]!r}: the item is {_join(facts.genres)}")
            low = low[:start] + " " + low[end:]
        for m in _YEAR_RE.finditer(low):
            if facts.year is None or int(m.group(1)) != facts.year:
                found.append(f"year {m.group(1)}: the item is from {facts.year}")
        for m in _DECADE_RE.finditer(low):
            decade = m.group(1)
            lo = int(decade) * 10 if len(decade) > 1 else 1900 + int(decade) * 10
            if facts.year is None or not lo <= facts.year <= lo + 9:
                found.append(f"decade {m.group(0)!r}: the item is from {facts.year}")
        low = _DECADE_RE.sub(" ", _YEAR_RE.sub(" ", low))
        allowed = REASON_WORDS | _words(" ".join([facts.title, *facts.evidence, *facts.genres]))
        allowed |= _words(" ".join(facts.asked.genres_out | facts.asked.genres_in))
        unknown = [w for w in _WORD_RE.findall(low) if w not in allowed and not w.isdigit()]
        found += [f"unsupported word {w!r}" for w in dict.fromkeys(unknown)]
        # titles and genre names are facts and may recur ("Comedy ... shares Comedy with")
        found += [f"repeated phrase {p!r}" for p in repeated_phrases(low)]
        return found

    def _without_titles(self, text: str, facts: Facts) -> tuple[str, list[str]]:
        """``text`` with the facts' titles cut out, and each other title it names."""
        known = [facts.title, *facts.evidence] + (
            [facts.asked.anchor] if facts.asked.anchor else []
        )
        if facts.asked.years:  # "up to 1980" is the user's constraint, not the item's year
            text = re.sub(re.escape(facts.asked.years), " ", text, flags=re.IGNORECASE)
        # Every full "Title (Year)" before any bare title, each as whole words: a bare
        # "Sabrina" cut first would strand the "(1954)" of "Sabrina (1954)", and "M (1931)"
        # must not take the m out of "model".
        bare = {split_year(t)[0] for t in known}
        for form in sorted(known, key=len, reverse=True) + sorted(bare, key=len, reverse=True):
            text = re.sub(rf"(?<!\w){re.escape(form)}(?!\w)", " ", text, flags=re.IGNORECASE)
        keys = {normalize_title(split_year(t)[0]) for t in known}
        named = []
        for m in NAMED_TITLE_RE.finditer(text):
            mention = m.group(1) or m.group(0)
            if normalize_title(split_year(mention)[0]) not in keys:
                named.append(f"title {mention.strip()!r} is not the item or its evidence")
        return NAMED_TITLE_RE.sub(" ", text), named


def _words(text: str) -> set[str]:
    return set(_WORD_RE.findall(text.lower()))


STOPWORDS = frozenset(
    "a an the and or of in on at to for with from by as is it its this that you your i my "
    "me we be are was were has have had will would not no so but".split()
)


def repeated_phrases(text: str, n: int = 2) -> list[str]:
    """Word ``n``-grams that occur more than once in ``text``, except those made only of
    stopwords ("of the" may repeat; "the supernatural" may not)."""
    words = _WORD_RE.findall(text.lower())
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        seen[gram] = seen.get(gram, 0) + 1
    return [" ".join(g) for g, c in seen.items() if c > 1 and not set(g) <= STOPWORDS]


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of ``text``'s word ``n``-grams that repeat an earlier one (0 for short texts)."""
    words = _WORD_RE.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
