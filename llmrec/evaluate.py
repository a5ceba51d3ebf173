"""The evaluation protocol of the design map, applied to every method side by side.

Leave-last-out split; the test item of each sampled user is ranked against the
whole catalog minus that user's history; HR@k and NDCG@k. Every method sees
the same users, the same split and the same input history (train + validation
items); learned methods are fitted on the training split only.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmrec.baselines import ItemKNN, Popularity
from llmrec.config import AppConfig
from llmrec.data import Dataset, Split, leave_last_out
from llmrec.finetune import next_item_examples, sample_users, train_lora
from llmrec.metrics import mean_metrics
from llmrec.plots import plot_metric_bars
from llmrec.prompts import PromptBuilder
from llmrec.runtime import attach_adapter, build_recommender, dataset_from_config, load_base
from llmrec.sasrec import SASRec

log = logging.getLogger(__name__)

REPORT_JSON = "eval.json"
REPORT_PNG = "eval.png"

Ranker = Callable[[Sequence[str], int], list[str]]


@dataclass
class EvalReport:
    """Metrics per method on one stated user sample, plus how they were obtained."""

    dataset: str
    users: int
    seed: int
    k: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "users": self.users,
            "seed": self.seed,
            "k": self.k,
            "results": self.results,
            "seconds": self.seconds,
            "meta": self.meta,
        }


def rank_users(
    name: str, ranker: Ranker, split: Split, users: Sequence[str], k: int
) -> dict[str, float]:
    """Mean HR@k / NDCG@k of ``ranker`` over ``users``' test items."""
    rankings = []
    for user_id in tqdm(users, desc=f"eval {name}", leave=False):
        rankings.append((ranker(split.history_for_test(user_id), k), split.test[user_id]))
    return mean_metrics(rankings, k)


def _llm_ranker(recommender) -> Ranker:
    return lambda history, k: [r.item_id for r in recommender.recommend(history, k=k)]


def evaluate(cfg: AppConfig, dataset: Dataset | None = None) -> EvalReport:
    """Run every method in ``cfg.eval.methods``; write JSON + PNG under cfg.eval.results_dir."""
    dataset = dataset or dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    k = cfg.eval.k
    users = sample_users(sorted(split.test, key=_user_key), cfg.eval.n_users, cfg.eval.seed)
    report = EvalReport(dataset.name, len(users), cfg.eval.seed, k)
    report.meta = {
        "model": cfg.model.name_or_path,
        "quantization": cfg.model.quantization,
        "dtype": cfg.model.dtype,
        "beam_width": cfg.recommend.beam_width,
        "max_history_items": cfg.prompts.max_history_items,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }

    def run(name: str, make_ranker: Callable[[], Ranker]) -> None:
        start = time.perf_counter()
        report.results[name] = rank_users(name, make_ranker(), split, users, k)
        report.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("%s: %s", name, report.results[name])

    methods = cfg.eval.methods
    if "popularity" in methods:
        run("popularity", lambda: Popularity(dataset.catalog, split.train).recommend)
    if "itemknn" in methods:
        run("itemknn", lambda: ItemKNN(dataset.catalog, split.train).recommend)
    if "sasrec" in methods:
        run("sasrec", lambda: SASRec(dataset.catalog, split.train).recommend)
    if "zero-shot" in methods or "centralized" in methods:
        model, tokenizer = load_base(cfg)
        if "zero-shot" in methods:
            run("zero-shot", lambda: _llm_ranker(build_recommender(cfg, dataset, model, tokenizer)))
        if "centralized" in methods:
            start = time.perf_counter()
            adapter_dir = train_centralized(cfg, dataset, split, model, tokenizer)
            report.seconds["centralized-train"] = round(time.perf_counter() - start, 1)
            model, tokenizer = load_base(cfg)  # a fresh base: training wrapped the old one
            tuned = attach_adapter(model, adapter_dir)
            run(
                "centralized",
                lambda: _llm_ranker(build_recommender(cfg, dataset, tuned, tokenizer)),
            )
            report.meta["centralized_adapter"] = str(adapter_dir)
    write_report(report, Path(cfg.eval.results_dir))
    return report


def train_centralized(cfg: AppConfig, dataset: Dataset, split: Split, model, tokenizer) -> Path:
    """Fine-tune one LoRA on the training split of a seeded user sample."""
    prompts = PromptBuilder(
        tokenizer,
        max_history_items=cfg.prompts.max_history_items,
        max_prompt_tokens=cfg.prompts.max_prompt_tokens,
    )
    users = sample_users(
        sorted(split.train, key=_user_key), cfg.finetune.n_users, cfg.finetune.seed
    )
    examples = next_item_examples(
        {u: split.train[u] for u in users}, dataset.catalog, prompts, cfg.finetune.examples_per_user
    )
    log.info("centralized LoRA: %d examples from %d users", len(examples), len(users))
    # Autocast to the base's dtype so the fp32 LoRA matmuls run at bf16 speed too.
    mixed = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "no"
    return train_lora(model, tokenizer, examples, cfg.lora, cfg.finetune, mixed_precision=mixed)


def write_report(report: EvalReport, results_dir: Path) -> tuple[Path, Path]:
    """The report as JSON and as a grouped bar chart."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / REPORT_JSON
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    metrics = [f"HR@{report.k}", f"NDCG@{report.k}"]
    png_path = plot_metric_bars(
        report.results,
        metrics,
        results_dir / REPORT_PNG,
        title=f"{report.dataset}, {report.users} users (seed {report.seed}), full ranking",
    )
    return json_path, png_path


def _user_key(user_id: str) -> tuple[int, str]:
    """Numeric ids in numeric order, others after them alphabetically."""
    return (int(user_id), "") if user_id.isdigit() else (1 << 62, user_id)
