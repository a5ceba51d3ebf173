"""`llmrec serve-demo`: the main job ends by serving the federated run's adapters over REST.

A fake "finished federated run" is the conftest store copied to where the demo's config
fingerprint puts the run of method ``ours`` (and, for the item-token head, a real federated
run trained there); the command then starts the real stack on loopback, asks as one of its
users, prints, revokes its key and stops.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmrec.cli import app
from llmrec.evaluate import federated_served_base, federated_store_dir
from llmrec_serving.config import load_serving_config
from llmrec_serving.keys import KeyStore

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_world(serving_world):
    """(overrides, keys file) of a config whose federated run ``ours`` is the conftest store."""
    tmp = serving_world.tmp
    overrides = [
        *serving_world.overrides,
        f"eval.federated_dir={tmp / 'eval-federated'}",
        f"serve.keys_file={tmp / 'demo' / 'keys.json'}",
        "serve.explain=true",
    ]
    store_dir = federated_store_dir(load_serving_config(None, overrides), "ours")
    shutil.copytree(serving_world.store.root, store_dir)
    return overrides, tmp / "demo" / "keys.json"


def check(result, keys_file) -> None:
    assert result.exit_code == 0, result.output
    out = result.output
    assert "POST /v1/recommendations: user 1, adapter 1@v1" in out  # a user with their own
    assert "POST /v1/chat/completions: user 1, model llmrec" in out  # the personal agent
    assert "1. " in out and "2. " in out and "3. " in out  # its three picks
    assert out.count("│ m") >= 5  # five ranked catalog items (ids m1..m30), one row each
    assert KeyStore(keys_file).list() == []  # the temporary key is revoked


def test_serve_demo_in_process(demo_world):
    overrides, keys_file = demo_world
    check(runner.invoke(app, ["serve-demo", *overrides, "serve.backend=inprocess"]), keys_file)


def test_serve_demo_needs_a_trained_run(demo_world, tmp_path):
    overrides, _ = demo_world
    result = runner.invoke(
        app, ["serve-demo", *overrides, f"eval.federated_dir={tmp_path}", "serve.backend=inprocess"]
    )
    assert result.exit_code == 1 and "run `llmrec demo` first" in result.output


@pytest.mark.slow
def test_serve_demo_on_vllm(demo_world, vllm_overrides):
    pytest.importorskip("vllm")
    overrides, keys_file = demo_world
    check(runner.invoke(app, ["serve-demo", *overrides, *vllm_overrides]), keys_file)


def test_serve_demo_serves_an_item_token_run_over_its_own_base(serving_world, tmp_path):
    """A real federated run of the item-token head, where `llmrec demo` would have trained
    it: serve-demo serves its users' adapters over the run's own base (federated rows)."""
    overrides = [
        *serving_world.overrides,
        f"eval.federated_dir={tmp_path / 'eval-federated'}",
        f"serve.keys_file={tmp_path / 'keys.json'}",
        "fed.head=items",
        "fed.window=3",
        "fed.n_users=6",
        "fed.clients_per_round=4",
        "fed.rounds=1",
        "fed.local_steps=1",
        "fed.val_users=2",
        "fed.shared_rank=4",
        "fed.personal_rank=2",
        "fed.target_modules=[q_proj, v_proj]",
    ]
    cfg = load_serving_config(None, overrides)
    store_dir = federated_store_dir(cfg, "ours")
    assert federated_served_base(cfg, "ours") is None  # nothing trained yet
    run = [*overrides, f"fed.output_dir={store_dir.parent / 'run'}", f"fed.store_dir={store_dir}"]
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("fed_demo", root / "training" / "federated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run(load_serving_config(None, run))

    base = federated_served_base(cfg, "ours")
    assert base == store_dir.parent / "run" / "base" and (base / "item_vocab.json").is_file()
    export = json.loads((store_dir.parent / "run" / "export.json").read_text())
    user = min(export["users"], key=int)
    result = runner.invoke(app, ["serve-demo", *overrides, "serve.backend=inprocess"])
    assert result.exit_code == 0, result.output
    assert f"user {user}, adapter {export['users'][user]}" in result.output
    assert result.output.count("│ m") >= 5
