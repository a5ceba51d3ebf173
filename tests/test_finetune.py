"""Centralized LoRA training on the tiny model: it learns, saves a plain PEFT adapter, and the
loss is on the answer tokens only."""

import json

import pytest
import torch

from llmrec.config import FinetuneConfig, LoraConfig
from llmrec.data import leave_last_out
from llmrec.finetune import IGNORE_INDEX, collate, next_item_examples, sample_users, train_lora
from llmrec.model import attach_adapter, load_model
from llmrec.prompts import PromptBuilder


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_dataset):
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PromptBuilder(tokenizer, max_history_items=4, max_prompt_tokens=200)
    split = leave_last_out(tiny_dataset.histories)
    examples = next_item_examples(split.train, tiny_dataset.catalog, prompts, per_user=2)
    return model, tokenizer, prompts, examples


def test_examples_mask_the_prompt(setup, tiny_dataset):
    _, tokenizer, prompts, examples = setup
    first = examples[0]
    n_answer = sum(label != IGNORE_INDEX for label in first.labels)
    answer = [t for t, label in zip(first.input_ids, first.labels, strict=True) if label != -100]
    assert answer[-1:] == prompts.newline_ids
    assert n_answer == len(answer) and n_answer < len(first.input_ids)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # Padding carries neither attention nor loss.
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE_INDEX)).all()


def test_a_sequence_scores_consecutive_targets_as_decoding_sees_them(setup, tiny_dataset):
    """Each target of a sequence sits after exactly the prompt that decoding would build."""
    _, _, prompts, _ = setup
    split = leave_last_out(tiny_dataset.histories)
    user = max(split.train, key=lambda u: len(split.train[u]))
    items = list(split.train[user])
    titles = [tiny_dataset.catalog.display(i) for i in items]
    unbounded = PromptBuilder(prompts.tokenizer, max_history_items=1000, max_prompt_tokens=4000)
    examples = next_item_examples({user: items}, tiny_dataset.catalog, unbounded, 5, 3)
    assert [e.targets for e in examples] == [3, 2]  # the last 5 positions, 3 then 2
    for example, start in zip(examples, (len(items) - 5, len(items) - 2), strict=True):
        for j in range(example.targets):
            t = start + j
            prefix = unbounded.recommend_prompt_ids(titles[:t])
            target = unbounded.target_ids(titles[t])
            assert example.input_ids[: len(prefix) + len(target)] == prefix + target
            assert example.labels[len(prefix) : len(prefix) + len(target)] == target
        labeled = [label for label in example.labels if label != IGNORE_INDEX]
        expected = [tok for t in titles[start : start + example.targets]
                    for tok in unbounded.target_ids(t)]  # fmt: skip
        assert labeled == expected  # bullets and the prompt carry no loss
    # One target per example: the plain "items before t -> item t" pairs.
    singles = next_item_examples({user: items}, tiny_dataset.catalog, unbounded, 5)
    assert [e.targets for e in singles] == [1] * 5
    with pytest.raises(ValueError, match="per_example"):
        next_item_examples({user: items}, tiny_dataset.catalog, unbounded, 5, 0)


def answer_logprob(model, example) -> float:
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(
        logp[pos - 1, tok].item()
        for pos, (tok, label) in enumerate(zip(example.input_ids, example.labels, strict=True))
        if label != IGNORE_INDEX
    )


def test_training_lowers_the_loss_and_saves_an_adapter(setup, tiny_model_dir, tmp_path):
    model, tokenizer, _, examples = setup
    before = answer_logprob(model, examples[0])
    cfg = FinetuneConfig(epochs=4, batch_size=4, learning_rate=5e-3, output_dir=tmp_path)
    adapter = train_lora(model, tokenizer, examples, LoraConfig(r=4, alpha=8), cfg)
    log_lines = (tmp_path / "loss.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log_lines]
    steps_per_epoch = len(losses) // 4
    assert sum(losses[-steps_per_epoch:]) < sum(losses[:steps_per_epoch])
    assert (tmp_path / "loss.png").stat().st_size > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["bias"] == "none"
    assert (adapter / "adapter_model.safetensors").exists()
    # A fresh base is unchanged; with the adapter the trained answer became more likely.
    fresh, _ = load_model(str(tiny_model_dir))
    assert answer_logprob(fresh, examples[0]) == pytest.approx(before, abs=1e-4)
    assert answer_logprob(attach_adapter(fresh, adapter), examples[0]) > before + 0.5


def test_user_sample_is_seeded_and_ordered():
    users = [str(i) for i in range(50)]
    a = sample_users(users, 10, seed=1)
    assert a == sample_users(users, 10, seed=1) and len(a) == 10
    assert a == sorted(a, key=int)
    assert sample_users(users, 0, seed=1) == users


def test_answer_nll_sum_equals_the_full_logits_loss(setup):
    """Projecting only the labeled positions changes nothing but the cost."""
    from llmrec.finetune import answer_nll_sum

    model, tokenizer, _, examples = setup
    model.eval()  # an earlier test may leave LoRA dropout on
    batch = collate(examples[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(**batch).loss.item()  # transformers' mean over every labeled token
        parts = [
            answer_nll_sum(model, torch.tensor(e.input_ids), torch.tensor(e.labels))
            for e in examples[:3]
        ]
    assert sum(nll.item() for nll, _ in parts) / sum(n for _, n in parts) == pytest.approx(
        full, rel=1e-4
    )
