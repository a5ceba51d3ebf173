"""Which data set a name (or a config) means."""

from __future__ import annotations

from pathlib import Path

from llmrec.config import AppConfig
from llmrec.data.generic import GENERIC, load_generic
from llmrec.data.movielens import ML100K, load_ml100k
from llmrec.data.types import Dataset

DATASET_NAMES = (ML100K, GENERIC)


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


def dataset_from_config(cfg: AppConfig) -> Dataset:
    """The data set the config names."""
    return load_dataset(cfg.data.name, cfg.data.interactions, cfg.data.catalog)
