"""Evaluation bookkeeping: a trained adapter is reused only for the config it was trained with."""

from pathlib import Path

import pytest

from llmrec.config import load_config
from llmrec.data import leave_last_out
from llmrec.evaluate import CENTRALIZED_SECTIONS, centralized_adapter, training_inputs
from llmrec.model import load_base

FIXTURES = Path(__file__).parent / "fixtures" / "tiny"


@pytest.fixture
def cfg_for(tiny_model_dir, tmp_path):
    def make(*overrides: str):
        return load_config(
            None,
            [
                "data.name=generic",
                f"data.interactions={FIXTURES / 'interactions.csv'}",
                f"data.catalog={FIXTURES / 'catalog.csv'}",
                f"model.name_or_path={tiny_model_dir}",
                "model.dtype=float32",
                "prompts.max_history_items=4",
                "lora.r=2",
                "lora.target_modules=[q_proj,v_proj]",
                "finetune.n_users=4",
                "finetune.targets_per_user=2",
                "finetune.batch_size=4",
                f"finetune.output_dir={tmp_path / 'centralized'}",
                *overrides,
            ],
        )

    return make


def test_training_inputs_leave_out_where_outputs_go(cfg_for, tmp_path):
    base = training_inputs(cfg_for(), CENTRALIZED_SECTIONS)
    moved = training_inputs(cfg_for(f"finetune.output_dir={tmp_path / 'x'}"), CENTRALIZED_SECTIONS)
    assert base == moved
    assert base != training_inputs(cfg_for("finetune.learning_rate=0.01"), CENTRALIZED_SECTIONS)
    assert "eval" not in base  # evaluating differently does not retrain


def test_fingerprints_see_the_prompt_templates(cfg_for, tmp_path, monkeypatch):
    """Editing a template the runs render trains anew; the same wording reuses the run."""
    import shutil

    import llmrec.prompts
    from llmrec.evaluate import federated_store_dir
    from llmrec.prompts import DEFAULT_PROMPTS_DIR, RECOMMEND_USER

    prompts_dir = tmp_path / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts_dir)
    monkeypatch.setattr(llmrec.prompts, "DEFAULT_PROMPTS_DIR", prompts_dir)
    cfg = cfg_for()

    def fingerprints():
        return training_inputs(cfg, CENTRALIZED_SECTIONS), federated_store_dir(cfg, "ours")

    before = fingerprints()
    template = prompts_dir / RECOMMEND_USER
    wording = template.read_text()
    template.write_text(wording + "Name one title only.\n")
    edited = fingerprints()
    assert edited[0] != before[0] and edited[1] != before[1]
    template.write_text(wording)
    assert fingerprints() == before


def test_centralized_adapter_is_reused_only_for_the_same_config(cfg_for, tiny_dataset):
    split = leave_last_out(tiny_dataset.histories)

    def adapter(cfg):
        model, tokenizer = load_base(cfg)
        return centralized_adapter(cfg, tiny_dataset, split, model, tokenizer)

    cfg = cfg_for()
    first, reused = adapter(cfg)
    assert not reused and (first / "adapter_model.safetensors").is_file()
    written = (first / "adapter_model.safetensors").stat().st_mtime_ns
    again, reused = adapter(cfg)
    assert reused and again == first
    assert (first / "adapter_model.safetensors").stat().st_mtime_ns == written
    _, reused = adapter(cfg_for("finetune.learning_rate=0.01"))
    assert not reused  # another config: trained anew, not a stale adapter


def test_item_logprob_is_the_beam_search_score(cfg_for, tiny_dataset):
    """The test-item NLL column scores exactly what the ranking scores."""
    from llmrec.recommend import build_recommender

    cfg = cfg_for("recommend.beam_width=40")
    model, tokenizer = load_base(cfg)
    recommender = build_recommender(cfg, tiny_dataset, model, tokenizer)
    history = tiny_dataset.histories[next(iter(tiny_dataset.histories))][:5]
    ranked = recommender.recommend(history, k=5)
    for rec in ranked:
        assert recommender.item_logprob(history, rec.item_id) == pytest.approx(rec.score, abs=1e-4)


def test_users_better_counts_lower_nll():
    from llmrec.evaluate import users_better

    assert users_better({"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 2.0, "b": 2.0, "c": 2.0}) == (
        "1/3 users"
    )


@pytest.mark.parametrize(
    ("n_users", "sample"),
    [(0, "all users with a test item"), (2, "seeded sample of users with a test item")],
)
def test_report_states_its_user_sample(cfg_for, tiny_dataset, tmp_path, n_users, sample):
    from llmrec.evaluate import evaluate

    cfg = cfg_for(
        f"eval.n_users={n_users}", "eval.methods=[popularity]", f"eval.results_dir={tmp_path}"
    )
    report = evaluate(cfg, tiny_dataset)
    everyone = len(leave_last_out(tiny_dataset.histories).test)
    assert report.meta["user_sample"] == sample
    assert report.users == (everyone if n_users == 0 else 2)
