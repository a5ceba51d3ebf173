"""`llmrec personalize`: a local refresh of a user's personal adapter from their current
history, published as a new version; the shared part stays frozen; the queue drains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmrec.adapters import AdapterStore
from llmrec.agent import ProfileStore
from llmrec.cli import app
from llmrec.config import load_config
from llmrec.federated import (
    LOCAL_STATE,
    build_dual_lora,
    client_dir,
    init_shared_state,
    shared_weights,
)
from llmrec.model import fingerprint_model_dir, load_model

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("personalize")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        "model.dtype=float32",
        f"data.interactions={ROOT / 'tests/fixtures/tiny/interactions.csv'}",
        f"data.catalog={ROOT / 'tests/fixtures/tiny/catalog.csv'}",
        f"fed.output_dir={tmp / 'fed'}",
        f"fed.store_dir={tmp / 'adapters'}",
        f"profile.url=sqlite:///{tmp / 'profiles.db'}",
    ]
    cfg = load_config(TINY_YAML, overrides)
    # A shared adapter as federated training publishes it (B moved off zero).
    model, tokenizer = load_model(str(tiny_model_dir))
    dual = build_dual_lora(model, cfg.fed, tokenizer.pad_token_id)
    shared = init_shared_state(dual, seed=0)
    gen = torch.Generator().manual_seed(1)
    shared = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in shared.items()}
    store = AdapterStore(cfg.fed.store_dir)
    store.publish_shared(
        shared_weights(dual, shared),
        base_fingerprint=fingerprint_model_dir(tiny_model_dir),
    )
    return cfg, overrides, store


def personalize(overrides, *args):
    return runner.invoke(app, ["personalize", *args, "-c", str(TINY_YAML), *overrides])


def test_refresh_publishes_a_new_version_with_the_shared_part_frozen(world):
    cfg, overrides, store = world
    result = personalize(overrides, "--user", "1")
    assert result.exit_code == 0, result.output
    assert "1@v1" in result.output
    ref = store.current("1")
    assert ref.version == 1 and ref.manifest.rank == cfg.fed.shared_rank + cfg.fed.personal_rank
    assert "refresh_loss" in ref.manifest.metrics
    stacked, shared = store.load(ref), store.load(store.shared())
    for key, a in shared.state.items():
        if key.endswith("lora_A.weight"):  # the frozen shared A is the first r_s rows
            assert torch.equal(stacked.state[key][: cfg.fed.shared_rank], a)
    state = client_dir(cfg.fed.output_dir, "1") / LOCAL_STATE
    assert state.is_file()
    before = state.stat().st_mtime_ns
    again = personalize(overrides, "--user", "1")
    assert again.exit_code == 0 and store.current("1").version == 2
    assert state.stat().st_mtime_ns > before  # continued from, and replaced, the local state
    b_key = next(k for k in stacked.state if k.endswith("lora_B.weight"))
    assert not torch.equal(store.load(store.current("1")).state[b_key], stacked.state[b_key])


def test_all_queued_drains_the_queue(world, tiny_dataset):
    cfg, overrides, store = world
    profiles = ProfileStore(cfg.profile.url, tiny_dataset.catalog, tiny_dataset.histories)
    new = next(i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories["2"])
    profiles.add_history("2", [new])
    profiles.add_history("newcomer", [new])  # one item: too short to train on
    assert set(profiles.queued()) == {"2", "newcomer"}
    result = personalize(overrides, "--all-queued")
    assert result.exit_code == 1  # the newcomer failed, and says why
    assert "2@v1" in result.output and "at least 2 items" in result.output
    assert profiles.queued() == ["newcomer"] and store.current("2").version == 1


def test_bad_invocations_are_clear(world):
    _, overrides, _ = world
    assert personalize(overrides).exit_code == 2
    assert personalize(overrides, "--user", "1", "--all-queued").exit_code == 2
    bad = personalize(overrides, "--user", "../x")
    assert bad.exit_code == 1 and "invalid user_id" in bad.output
