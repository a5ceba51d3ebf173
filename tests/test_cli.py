"""The `llmrec` command: help, clear errors naming the bad field, and the main job on the real
135M model (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmrec.cli import app

runner = CliRunner()


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("data", "model", "finetune", "recommend", "evaluate", "demo", "config"):
        assert name in result.output


def test_bad_override_names_the_field():
    result = runner.invoke(app, ["config", "show", "lora.r=0"])
    assert result.exit_code == 2
    assert "lora.r" in result.output


def test_config_show_reflects_overrides():
    result = runner.invoke(app, ["config", "show", "eval.n_users=7"])
    assert result.exit_code == 0
    assert "n_users: 7" in result.output


def test_data_stats_on_own_files(tmp_path):
    tiny = Path(__file__).parent / "fixtures" / "tiny"
    args = ["data", "stats", "data.name=generic"]
    ok = runner.invoke(
        app,
        [
            *args,
            f"data.interactions={tiny / 'interactions.csv'}",
            f"data.catalog={tiny / 'catalog.csv'}",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "users" in ok.output
    bad = tmp_path / "interactions.csv"
    bad.write_text("user_id,item_id,timestamp\n1,m1,yesterday\n")
    err = runner.invoke(
        app, [*args, f"data.interactions={bad}", f"data.catalog={tiny / 'catalog.csv'}"]
    )
    assert err.exit_code == 2
    assert "timestamp" in err.output and "line 2" in err.output


def test_data_partition_writes_one_private_folder_per_user(tmp_path):
    from llmrec.config import load_config
    from llmrec.data import dataset_from_config, leave_last_out, load_generic
    from llmrec.federated import federated_cohort

    root = Path(__file__).parent.parent
    tiny = root / "tests" / "fixtures" / "tiny"
    config = root / "training" / "configs" / "tiny.yaml"  # a cohort of fed.n_users=8
    data = [
        f"data.interactions={tiny / 'interactions.csv'}",
        f"data.catalog={tiny / 'catalog.csv'}",
    ]
    parts = tmp_path / "parts"
    cli = ["data", "partition", "-c", str(config)]
    ok = runner.invoke(app, [*cli, str(parts), "-u", "7", "--cohort", *data])
    assert ok.exit_code == 0, ok.output
    cfg = load_config(config, data)
    full = dataset_from_config(cfg)
    cohort = federated_cohort(leave_last_out(full.histories), cfg.fed)
    assert sorted(p.name for p in parts.iterdir()) == sorted({"7", *cohort})
    for folder in parts.iterdir():
        assert folder.stat().st_mode & 0o777 == 0o700
        mine = load_generic(folder / "interactions.jsonl", folder / "catalog.jsonl")
        assert mine.histories == {folder.name: full.histories[folder.name]}
        assert mine.catalog == full.catalog
    assert 'overrides="data.name=generic data.interactions=' in ok.output
    for bad in (["-u", "nobody"], []):  # an unknown user; no user at all
        err = runner.invoke(app, [*cli, str(tmp_path / "none"), *bad, *data])
        assert err.exit_code == 2 and not (tmp_path / "none").exists(), err.output


def test_unknown_user_is_a_clear_error():
    result = runner.invoke(app, ["recommend", "--user", "no-such-user"])
    assert result.exit_code == 2
    assert "no-such-user" in result.output


@pytest.mark.slow
def test_main_job_on_the_real_model(tmp_path):
    """data -> model -> the item-token foundation model + a federated cohort -> evaluation
    table: the demo's pipeline on the default methods, shrunk to a few users (minutes on CPU)."""
    cmd = [
        sys.executable, "-m", "llmrec", "evaluate",
        "model.dtype=bfloat16",
        "llm.n_users=8",
        "llm.epochs=1",
        "fed.n_users=2", "fed.rounds=1", "fed.clients_per_round=2", "fed.local_steps=1",
        "fed.targets_per_user=8", "fed.val_users=1", "recommend.beam_width=10",
        f"eval.results_dir={tmp_path / 'results'}",
        f"eval.federated_dir={tmp_path / 'federated'}",
        f"llm.output_dir={tmp_path / 'llm'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "eval.json").read_text())
    assert set(report["results"]) == {
        "popularity", "itemknn", "sasrec", "llm", "ours"
    }  # fmt: skip
    assert report["users"] == 2  # the federated cohort is every method's user sample
    for row in report["results"].values():
        assert 0.0 <= row["NDCG@10"] <= row["HR@10"] <= 1.0
    for method in ("llm", "ours"):
        assert report["results"][method]["NLL"] > 0 and len(report["test_nll"][method]) == 2
    assert (tmp_path / "results" / "eval.png").stat().st_size > 0
    assert (tmp_path / "llm" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "llm" / "base" / "item_vocab.json").exists()
    assert list((tmp_path / "federated").glob("ours-*/adapters"))
    assert "NDCG@10" in done.stdout
