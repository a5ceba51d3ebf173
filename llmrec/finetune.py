"""Centralized LoRA fine-tuning on the training split: the non-private upper bound.

One adapter for everybody, trained with peft on next-item examples from all
users' training histories, through accelerate (the same code runs one CPU
process or several GPUs). The loss is on the answer tokens only, exactly the
tokens the trie decoder scores, so training and ranking agree; one sequence scores
several consecutive items of a history.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tqdm.auto import tqdm

from llmrec.config import FinetuneConfig, LoraConfig
from llmrec.data import Catalog
from llmrec.plots import plot_curve
from llmrec.prompts import PromptBuilder

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """Token ids of one prompt + answer, with labels masking all but the target titles."""

    input_ids: list[int]
    labels: list[int]
    targets: int = 1
    """Next-item targets it scores: the weight of this example's user in aggregation."""
    holdout: bool = False
    """Held out of federated training: a client's own validation data."""


def next_item_examples(
    histories: Mapping[str, Sequence[str]],
    catalog: Catalog,
    prompts: PromptBuilder,
    per_user: int,
    per_example: int = 1,
    min_context: int = 1,
) -> list[Example]:
    """Next-item examples for the last ``per_user`` positions of each history.

    Consecutive positions share one sequence, ``per_example`` of them at a time: the prompt
    lists the items before the first, then each target title follows the ones before it,
    and only the titles (with their newline) carry a loss. One forward pass thus trains
    ``per_example`` "items before t -> item t" predictions, the same tokens
    ``recommend_prompt_ids(items[:t]) + target_ids(items[t])`` that decoding sees, except
    that later targets see more than ``max_history_items`` items before them.
    """
    if per_example < 1:
        raise ValueError("per_example must be at least 1")
    examples = []
    for user_id in histories:
        titles = [catalog.display(i) for i in histories[user_id]]
        first = max(min_context, len(titles) - per_user)
        for start in range(first, len(titles), per_example):
            stop = min(start + per_example, len(titles))
            ids = prompts.recommend_prompt_ids(titles[:start])
            labels = [IGNORE_INDEX] * len(ids)
            for t in range(start, stop):
                if t > start:  # the bullet opening the next line is not a prediction
                    ids += prompts.bullet_ids
                    labels += [IGNORE_INDEX] * len(prompts.bullet_ids)
                target = prompts.target_ids(titles[t])
                ids += target
                labels += target
            examples.append(Example(ids, labels, stop - start))
    return examples


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of anything with ``input_ids`` and ``labels`` (an ``Example``, the
    item-token ``HistorySequence``); padded positions get no attention and no loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_nll_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """Summed NLL of one unpadded sequence's labeled tokens, and how many there are.

    The vocabulary projection runs only at the positions that predict a label
    (``logits_to_keep``): the full logits are a vocabulary's worth of floats at every
    position, and the prompt positions carry no loss.
    """
    positions = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)
    logits = model(input_ids=input_ids[None], logits_to_keep=positions).logits[0]
    nll = torch.nn.functional.cross_entropy(logits.float(), labels[positions + 1], reduction="sum")
    return nll, len(positions)


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    """The peft config for our LoRA shape (plain LoRA: no bias, no DoRA, servable by vLLM)."""
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    lora: LoraConfig,
    cfg: FinetuneConfig,
    mixed_precision: str = "no",
) -> Path:
    """Train one LoRA on ``examples``; writes adapter, loss log and loss plot to output_dir."""
    if not examples:
        raise ValueError("no training examples: every history is too short")
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    peft_model = get_peft_model(model, peft_lora_config(lora))
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=cfg.learning_rate
    )
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=cfg.batch_size,
        shuffle=True,
        # One sequence at a time through the model: no padding to pay for, and peak memory
        # is one sequence's activations; gradients add up to the batch's mean token loss.
        collate_fn=lambda b: [(torch.tensor(e.input_ids), torch.tensor(e.labels)) for e in b],
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * (1 - step / total)
    )
    peft_model, optimizer, loader, scheduler = accelerator.prepare(
        peft_model, optimizer, loader, scheduler
    )
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    peft_model.train()
    bar = tqdm(total=total, desc="centralized LoRA", disable=not accelerator.is_main_process)
    with open(out_dir / LOSS_LOG, "w") as loss_log:
        for epoch in range(cfg.epochs):
            for batch in loader:
                n_tokens = sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in batch)
                nll_sum = 0.0
                for input_ids, labels in batch:
                    nll, _ = answer_nll_sum(peft_model, input_ids, labels)
                    accelerator.backward(nll / n_tokens)
                    nll_sum += nll.item()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                loss = torch.tensor(nll_sum / n_tokens, device=accelerator.device)
                losses.append(accelerator.gather(loss).mean().item())
                loss_log.write(
                    json.dumps({"step": len(losses), "epoch": epoch, "loss": losses[-1]}) + "\n"
                )
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    adapter_dir = out_dir / ADAPTER_DIR
    if accelerator.is_main_process:
        accelerator.unwrap_model(peft_model).save_pretrained(adapter_dir)
        plot_curve(
            {"train loss": losses},
            out_dir / LOSS_PLOT,
            xlabel="step",
            ylabel="loss",
            title="Centralized LoRA: training loss",
        )
    accelerator.wait_for_everyone()
    return adapter_dir


def sample_users(users: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` users in their original order (all when n is 0 or too big)."""
    users = list(users)
    if n <= 0 or n >= len(users):
        return users
    chosen = set(random.Random(seed).sample(users, n))
    return [u for u in users if u in chosen]
