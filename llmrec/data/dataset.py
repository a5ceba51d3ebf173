"""Interaction data: item catalog, per-user chronological histories, leave-last-out split.

Two sources feed the same `Dataset`:

* MovieLens-100K as shipped inside the ``recbole`` wheel (read in place, never copied:
  GroupLens licence). Titles are turned into display form ("Shawshank Redemption, The"
  -> "The Shawshank Redemption"), the placeholder item is dropped, and movies listed
  twice under two ids are merged into one canonical id.
* A user's own data in the generic CSV/JSONL format of ``docs/data-format.md``. Every
  malformed row raises `DataError` naming file, line and field.

Both apply the same ordering rules: a user's events are sorted by (timestamp, file line)
so ties keep file order, and a repeated (user, item) keeps only its earliest event, so a
history never holds an item twice (which keeps the split leak-free).

This module knows nothing about prompts, tokenizers or models. It caches nothing on disk.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from llmrec.config import AppConfig

logger = logging.getLogger(__name__)

ML100K = "ml-100k"
GENERIC = "generic"
DATASET_NAMES = (ML100K, GENERIC)

# Titles that stand for "no movie" in ML-100K (item 267 is literally "unkonwn").
PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn"})
# ML-100K's genre for "no genre": carries no information, so it is dropped.
PLACEHOLDER_GENRE = "unknown"

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
_TRAILING_YEAR_RE = re.compile(r"^(?P<title>.+?) \((?P<year>\d{4})\)$")


class DataError(ValueError):
    """A malformed data file, located as precisely as possible.

    ``str(err)`` reads like ``"interactions.csv, line 7, field 'timestamp': not a number
    or ISO date: 'yesterday'"``. ``line`` is 1-based (a CSV header is line 1); ``line``
    and ``field`` are None where they do not apply (an empty file, a bad file type).
    """

    def __init__(
        self, path: Path | str, reason: str, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = [self.path.name]
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call DataError(message) and lose the fields.
        return (DataError, (self.path, self.reason, self.line, self.field))


@dataclass(frozen=True)
class Item:
    """One catalog entry. ``title`` is already in display form (articles in front)."""

    item_id: str
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        """The title as users and the LLM see it: ``"The Shawshank Redemption (1994)"``."""
        return self.title if self.year is None else f"{self.title} ({self.year})"


class Catalog:
    """An ordered, immutable set of items addressed by ``item_id``.

    The order is the source order (ML-100K: numeric id order) and gives every item a
    stable position, ``index(item_id)``, for numpy score arrays.
    """

    def __init__(self, items: Iterable[Item]) -> None:
        self._items: tuple[Item, ...] = tuple(items)
        self._ids: list[str] = [item.item_id for item in self._items]
        self._pos: dict[str, int] = {}
        for pos, item_id in enumerate(self._ids):
            if item_id in self._pos:
                raise ValueError(f"duplicate item_id in catalog: {item_id!r}")
            self._pos[item_id] = pos
        # Lookup of free text (e.g. a title the LLM wrote); the first item wins a clash.
        self._by_display: dict[str, str] = {}
        for item in self._items:
            self._by_display.setdefault(item.display.casefold(), item.item_id)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._pos

    def __getitem__(self, item_id: str) -> Item:
        return self._items[self._pos[item_id]]

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: no hashing

    def __repr__(self) -> str:
        return f"Catalog({len(self)} items)"

    @property
    def ids(self) -> list[str]:
        """All item ids in catalog order. Shared, not copied: do not mutate it."""
        return self._ids

    def index(self, item_id: str) -> int:
        """Stable position of ``item_id`` (KeyError if it is not in the catalog)."""
        return self._pos[item_id]

    def display(self, item_id: str) -> str:
        """Display string of ``item_id``, e.g. ``"The Shawshank Redemption (1994)"``."""
        return self[item_id].display

    def by_display(self, text: str) -> str | None:
        """The item_id whose display string equals ``text`` (case-insensitive), else None."""
        return self._by_display.get(text.strip().casefold())


class Event(NamedTuple):
    """One interaction of a user, after dedup: what, when (unix seconds), and the rating."""

    item_id: str
    timestamp: float
    rating: float | None


@dataclass
class Dataset:
    """A catalog plus each user's chronological history.

    ``histories[user_id]`` lists item ids oldest first; users are in numeric-aware order
    (``"2"`` before ``"10"``). ``events`` holds the same interactions with timestamp and
    rating, in the same order (empty when a dataset is built from histories alone).
    """

    name: str
    catalog: Catalog
    histories: dict[str, list[str]]
    events: dict[str, list[Event]] = field(default_factory=dict)


@dataclass
class Split:
    """Leave-last-out split: per user, ``test`` = last item, ``valid`` = the one before.

    Users too short to evaluate appear in ``train`` only.
    """

    train: dict[str, list[str]]
    valid: dict[str, str]
    test: dict[str, str]

    def history_for_valid(self, user_id: str) -> list[str]:
        """What the model may see when predicting ``valid[user_id]``: the train items."""
        return list(self.train[user_id])

    def history_for_test(self, user_id: str) -> list[str]:
        """What the model may see when predicting ``test[user_id]``: train + valid item."""
        valid = [self.valid[user_id]] if user_id in self.valid else []
        return self.train[user_id] + valid


def user_sort_key(user_id: str) -> tuple[int, int, str]:
    """Numeric-aware order: numeric ids by value first, then other ids alphabetically."""
    # isascii: "²".isdigit() is True but int("²") fails.
    numeric = user_id.isascii() and user_id.isdigit()
    return (0, int(user_id), user_id) if numeric else (1, 0, user_id)


def leave_last_out(histories: Mapping[str, Sequence[str]], min_interactions: int = 3) -> Split:
    """Split each history in time order: last item -> test, the one before -> valid.

    Users with fewer than ``min_interactions`` items go entirely to train (no valid/test).
    Deterministic: users keep the input's order, nothing is sampled. A history holding an
    item twice raises ValueError, since the repeat would leak the answer into train.
    """
    if min_interactions < 2:
        raise ValueError(
            f"min_interactions must be >= 2 (one valid + one test item), got {min_interactions}"
        )
    train: dict[str, list[str]] = {}
    valid: dict[str, str] = {}
    test: dict[str, str] = {}
    for user_id, history in histories.items():
        if len(set(history)) != len(history):
            raise ValueError(f"history of user {user_id!r} repeats an item")
        if len(history) < min_interactions:
            train[user_id] = list(history)
            continue
        train[user_id] = list(history[:-2])
        valid[user_id] = history[-2]
        test[user_id] = history[-1]
    return Split(train=train, valid=valid, test=test)


# --------------------------------------------------------------------------- titles


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


# --------------------------------------------------------------------------- ML-100K


def ml100k_dir() -> Path:
    """Folder of ML-100K inside the installed ``recbole`` wheel (not imported: it is heavy)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ML-100K comes from the recbole wheel: pip install --no-deps recbole==1.2.1"
        )
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / ML100K


def _parse_ml100k_item(fields: list[str]) -> Item:
    """One ``.item`` row (id, title, year, space-separated genres) -> display-ready Item."""
    item_id, raw_title, raw_year, raw_genres = fields
    title, year = raw_title.strip(), None
    if raw_year.strip().isascii() and raw_year.strip().isdigit():
        year = int(raw_year)
    elif (m := _TRAILING_YEAR_RE.match(title)) is not None:
        # Item 1412 has year "V" and its year at the end of the title instead.
        title, year = m["title"], int(m["year"])
    genres = tuple(g for g in raw_genres.split() if g != PLACEHOLDER_GENRE)
    return Item(item_id=item_id.strip(), title=fix_title(title), year=year, genres=genres)


def _read_tsv(path: Path, n_fields: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each data row of an atomic-file TSV (header skipped)."""
    with path.open(encoding="utf-8") as fh:
        if not fh.readline():
            raise DataError(path, "empty file")
        for line_no, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != n_fields:
                raise DataError(
                    path, f"expected {n_fields} tab-separated fields, got {len(fields)}", line_no
                )
            yield line_no, fields


def load_ml100k(root: Path | None = None) -> Dataset:
    """Load MovieLens-100K from the recbole wheel (or ``root``, a folder in its format).

    Drops placeholder items and their interactions, maps each movie listed under two ids
    (same display title and year) to its smallest id, and keeps each user's earliest
    event per item.
    """
    root = ml100k_dir() if root is None else Path(root)
    items: list[Item] = []
    canonical: dict[str, str] = {}  # every kept item_id -> the id that represents it
    first_of: dict[tuple[str, int | None], str] = {}
    dropped = 0
    for _, fields in _read_tsv(root / f"{ML100K}.item", 4):
        item = _parse_ml100k_item(fields)
        if is_placeholder_title(item.title):
            dropped += 1
            continue
        items.append(item)
    # The smallest id (numerically) of a duplicate pair is canonical, whatever the file order.
    items.sort(key=lambda it: user_sort_key(it.item_id))
    kept: list[Item] = []
    for item in items:
        key = (item.title, item.year)
        if key in first_of:
            canonical[item.item_id] = first_of[key]
            continue
        first_of[key] = canonical[item.item_id] = item.item_id
        kept.append(item)
    logger.info(
        "ml-100k: dropped %d placeholder item(s), merged %d duplicate id(s)",
        dropped,
        len(items) - len(kept),
    )

    raw: list[tuple[str, str, float, float | None, int]] = []
    unknown = 0
    for line_no, (user_id, item_id, rating, timestamp) in _read_tsv(root / f"{ML100K}.inter", 4):
        target = canonical.get(item_id)
        if target is None:  # the placeholder's (or an unlisted item's) interactions
            unknown += 1
            continue
        raw.append((user_id, target, float(timestamp), float(rating), line_no))
    logger.info("ml-100k: dropped %d interaction(s) with placeholder or unlisted items", unknown)
    return _build_dataset(ML100K, Catalog(kept), raw)


def _build_dataset(
    name: str, catalog: Catalog, raw: Iterable[tuple[str, str, float, float | None, int]]
) -> Dataset:
    """Group (user, item, timestamp, rating, line) rows into sorted, deduplicated histories."""
    by_user: dict[str, list[tuple[float, int, str, float | None]]] = {}
    for user_id, item_id, timestamp, rating, line_no in raw:
        by_user.setdefault(user_id, []).append((timestamp, line_no, item_id, rating))
    events: dict[str, list[Event]] = {}
    for user_id in sorted(by_user, key=user_sort_key):
        # (timestamp, line) makes ties stable: equal timestamps keep file order.
        rows = sorted(by_user[user_id], key=lambda r: (r[0], r[1]))
        seen: set[str] = set()
        user_events: list[Event] = []
        for timestamp, _, item_id, rating in rows:
            if item_id not in seen:  # a repeat keeps only its earliest event
                seen.add(item_id)
                user_events.append(Event(item_id, timestamp, rating))
        events[user_id] = user_events
    histories = {u: [e.item_id for e in evs] for u, evs in events.items()}
    return Dataset(name=name, catalog=catalog, histories=histories, events=events)


# --------------------------------------------------------------------------- generic format

INTERACTION_FIELDS = ("user_id", "item_id", "timestamp")  # + optional "rating"
CATALOG_FIELDS = ("item_id", "title")  # + optional "year", "genres"


def _iter_records(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each row of a CSV (with header) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _iter_csv(path, required)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path)
    else:
        raise DataError(path, f"unsupported file type {path.suffix!r}: use .csv or .jsonl")


def _iter_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(path, "empty file: expected a header line")
        header = [h.strip() for h in header]
        for name in required:
            if name not in header:
                raise DataError(
                    path, f"missing required column (header has: {', '.join(header)})", 1, name
                )
        rows = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            # line_num is the line the record ends on (quoted fields may span lines).
            if len(row) > len(header):
                raise DataError(
                    path, f"{len(row)} fields but the header has {len(header)}", reader.line_num
                )
            rows += 1
            # A short row leaves its last columns missing (None) -> "missing value" later.
            yield reader.line_num, dict(zip(header, row, strict=False))
        if rows == 0:
            raise DataError(path, "empty file: a header but no rows")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    rows = 0
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are allowed (e.g. a trailing newline)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, f"invalid JSON: {err.msg}", line_no) from None
            if not isinstance(record, dict):
                raise DataError(
                    path, f"expected a JSON object, got {type(record).__name__}", line_no
                )
            rows += 1
            yield line_no, record
    if rows == 0:
        raise DataError(path, "empty file: no records")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _required_id(path: Path, line: int, record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if _is_missing(value):
        raise DataError(path, "missing value", line, name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(path, f"must be a string or an integer: {value!r}", line, name)
    return str(value).strip()


def _parse_timestamp(path: Path, line: int, value: Any) -> float:
    """Unix seconds from a number, a numeric string or an ISO-8601 string (naive = UTC)."""
    if _is_missing(value):
        raise DataError(path, "missing value", line, "timestamp")
    result: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                pass
            else:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=UTC)
                result = parsed.timestamp()
    if result is None or not math.isfinite(result):
        raise DataError(path, f"not a number or ISO date: {value!r}", line, "timestamp")
    return result


def _parse_rating(path: Path, line: int, value: Any) -> float | None:
    if _is_missing(value):
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        result = float(value)
    except ValueError:
        result = math.nan
    if not math.isfinite(result):
        raise DataError(path, f"not a number: {value!r}", line, "rating")
    return result


def _parse_year(path: Path, line: int, value: Any) -> int | None:
    if _is_missing(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    raise DataError(path, f"not an integer year: {value!r}", line, "year")


def _parse_genres(path: Path, line: int, value: Any) -> tuple[str, ...]:
    if _is_missing(value):
        return ()
    if isinstance(value, str):
        parts: list[Any] = value.split("|")
    elif isinstance(value, list) and all(isinstance(g, str) for g in value):
        parts = value
    else:
        raise DataError(
            path, f"expected a list of strings or a '|'-separated string: {value!r}", line, "genres"
        )
    return tuple(g.strip() for g in parts if g.strip())


def read_catalog(path: Path) -> Catalog:
    """Read a generic catalog file (see ``docs/data-format.md``), in file order."""
    path = Path(path)
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for line, record in _iter_records(path, CATALOG_FIELDS):
        item_id = _required_id(path, line, record, "item_id")
        if item_id in first_line:
            raise DataError(
                path,
                f"duplicate item_id {item_id!r} (first on line {first_line[item_id]})",
                line,
                "item_id",
            )
        first_line[item_id] = line
        title = record.get("title")
        if _is_missing(title):
            raise DataError(path, "missing value", line, "title")
        if not isinstance(title, str):
            raise DataError(path, f"must be a string: {title!r}", line, "title")
        items.append(
            Item(
                item_id=item_id,
                title=" ".join(title.split()),
                year=_parse_year(path, line, record.get("year")),
                genres=_parse_genres(path, line, record.get("genres")),
            )
        )
    return Catalog(items)


def load_generic(interactions_path: Path, catalog_path: Path, name: str | None = None) -> Dataset:
    """Load a user's own data in the generic format (``docs/data-format.md``).

    Raises DataError on the first malformed row, naming file, line and field. The dataset's
    name defaults to the interactions file's stem.
    """
    interactions_path, catalog_path = Path(interactions_path), Path(catalog_path)
    catalog = read_catalog(catalog_path)
    raw: list[tuple[str, str, float, float | None, int]] = []
    path = interactions_path
    for line, record in _iter_records(path, INTERACTION_FIELDS):
        user_id = _required_id(path, line, record, "user_id")
        item_id = _required_id(path, line, record, "item_id")
        timestamp = _parse_timestamp(path, line, record.get("timestamp"))
        rating = _parse_rating(path, line, record.get("rating"))
        if item_id not in catalog:
            raise DataError(
                path, f"unknown item {item_id!r}: not in {catalog_path.name}", line, "item_id"
            )
        raw.append((user_id, item_id, timestamp, rating, line))
    return _build_dataset(name or interactions_path.stem, catalog, raw)


def load_dataset(
    name: str = ML100K, interactions: Path | None = None, catalog: Path | None = None
) -> Dataset:
    """Load ``"ml-100k"`` (no paths) or ``"generic"`` (both paths required)."""
    if name == ML100K:
        if interactions is not None or catalog is not None:
            raise ValueError(
                "ml-100k is read from the recbole wheel: pass no paths, or use "
                "name='generic' for your own files"
            )
        return load_ml100k()
    if name == GENERIC:
        if interactions is None or catalog is None:
            raise ValueError("the generic dataset needs both an interactions and a catalog file")
        return load_generic(interactions, catalog)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """Summary figures for the CLI: users, items, interactions, density, mean history length."""
    users = len(ds.histories)
    items = len(ds.catalog)
    interactions = sum(len(h) for h in ds.histories.values())
    return {
        "name": ds.name,
        "users": users,
        "items": items,
        "interactions": interactions,
        "density": interactions / (users * items) if users and items else 0.0,
        "mean_history_length": interactions / users if users else 0.0,
    }


def dataset_from_config(cfg: AppConfig) -> Dataset:
    """The data set the config names."""
    return load_dataset(cfg.data.name, cfg.data.interactions, cfg.data.catalog)
