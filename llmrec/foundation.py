"""Training the recommendation foundation model: item-token rows + one LoRA, on full histories.

Every position of every training history is a next-item target, causal, as SASRec trains:
a history is cut into windows of ``llm.window`` items (each window's first item is context
only, except in the oldest one), one sequence per window, and the loss at each position is
the cross-entropy of the next item over the catalog's item tokens (a softmax over items
only, the distribution ranking reads). The trainable weights are the LoRA and the item
rows; the rest of the base stays frozen. After each epoch every training user's validation
item is ranked against the whole catalog; the epoch with the best NDCG@k is kept, and the
test item is never looked at here.

The result is a foundation-model version: the extended base with the trained item rows
(an HF folder every engine loads) and a plain PEFT LoRA over it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from llmrec.adapters import LoraWeights, lora_delta
from llmrec.atomic import write_dir_atomic, write_json_atomic
from llmrec.config import AppConfig, LLMConfig
from llmrec.data import Catalog, Dataset, Split, user_sort_key
from llmrec.finetune import ADAPTER_DIR, IGNORE_INDEX, collate, peft_lora_config
from llmrec.model.fingerprint import fingerprint_model_dir
from llmrec.model.item_vocab import ItemVocab, history_reading, save_item_base
from llmrec.plots import plot_curve
from llmrec.prompts import PromptBuilder
from llmrec.recommend.item_scorer import ItemScorer
from llmrec.recommend.metrics import ranking_metrics

log = logging.getLogger(__name__)

BASE_DIR = "base"
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class HistorySequence:
    """One training window: token ids, and the item index each position must predict."""

    input_ids: list[int]
    labels: list[int]
    """Per position, the catalog index of the next item, or ``IGNORE_INDEX``."""


def history_windows(n: int, window: int) -> list[tuple[int, int, bool]]:
    """(start, stop, first_is_target) windows of ``window`` targets covering ``n`` items.

    Windows run from the most recent backwards, each reaching one item into the one before it
    as context; only the oldest window has its first item as a target (predicted from the
    request alone). Every item is a target exactly once.
    """
    out = []
    stop = n
    while stop > 0:
        start = max(0, stop - window - 1)
        out.append((start, stop, start == 0))
        stop = start + 1 if start > 0 else 0
    return out[::-1]


def history_sequences(
    histories: Mapping[str, Sequence[str]],
    catalog: Catalog,
    vocab: ItemVocab,
    prompts: PromptBuilder,
    render: str,
    window: int,
) -> list[HistorySequence]:
    """Every training window of every history, each position labelled with its next item."""
    out = []
    for user_id in histories:
        items = [i for i in histories[user_id] if i in catalog]
        for start, stop, first_is_target in history_windows(len(items), window):
            chunk = items[start:stop]
            ids, ends = prompts.item_sequence(
                [vocab.token_id(i) for i in chunk], catalog.displays(chunk), render
            )
            labels = [IGNORE_INDEX] * len(ids)
            for j, item_id in enumerate(chunk):
                if j or first_is_target:
                    labels[ends[j]] = vocab.index(item_id)
            out.append(HistorySequence(ids, labels))
    return out


class ItemLM(torch.nn.Module):
    """A peft-wrapped extended base whose item rows are a separate trainable fp32 parameter.

    The rows act as both the input embedding of item tokens and the output head over items
    (tied, as in the base); everything else of the base embedding stays frozen.
    """

    def __init__(self, peft_model: torch.nn.Module, vocab: ItemVocab) -> None:
        super().__init__()
        self.vocab = vocab
        self.peft_model = peft_model
        self.decoder = peft_model.get_base_model().get_decoder()
        self.first = vocab.first_token_id
        self.n_items = len(vocab)
        weight = self.decoder.get_input_embeddings().weight
        self.item_rows = torch.nn.Parameter(
            weight[self.first : self.first + self.n_items].detach().float().clone()
        )

    def item_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: torch.Tensor):
        """Logits over the items (n, n_items) at the positions ``at`` (a boolean mask)."""
        embed = self.decoder.get_input_embeddings()
        is_item = input_ids >= self.first
        x = embed(input_ids.masked_fill(is_item, 0))
        rows = self.item_rows[(input_ids - self.first).clamp(0, self.n_items - 1)]
        x = torch.where(is_item.unsqueeze(-1), rows.to(x.dtype), x)
        hidden = self.decoder(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        return hidden[at].float() @ self.item_rows.T

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the item tokens of a collated batch
        (``llmrec.finetune.collate``) whose ``labels`` hold, per position, the catalog index
        of the item to predict there."""
        at = batch["labels"] != IGNORE_INDEX
        logits = self.item_logits(batch["input_ids"], batch["attention_mask"], at)
        return torch.nn.functional.cross_entropy(logits, batch["labels"][at])

    @torch.no_grad()
    def write_rows(self) -> None:
        """Copy the trained rows into the base embedding (and so the tied output head)."""
        weight = self.decoder.get_input_embeddings().weight
        weight[self.first : self.first + self.n_items] = self.item_rows.to(weight.dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def _batches(
    seqs: list[HistorySequence], batch_size: int, rng: random.Random
) -> list[list[HistorySequence]]:
    """Batches of similar length (little padding), in random order."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].input_ids), rng.random()))
    batches = [
        [seqs[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)
    ]
    rng.shuffle(batches)
    return batches


@dataclass
class TrainResult:
    """The kept epoch and the curves that chose it."""

    best_epoch: int
    best_valid: dict[str, float]
    train_loss: list[float] = field(default_factory=list)
    valid: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def validation_metrics(
    scorer: ItemScorer,
    train: Mapping[str, Sequence[str]],
    valid: Mapping[str, str],
    k: int,
) -> dict[str, float]:
    """HR@k / NDCG@k of the validation items, each user's training history as input."""
    users = [u for u in valid if train.get(u)]
    ranked = scorer.rank([train[u] for u in users], k)
    hr, ndcg = ranking_metrics(
        [[r.item_id for r in row] for row in ranked], [valid[u] for u in users], k
    )
    return {f"HR@{k}": float(hr.mean()), f"NDCG@{k}": float(ndcg.mean())}


def train_item_model(
    model: torch.nn.Module,
    vocab: ItemVocab,
    catalog: Catalog,
    prompts: PromptBuilder,
    train: Mapping[str, Sequence[str]],
    valid: Mapping[str, str],
    cfg: LLMConfig,
    k: int = 10,
    on_best: Callable[[torch.nn.Module, torch.Tensor, TrainResult], None] | None = None,
) -> tuple[torch.nn.Module, torch.Tensor, TrainResult]:
    """Train the LoRA and the item rows on every window of ``train``; keep the best epoch.

    Returns the peft model with the kept epoch's weights (item rows written into its
    embedding), the kept item rows in float32, and the curves. Stops early after
    ``cfg.patience`` epochs without a better validation NDCG@k. ``on_best(model, rows,
    result)`` runs after every epoch that improves it (a checkpoint: a run stopped later keeps
    its best epoch so far).
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    seqs = history_sequences(train, catalog, vocab, prompts, cfg.render, cfg.window)
    if not seqs:
        raise ValueError("no training sequences: every history is empty")
    peft_model = get_peft_model(model, peft_lora_config(cfg.lora))
    net = ItemLM(peft_model, vocab)
    lora_params = [p for n, p in net.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": cfg.learning_rate},
            {"params": [net.item_rows], "lr": cfg.item_learning_rate},
        ],
        weight_decay=cfg.weight_decay,
    )
    scorer = ItemScorer(peft_model, vocab, catalog, prompts, cfg.render, cfg.window)
    pad_id = prompts.tokenizer.pad_token_id
    result = TrainResult(best_epoch=0, best_valid={})
    best_state, best, since_best = None, -1.0, 0
    n_targets = sum(sum(label != IGNORE_INDEX for label in s.labels) for s in seqs)
    log.info(
        "llm: %d sequences, %d targets, render=%s, window=%d",
        len(seqs),
        n_targets,
        cfg.render,
        cfg.window,
    )
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        total, count = 0.0, 0
        batches = _batches(seqs, cfg.batch_size, rng)
        for batch in tqdm(batches, desc=f"llm epoch {epoch}", leave=False):
            padded = collate(batch, pad_id)
            loss = net.loss(padded)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n = int((padded["labels"] != IGNORE_INDEX).sum())
            total, count = total + loss.item() * n, count + n
        result.train_loss.append(total / count)
        net.eval()
        net.write_rows()
        metrics = validation_metrics(scorer, train, valid, k)
        result.valid.append(metrics)
        log.info("llm epoch %d: train loss %.4f, valid %s", epoch, result.train_loss[-1], metrics)
        if metrics[f"NDCG@{k}"] > best:
            best, since_best = metrics[f"NDCG@{k}"], 0
            best_state = net.trainable_state()
            result.best_epoch, result.best_valid = epoch, metrics
            if on_best is not None:
                result.seconds = time.perf_counter() - start
                on_best(peft_model, net.item_rows.detach().clone(), result)
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    assert best_state is not None
    net.load_trainable(best_state)
    net.write_rows()
    result.seconds = time.perf_counter() - start
    return peft_model, net.item_rows.detach().clone(), result


def write_item_version(
    base_dir: Path,
    item_rows: torch.Tensor,
    dst: Path,
    fields: dict,
    merge: LoraWeights | None = None,
) -> Path:
    """Write ``dst``: the extended base ``base_dir`` with ``item_rows`` as its item rows (an HF
    folder every engine loads), and ``merge``'s update added to its weights when given,
    atomically; returns ``dst``.

    The base is rebuilt from ``base_dir`` in float32 rather than saved from a training model,
    which may run in bfloat16 and has LoRA layers wrapped around its linear layers.
    """
    from transformers import AutoModelForCausalLM

    from llmrec.model.tokenizer import load_tokenizer

    vocab = ItemVocab.read(base_dir)
    if item_rows.ndim != 2 or item_rows.shape[0] != len(vocab):
        raise ValueError(f"{len(vocab)} item rows expected, got {tuple(item_rows.shape)}")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        first = vocab.first_token_id
        base.get_input_embeddings().weight[first : first + len(vocab)] = item_rows.float()
        for module in merge.modules if merge is not None else ():
            base.get_submodule(module).weight += lora_delta(merge, module)
    base.tie_weights()
    tokenizer = load_tokenizer(str(base_dir))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomic(dst, lambda tmp: save_item_base(base, tokenizer, vocab, tmp, fields))
    return dst


def save_foundation(
    peft_model: torch.nn.Module,
    item_rows: torch.Tensor,
    base_dir: Path,
    result: TrainResult,
    out_dir: Path,
    fields: dict,
) -> None:
    """Write the trained version into ``out_dir``: ``base/`` (the extended base ``base_dir``
    with the trained item rows), ``adapter/`` (the LoRA over it), the curves (JSON, PNG)."""
    write_item_version(base_dir, item_rows, out_dir / BASE_DIR, fields)
    write_dir_atomic(out_dir / ADAPTER_DIR, lambda tmp: peft_model.save_pretrained(tmp))
    write_json_atomic(
        out_dir / CURVES_JSON,
        {
            "best_epoch": result.best_epoch,
            "best_valid": result.best_valid,
            "train_loss": result.train_loss,
            "valid": result.valid,
            "seconds": round(result.seconds, 1),
            **fields,
        },
    )
    ndcg = [v for m in result.valid for key, v in m.items() if key.startswith("NDCG")]
    plot_curve(
        {"train loss": result.train_loss, "valid NDCG x10": [10 * v for v in ndcg]},
        out_dir / CURVES_PNG,
        xlabel="epoch",
        ylabel="value",
        title="Item-token LLM: training loss and validation NDCG",
    )


def train_foundation(cfg: AppConfig, dataset: Dataset, split: Split) -> Path:
    """The whole centralized recipe: the extended base for the catalog, training on the
    (sampled) users' training histories, the kept epoch written to ``cfg.llm.output_dir``."""
    from llmrec.finetune import sample_users
    from llmrec.model import load_model, resolve_model_path
    from llmrec.model.item_vocab import prepare_item_base

    base_dir = prepare_item_base(
        resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir), dataset.catalog
    )
    model, tokenizer = load_model(str(base_dir), dtype=cfg.model.dtype)
    vocab = ItemVocab.read(base_dir)
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    users = sample_users(sorted(split.train, key=user_sort_key), cfg.llm.n_users, cfg.llm.seed)
    train = {u: split.train[u] for u in users}
    valid = {u: split.valid[u] for u in users if u in split.valid}
    fields = {
        "kind": "item-foundation",
        "dataset": dataset.name,
        "users": len(users),
        "llm": cfg.llm.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "item_base_fingerprint": fingerprint_model_dir(base_dir),
    }
    out_dir = Path(cfg.llm.output_dir)

    def save(peft_model: torch.nn.Module, rows: torch.Tensor, result: TrainResult) -> None:
        save_foundation(peft_model, rows, base_dir, result, out_dir, fields)

    peft_model, rows, result = train_item_model(
        model, vocab, dataset.catalog, prompts, train, valid, cfg.llm, cfg.eval.k, save
    )
    save(peft_model, rows, result)  # the final curves, with the epochs after the best
    return out_dir


def load_foundation(run_dir: Path, catalog: Catalog, cfg: AppConfig) -> ItemScorer:
    """The trained version in ``run_dir`` (base + adapter) as a scorer, rendering and window
    as it was trained with."""
    from llmrec.model import attach_adapter, load_model

    render, window = history_reading(run_dir / BASE_DIR)
    model, tokenizer = load_model(str(run_dir / BASE_DIR), dtype=cfg.model.dtype)
    model = attach_adapter(model, run_dir / ADAPTER_DIR).eval()
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    return ItemScorer(model, ItemVocab.read(run_dir / BASE_DIR), catalog, prompts, render, window)
