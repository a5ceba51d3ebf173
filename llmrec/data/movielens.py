"""MovieLens-100K as shipped inside the ``recbole`` wheel.

Read in place, never copied (GroupLens licence). Titles are turned into display form
("Shawshank Redemption, The" -> "The Shawshank Redemption"), the placeholder item is
dropped, and movies listed twice under two ids are merged into one canonical id.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from llmrec.data.titles import fix_title, is_placeholder_title
from llmrec.data.types import (
    Catalog,
    DataError,
    Dataset,
    Item,
    RawRow,
    build_dataset,
    user_sort_key,
)

logger = logging.getLogger(__name__)

ML100K = "ml-100k"
# ML-100K's genre for "no genre": carries no information, so it is dropped.
PLACEHOLDER_GENRE = "unknown"
_TRAILING_YEAR_RE = re.compile(r"^(?P<title>.+?) \((?P<year>\d{4})\)$")


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

    raw: list[RawRow] = []
    unknown = 0
    for line_no, (user_id, item_id, rating, timestamp) in _read_tsv(root / f"{ML100K}.inter", 4):
        target = canonical.get(item_id)
        if target is None:  # the placeholder's (or an unlisted item's) interactions
            unknown += 1
            continue
        raw.append((user_id, target, float(timestamp), float(rating), line_no))
    logger.info("ml-100k: dropped %d interaction(s) with placeholder or unlisted items", unknown)
    return build_dataset(ML100K, Catalog(kept), raw)
