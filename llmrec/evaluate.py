"""The evaluation protocol (docs/design.md), applied to every method side by side.

Leave-last-out split; the test item of each sampled user is ranked against the
whole catalog minus that user's history; HR@k and NDCG@k. Every method sees
the same users, the same split and the same input history (train + validation
items); learned methods are fitted on the training split only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from llmrec.adapters import AdapterStore, SwappableLora, module_shapes_for
from llmrec.atomic import write_json_atomic, write_text_atomic
from llmrec.config import AppConfig
from llmrec.data import Dataset, Split, dataset_from_config, leave_last_out, user_sort_key
from llmrec.federated import EXPORT_JSON, RUN_JSON, adapter_for, exported_base
from llmrec.finetune import ADAPTER_DIR, next_item_examples, sample_users, train_lora
from llmrec.foundation import load_foundation, train_foundation
from llmrec.launch import train_command
from llmrec.model import attach_adapter, load_base, load_model, resolve_model_path
from llmrec.model.item_vocab import ItemVocab, has_item_vocab, history_reading
from llmrec.plots import plot_metric_bars
from llmrec.prompts import PromptBuilder, template_digests
from llmrec.recommend import ItemKNN, Popularity, SASRec, build_recommender, mean_metrics
from llmrec.recommend.item_scorer import ItemScorer

log = logging.getLogger(__name__)

REPORT_JSON = "eval.json"
REPORT_PNG = "eval.png"

Ranker = Callable[[str, Sequence[str], int], list[str]]
"""(user_id, input history, k) -> ranked item ids."""
Scorer = Callable[[str, Sequence[str], str], float]
"""(user_id, input history, item id) -> log-probability of the item (LLM methods)."""

# The three federated methods differ only in the adapter split they train.
FEDERATED = {
    "shared-only": ["fed.personal_rank=0"],  # plain FedAvg: nothing stays personal
    "personal-only": ["fed.shared_rank=0"],  # local training: nothing is federated
    "ours": [],  # shared + personal
}
RUN_DIR = "run"
STORE_DIR = "adapters"
BASE_ALONE = "base"
"""The label of a user served the base alone (``fed.merge_shared``: nothing personal)."""
TRAINED_WITH = "trained_with.json"
# What a trained adapter depends on; a finished run trained with the same is reused.
CENTRALIZED_SECTIONS = ("data", "model", "prompts", "lora", "finetune")
LLM_SECTIONS = ("data", "model", "prompts", "llm")
FEDERATED_SECTIONS = ("data", "model", "prompts", "lora", "recommend", "fed")
NOT_INPUTS = [(s, k) for s in ("finetune", "fed", "llm") for k in ("output_dir", "store_dir")]


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
    test_nll: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per LLM method, each user's negative log-likelihood of their test item."""

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "users": self.users,
            "seed": self.seed,
            "k": self.k,
            "results": self.results,
            "seconds": self.seconds,
            "meta": self.meta,
            "test_nll": self.test_nll,
        }


def rank_users(
    name: str, ranker: Ranker, split: Split, users: Sequence[str], k: int
) -> dict[str, float]:
    """Mean HR@k / NDCG@k of ``ranker`` over ``users``' test items."""
    rankings = []
    for user_id in tqdm(users, desc=f"eval {name}", leave=False):
        rankings.append((ranker(user_id, split.history_for_test(user_id), k), split.test[user_id]))
    return mean_metrics(rankings, k)


def test_nll(scorer: Scorer, split: Split, users: Sequence[str]) -> dict[str, float]:
    """Each user's negative log-likelihood of their test item under ``scorer``.

    Finer than HR@k on a few users: it moves even when the item stays outside the top k,
    so it shows per user whether an adapter fits that user better than another."""
    return {
        u: round(-scorer(u, split.history_for_test(u), split.test[u]), 4)
        for u in tqdm(users, desc="test NLL", leave=False)
    }


def users_better(ours: dict[str, float], other: dict[str, float]) -> str:
    """For how many users ``ours`` gives their test item a lower NLL, as "n/N users"."""
    wins = sum(ours[u] < other[u] for u in ours)
    return f"{wins}/{len(ours)} users"


def _llm_methods(recommender) -> tuple[Ranker, Scorer]:
    return (
        lambda _user, history, k: [r.item_id for r in recommender.recommend(history, k=k)],
        lambda _user, history, item: recommender.item_logprob(history, item),
    )


def _item_methods(scorer: ItemScorer) -> tuple[Ranker, Scorer]:
    """The one-pass ranking, and the item's log-probability over the whole catalog: one
    forward pass per (user, history) serves both (each user has one adapter)."""
    passes: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def log_probs(user: str, history: Sequence[str]) -> torch.Tensor:
        key = (user, tuple(history))
        if key not in passes:
            passes[key] = scorer.log_probs([history])[0]
        return passes[key]

    def rank(user: str, history: Sequence[str], k: int) -> list[str]:
        top = scorer.top_unseen(log_probs(user, history).clone()[None], [history], k)
        return [r.item_id for r in top[0]]

    def score(user: str, history: Sequence[str], item: str) -> float:
        return float(log_probs(user, history)[scorer.vocab.index(item)])

    return rank, score


def _shared_ranker(recommend: Callable[[Sequence[str], int], list[str]]) -> Ranker:
    """A ranker that is the same for every user (the baselines)."""
    return lambda _user, history, k: recommend(history, k)


def evaluate(cfg: AppConfig, dataset: Dataset | None = None) -> EvalReport:
    """Run every method in ``cfg.eval.methods``; write JSON + PNG under cfg.eval.results_dir."""
    dataset = dataset or dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    k = cfg.eval.k
    methods = cfg.eval.methods
    runs = {m: federated_run(cfg, m) for m in methods if m in FEDERATED}
    if runs:
        users = _cohort(runs)
    else:
        users = sample_users(sorted(split.test, key=user_sort_key), cfg.eval.n_users, cfg.eval.seed)
    report = EvalReport(dataset.name, len(users), cfg.eval.seed, k)
    report.meta = {
        "model": cfg.model.name_or_path,
        "quantization": cfg.model.quantization,
        "dtype": cfg.model.dtype,
        "beam_width": cfg.recommend.beam_width,
        "max_history_items": cfg.prompts.max_history_items,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "user_sample": (
            "federated cohort"
            if runs
            else "all users with a test item"
            if len(users) == len(split.test)
            else "seeded sample of users with a test item"
        ),
    }

    def run(name: str, make_ranker: Callable[[], Ranker | tuple[Ranker, Scorer]]) -> None:
        start = time.perf_counter()
        made = make_ranker()
        ranker, scorer = made if isinstance(made, tuple) else (made, None)
        report.results[name] = rank_users(name, ranker, split, users, k)
        if scorer is not None:
            report.test_nll[name] = test_nll(scorer, split, users)
            values = report.test_nll[name].values()
            report.results[name]["NLL"] = round(sum(values) / len(values), 4)
        report.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("%s: %s", name, report.results[name])

    if "popularity" in methods:
        run(
            "popularity", lambda: _shared_ranker(Popularity(dataset.catalog, split.train).recommend)
        )
    if "itemknn" in methods:
        run("itemknn", lambda: _shared_ranker(ItemKNN(dataset.catalog, split.train).recommend))
    if "sasrec" in methods:
        run("sasrec", lambda: _shared_ranker(SASRec(dataset.catalog, split.train).recommend))
    if "zero-shot" in methods or "centralized" in methods:
        model, tokenizer = load_base(cfg)
        if "zero-shot" in methods:
            base = build_recommender(cfg, dataset, model, tokenizer)
            run("zero-shot", lambda: _llm_methods(base))
        if "centralized" in methods:
            start = time.perf_counter()
            adapter_dir, reused = centralized_adapter(cfg, dataset, split, model, tokenizer)
            if not reused:
                report.seconds["centralized-train"] = round(time.perf_counter() - start, 1)
                model, tokenizer = load_base(cfg)  # a fresh base: training wrapped the old one
            tuned = attach_adapter(model, adapter_dir)
            run(
                "centralized",
                lambda: _llm_methods(build_recommender(cfg, dataset, tuned, tokenizer)),
            )
            report.meta["centralized_adapter"] = str(adapter_dir)
    if "llm" in methods:
        start = time.perf_counter()
        run_dir, reused = llm_foundation(cfg, dataset, split)
        if not reused:
            report.seconds["llm-train"] = round(time.perf_counter() - start, 1)
        run("llm", lambda: _item_methods(load_foundation(run_dir, dataset.catalog, cfg)))
        report.meta["llm_run"] = str(run_dir)
    for method, run_dir in runs.items():
        run(method, lambda run_dir=run_dir: _store_methods(cfg, dataset, run_dir, users))
        report.meta[f"{method}_run"] = str(run_dir)
    for other in ("shared-only", "personal-only"):
        if "ours" in report.test_nll and other in report.test_nll:
            report.meta[f"ours_beats_{other}"] = users_better(
                report.test_nll["ours"], report.test_nll[other]
            )
    write_report(report, Path(cfg.eval.results_dir))
    return report


def training_inputs(cfg: AppConfig, sections: Sequence[str]) -> dict:
    """What a training run depends on: the config sections, minus where its outputs go,
    plus the content of the prompt templates it renders (``prompt_templates``)."""
    dumped = json.loads(cfg.model_dump_json(include=set(sections)))
    # Flower's settings shape only training/flower runs, never the accelerate runner's.
    for section, key in (*NOT_INPUTS, ("fed", "flower")):
        dumped.get(section, {}).pop(key, None)
    dumped["prompt_templates"] = template_digests()
    return dumped


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def reuse_or_train(out_dir: Path, inputs: dict, train: Callable[[], object], what: str) -> bool:
    """Run ``train`` unless ``out_dir`` records (``trained_with.json``) that it was trained
    with ``inputs``; then record them. Returns True when the earlier training was reused."""
    marker = out_dir / TRAINED_WITH
    if marker.is_file() and json.loads(marker.read_text()) == inputs:
        log.info("%s: reusing what was trained with this config in %s", what, out_dir)
        return True
    train()
    write_json_atomic(marker, inputs, sort_keys=True)
    return False


def centralized_adapter(
    cfg: AppConfig, dataset: Dataset, split: Split, model, tokenizer
) -> tuple[Path, bool]:
    """The centralized adapter for ``cfg``: reused when ``finetune.output_dir`` holds one
    trained with the same inputs, else trained now. Returns (adapter dir, reused)."""
    out_dir = Path(cfg.finetune.output_dir)
    reused = reuse_or_train(
        out_dir,
        training_inputs(cfg, CENTRALIZED_SECTIONS),
        lambda: train_centralized(cfg, dataset, split, model, tokenizer),
        "centralized",
    )
    return out_dir / ADAPTER_DIR, reused


def llm_foundation(cfg: AppConfig, dataset: Dataset, split: Split) -> tuple[Path, bool]:
    """The trained foundation model for ``cfg``: reused when ``llm.output_dir`` holds one
    trained with the same inputs, else trained now. Returns (its folder, reused)."""
    out_dir = Path(cfg.llm.output_dir)
    reused = reuse_or_train(
        out_dir,
        training_inputs(cfg, LLM_SECTIONS),
        lambda: train_foundation(cfg, dataset, split),
        "llm",
    )
    return out_dir, reused


def train_centralized(cfg: AppConfig, dataset: Dataset, split: Split, model, tokenizer) -> Path:
    """Fine-tune one LoRA on the training split of a seeded user sample."""
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    users = sample_users(
        sorted(split.train, key=user_sort_key), cfg.finetune.n_users, cfg.finetune.seed
    )
    examples = next_item_examples(
        {u: split.train[u] for u in users},
        dataset.catalog,
        prompts,
        per_user=cfg.finetune.targets_per_user,
        per_example=cfg.finetune.targets_per_example,
    )
    log.info(
        "centralized LoRA: %d sequences, %d targets from %d users",
        len(examples),
        sum(e.targets for e in examples),
        len(users),
    )
    # Autocast to the base's dtype so the fp32 LoRA matmuls run at bf16 speed too.
    mixed = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "no"
    return train_lora(model, tokenizer, examples, cfg.lora, cfg.finetune, mixed_precision=mixed)


def federated_store_dir(cfg: AppConfig, method: str) -> Path:
    """The adapter store of ``method``'s federated run for ``cfg`` (trained or not): what
    ``llmrec serve-demo`` serves after ``llmrec demo``. Its folder is named by the
    fingerprint of the run's training inputs, as :func:`federated_run` trains it."""
    inputs = training_inputs(cfg, FEDERATED_SECTIONS)
    return Path(cfg.eval.federated_dir) / f"{method}-{_fingerprint(inputs)}" / STORE_DIR


def federated_served_base(cfg: AppConfig, method: str) -> Path | None:
    """The base ``method``'s finished run published its adapters for (an item-token run's
    served base), or None before the run or for a run that served the configured base."""
    base = exported_base(federated_store_dir(cfg, method).parent / RUN_DIR)
    return Path(base) if base else None


def federated_run(cfg: AppConfig, method: str) -> Path:
    """The finished federated run behind ``method``: trained now unless one exists already.

    Runs `accelerate launch training/federated.py` in a child process (as `llmrec train`
    does) with this config plus the method's adapter split; interrupted runs resume. Each
    run's folder is named by the fingerprint of what it was trained with, so a changed
    config trains anew instead of reusing a stale run (and deletes nothing).
    """
    store_dir = federated_store_dir(cfg, method)
    folder = store_dir.parent
    run_dir = folder / RUN_DIR
    if (run_dir / EXPORT_JSON).is_file():
        log.info("%s: reusing the finished run in %s", method, run_dir)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    dumped = yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    write_text_atomic(config_path, dumped)
    overrides = FEDERATED[method] + [
        f"fed.output_dir={run_dir}",
        f"fed.store_dir={store_dir}",
    ]
    cmd = train_command(
        config_path, overrides, resume=run_dir.is_dir(), cuda=torch.cuda.is_available()
    )
    log.info("%s: federated training in %s", method, run_dir)
    subprocess.run(cmd, check=True)
    return folder


def _cohort(runs: dict[str, Path]) -> list[str]:
    """The users every federated run trained on (they must agree to share a table)."""
    cohorts = {
        m: json.loads((d / RUN_DIR / RUN_JSON).read_text())["cohort"] for m, d in runs.items()
    }
    first = next(iter(cohorts.values()))
    if any(c != first for c in cohorts.values()):
        raise ValueError(f"federated runs trained different cohorts: {sorted(cohorts)}")
    return first


def _store_methods(
    cfg: AppConfig, dataset: Dataset, folder: Path, users: Sequence[str]
) -> tuple[Ranker, Scorer]:
    """Each user ranked with the adapter the store would serve them (own, else shared, else
    none: a merged export's users with nothing personal), over the base the run published
    them for (an item-token run's served base)."""
    base_path = exported_base(folder / RUN_DIR) or resolve_model_path(
        cfg.model.name_or_path, cfg.model.cache_dir
    )
    store = AdapterStore(folder / STORE_DIR, module_shapes=module_shapes_for(base_path))
    refs = {u: adapter_for(store, u) for u in users}
    weights = {ref.adapter_name: store.load(ref) for ref in refs.values() if ref is not None}
    model, tokenizer = load_model(
        base_path, quantization=cfg.model.quantization, dtype=cfg.model.dtype
    )
    lora = None  # a merged export may serve every user the base alone
    if weights:
        first = next(iter(weights.values()))
        zeros = {k: torch.zeros_like(v) for k, v in first.state.items()}
        weights[BASE_ALONE] = replace(first, state=zeros)  # a user served the base alone
        lora = SwappableLora(model, max(w.r for w in weights.values()), first.target_modules)
        model = lora.model
    if has_item_vocab(base_path):
        render, window = history_reading(base_path)
        prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
        vocab = ItemVocab.read(base_path)
        scorer = ItemScorer(model, vocab, dataset.catalog, prompts, render, window)
        ranks, scores = _item_methods(scorer)
    else:
        ranks, scores = _llm_methods(build_recommender(cfg, dataset, model, tokenizer))

    def use(user_id: str) -> None:
        ref = refs[user_id]
        name = ref.adapter_name if ref is not None else BASE_ALONE
        if lora is not None:
            lora.use(weights[name], name)

    def rank(user_id: str, history: Sequence[str], k: int) -> list[str]:
        use(user_id)
        return ranks(user_id, history, k)

    def score(user_id: str, history: Sequence[str], item_id: str) -> float:
        use(user_id)
        return scores(user_id, history, item_id)

    return rank, score


def write_report(report: EvalReport, results_dir: Path) -> tuple[Path, Path]:
    """The report as JSON and as a grouped bar chart."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / REPORT_JSON
    write_json_atomic(json_path, report.to_json())
    metrics = [f"HR@{report.k}", f"NDCG@{report.k}"]
    png_path = plot_metric_bars(
        report.results,
        metrics,
        results_dir / REPORT_PNG,
        title=f"{report.dataset}, {report.users} users (seed {report.seed}), full ranking",
    )
    return json_path, png_path
