"""Shared fixtures: offline hub, a tiny Llama with the real SmolLM2 tokenizer, the fixture data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama built locally from a config, with the real SmolLM2 tokenizer."""
    from llmrec.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_dataset():
    """The committed synthetic 20-user, 30-item data set."""
    from llmrec.data import load_generic

    return load_generic(FIXTURES / "tiny" / "interactions.csv", FIXTURES / "tiny" / "catalog.csv")
