"""The shapes every data source produces: catalog, events, histories, and the split.

Sources (`llmrec.data.movielens`, `llmrec.data.generic`) turn their files into rows and
hand them to :func:`build_dataset`, which applies the ordering rules every source shares: a
user's events are sorted by (timestamp, file line) so ties keep file order, and a repeated
(user, item) keeps only its earliest event, so a history never holds an item twice (which
keeps the split leak-free).

This package knows nothing about prompts, tokenizers or models. It caches nothing on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

RawRow = tuple[str, str, float, float | None, int]
"""One interaction as a source read it: (user_id, item_id, timestamp, rating, file line)."""


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

    @property
    def genres(self) -> list[str]:
        """Every genre some item has, sorted."""
        return sorted({g for item in self._items for g in item.genres})

    def display(self, item_id: str) -> str:
        """Display string of ``item_id``, e.g. ``"The Shawshank Redemption (1994)"``."""
        return self[item_id].display

    def displays(self, item_ids: Iterable[str]) -> list[str]:
        """Display strings of the known ids among ``item_ids``, in order (unknown ids skipped)."""
        return [self[i].display for i in item_ids if i in self]

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


def build_dataset(name: str, catalog: Catalog, raw: Iterable[RawRow]) -> Dataset:
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
