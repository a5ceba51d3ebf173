"""A user's own data in the generic CSV/JSONL format of ``docs/data-format.md``.

Every malformed row raises `DataError` naming file, line and field. :func:`write_generic`
writes a loaded `Dataset` back in this format (JSONL), so that loading it gives the same data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmrec.data.types import Catalog, DataError, Dataset, Item, RawRow, build_dataset

GENERIC = "generic"
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp")  # + optional "rating"
CATALOG_FIELDS = ("item_id", "title")  # + optional "year", "genres"
GENERIC_INTERACTIONS = "interactions.jsonl"  # the file names write_generic gives
GENERIC_CATALOG = "catalog.jsonl"


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
    raw: list[RawRow] = []
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
    return build_dataset(name or interactions_path.stem, catalog, raw)


def write_generic(dataset: Dataset, out_dir: Path) -> tuple[Path, Path]:
    """Write ``dataset`` into ``out_dir`` (created if need be) as ``interactions.jsonl`` +
    ``catalog.jsonl``; returns (interactions, catalog).

    The interactions are the dataset's events (deduplicated, each user's oldest first) and
    the catalog is every item in catalog order, so :func:`load_generic` of the two files
    gives the same catalog, histories and events. Raises ValueError for a dataset without
    events, or a catalog that does not read back identically (loading normalises titles
    and genres: an item whose title holds runs of whitespace would come back changed).
    """
    out_dir = Path(out_dir)
    if set(dataset.events) != set(dataset.histories):
        raise ValueError(f"data set {dataset.name!r} has no events to write (histories only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog_path, interactions_path = out_dir / GENERIC_CATALOG, out_dir / GENERIC_INTERACTIONS
    _write_jsonl(
        catalog_path,
        (
            {"item_id": i.item_id, "title": i.title, "year": i.year, "genres": list(i.genres)}
            for i in dataset.catalog
        ),
    )
    back = read_catalog(catalog_path)
    for ours, theirs in zip(dataset.catalog, back, strict=True):
        if ours != theirs:
            raise ValueError(f"item {ours.item_id!r} does not read back as written: {theirs}")
    # Timestamps as float JSON numbers: json writes the shortest repr, which reads back exact.
    _write_jsonl(
        interactions_path,
        (
            {"user_id": user, "item_id": e.item_id, "timestamp": e.timestamp, "rating": e.rating}
            for user, events in dataset.events.items()
            for e in events
        ),
    )
    return interactions_path, catalog_path


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
