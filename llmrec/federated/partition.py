"""A device's data: one user's partition of a data set, for a client on its own machine.

:func:`write_partitions` cuts a data set into one folder per user, holding that user's
interactions and the whole (public) catalog in the generic format (``docs/data-format.md``),
and no row of anyone else. A Flower SuperNode started with the partition's
:meth:`Partition.overrides` loads only its own user, and trains exactly what it would on the
full data set: a client's examples and validation item come from its own history alone
(``leave_last_out`` splits each user apart), and the catalog, in the same order, gives the
item tokens and score positions (tested in tests/test_flower.py).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from llmrec.adapters.manifest import validate_user_id
from llmrec.atomic import write_dir_atomic
from llmrec.data import GENERIC, GENERIC_CATALOG, GENERIC_INTERACTIONS, Dataset, write_generic

PARTITION_MODE = 0o700
"""A partition is one person's history: only its owner may enter its folder."""


class Partition(BaseModel):
    """One user's folder: what their device's SuperNode loads."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    interactions: Path
    catalog: Path
    rows: int
    """How many interactions of the user the folder holds (all of them, deduplicated)."""

    def overrides(self) -> str:
        """The SuperNode's node-config ``overrides`` that read this partition as its data."""
        return shlex.join(
            [
                f"data.name={GENERIC}",
                f"data.interactions={self.interactions}",
                f"data.catalog={self.catalog}",
            ]
        )


def write_partitions(dataset: Dataset, users: Sequence[str], out_dir: Path) -> list[Partition]:
    """Write ``out_dir/<user>/`` (mode 0700) for each of ``users``; returns them in order.

    Each folder holds ``interactions.jsonl`` (that user's events only) and ``catalog.jsonl``
    (every item, in catalog order), written whole or not at all; an existing folder of the
    same user is replaced. A user id is the folder name, so it must be a valid adapter-store
    id (the same user publishes there); an unknown or invalid user raises ValueError before
    anything is written.
    """
    unknown = [u for u in users if u not in dataset.histories]
    if unknown:
        raise ValueError(f"users not in data set {dataset.name!r}: {', '.join(unknown)}")
    for user in users:
        validate_user_id(user)
    out_dir = Path(out_dir).resolve()
    partitions = []
    for user in users:
        one = Dataset(
            dataset.name,
            dataset.catalog,
            {user: dataset.histories[user]},
            {user: dataset.events[user]} if dataset.events else {},
        )

        def fill(tmp: Path, one: Dataset = one) -> None:
            os.chmod(tmp, PARTITION_MODE)  # before any row is in it
            write_generic(one, tmp)

        folder = out_dir / user
        write_dir_atomic(folder, fill)
        partitions.append(
            Partition(
                user_id=user,
                interactions=folder / GENERIC_INTERACTIONS,
                catalog=folder / GENERIC_CATALOG,
                rows=len(one.histories[user]),
            )
        )
    return partitions
