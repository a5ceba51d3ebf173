"""`llmrec serve-demo`: the main job ends by serving the federated run's adapters over REST.

A fake "finished federated run" is the conftest store copied to where the demo's config
fingerprint puts the run of method ``ours``; the command then starts the real stack on
loopback, asks as one of its users, prints, revokes its key and stops.
"""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from llmrec.cli import app
from llmrec.evaluate import federated_store_dir
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
    assert "POST /v1/chat/completions: user 1, adapter 1@v1" in out
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
