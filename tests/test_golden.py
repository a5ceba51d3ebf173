"""Golden values: exact figures of the tiny model on the tiny data, pinned before any refactor.

A change that moves code must leave every one of them unchanged; a change that means to move
one says so in its commit and updates the figure here. Everything runs in float32 on one
thread, so that the figures do not depend on the CPU's bf16 support or on the thread count.
Set ``LLMREC_GOLDEN_PRINT=1`` to print the figures a run computes (to update them on purpose).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from llmrec.adapters import LoraWeights, module_shapes_for, stack, write_adapter
from llmrec.config import FinetuneConfig, LoraConfig, load_config
from llmrec.data import leave_last_out
from llmrec.finetune import next_item_examples, train_lora
from llmrec.model import attach_adapter, load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Recommender

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pin(name: str, got, expected) -> None:
    if os.environ.get("LLMREC_GOLDEN_PRINT"):
        print(f"\nGOLDEN {name} = {got!r}")
    torch.testing.assert_close(got, expected, **TOL)


def test_tiny_yaml_federated_run(tiny_model_dir, tmp_path):
    """``training/configs/tiny.yaml`` as shipped: per-round train loss and validation."""
    out = tmp_path / "fed"
    cfg = load_config(
        TINY_YAML,
        [
            f"model.name_or_path={tiny_model_dir}",
            "model.dtype=float32",
            f"fed.output_dir={out}",
            f"fed.store_dir={out / 'adapters'}",
        ],
    )
    spec = importlib.util.spec_from_file_location("golden_fed", ROOT / "training" / "federated.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rounds = runner.run(cfg)["rounds"]
    got = {
        "train_loss": [r["train_loss"] for r in rounds],
        "val_HR@10": [r["val_HR@10"] for r in rounds],
        "val_NDCG@10": [r["val_NDCG@10"] for r in rounds],
    }
    _pin("tiny_yaml", got, GOLDEN_TINY_YAML)


def test_centralized_loss_curve(tiny_model_dir, tiny_dataset, tmp_path):
    """Four steps of the centralized LoRA, seed 0: the loss of every step."""
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PromptBuilder(tokenizer, max_history_items=4, max_prompt_tokens=200)
    split = leave_last_out(tiny_dataset.histories)
    examples = next_item_examples(split.train, tiny_dataset.catalog, prompts, per_user=2)
    cfg = FinetuneConfig(epochs=1, batch_size=4, learning_rate=5e-3, output_dir=tmp_path)
    train_lora(model, tokenizer, examples[:16], LoraConfig(r=4, alpha=8), cfg)  # 4 steps
    lines = (tmp_path / "loss.jsonl").read_text().splitlines()
    _pin("centralized_loss", [json.loads(line)["loss"] for line in lines], GOLDEN_CENTRAL_LOSS)


def test_one_ranking_with_scores(tiny_model_dir, tiny_dataset):
    """The base tiny model's top 5 for the first user: items and log-probabilities."""
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    rec = Recommender(model, tokenizer, tiny_dataset.catalog, prompts, beam_width=8)
    split = leave_last_out(tiny_dataset.histories)
    user = sorted(split.train, key=int)[0]
    ranked = rec.recommend(split.train[user], k=5)
    assert [r.item_id for r in ranked] == GOLDEN_RANKING_ITEMS
    _pin("ranking_scores", [r.score for r in ranked], GOLDEN_RANKING_SCORES)


def test_stacked_adapter_logit(tiny_model_dir, tmp_path):
    """Shared (r 4) + personal (r 2) stacked into one PEFT LoRA: the last position's logits."""
    shapes = module_shapes_for(tiny_model_dir)
    base = str(tiny_model_dir)
    targets = ("q_proj", "v_proj")
    shared = LoraWeights.random(shapes, targets, 4, seed=1, base_model=base)
    personal = LoraWeights.random(shapes, targets, 2, seed=2, base_model=base)
    stacked = stack(shared, personal)
    write_adapter(stacked, tmp_path / "stacked")
    model, tokenizer = load_model(base)
    model = attach_adapter(model, tmp_path / "stacked")
    ids = torch.tensor([tokenizer.encode("Toy Story (1995)\nHeat (1995)\n")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    got = {"first": logits[:4].tolist(), "max": float(logits.max()), "argmax": int(logits.argmax())}
    _pin("stacked_logit", got, GOLDEN_STACKED_LOGIT)


GOLDEN_TINY_YAML = {
    "train_loss": [10.693212389945984, 10.476395726203918, 10.421290636062622],
    "val_HR@10": [0.5, 0.75, 0.5],
    "val_NDCG@10": [0.375, 0.4077324383928644, 0.31546487678572877],
}
GOLDEN_CENTRAL_LOSS = [10.7620267868042, 10.613332748413086, 10.505206108093262, 10.503939628601074]
GOLDEN_RANKING_ITEMS = ["m3", "m8", "m14", "m6", "m27"]
GOLDEN_RANKING_SCORES = [
    -95.24722862243652,
    -95.46243476867676,
    -95.52361965179443,
    -96.75706958770752,
    -106.16420650482178,
]
GOLDEN_STACKED_LOGIT = {
    "first": [0.0, -0.14339393377304077, 0.2627207338809967, 0.26537075638771057],
    "max": 1.0873583555221558,
    "argmax": 17787,
}
