"""The quality protocol (docs/design.md): every method tuned on validation, tested once.

All users with a test item; leave-last-out; each method scores the whole catalog, the user's
history masked. For validation the input is the training history and the target the
validation item; for test the input adds the validation item and the target is the test
item. Every method's settings are chosen on validation NDCG@k over a stated grid (the grid
and its figures go into the report); the chosen configuration alone is scored on test.
Per method: HR@k and NDCG@k with 95% bootstrap intervals over users; against SASRec, a
paired sign-flip test on NDCG@k and an exact McNemar test on HR@k.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import torch

from llmrec.atomic import write_json_atomic
from llmrec.config import AppConfig
from llmrec.data import Catalog, Split, user_sort_key
from llmrec.plots import plot_metric_bars
from llmrec.recommend.baselines import ItemKNN, Popularity
from llmrec.recommend.sasrec import SASRec, SASRecConfig
from llmrec.stats import bootstrap_ci, mcnemar_exact, sign_flip_test

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[Sequence[str]]], np.ndarray]
"""Histories -> (n, n_items) scores in catalog order (higher is better)."""


@dataclass(frozen=True)
class Task:
    """One evaluation target per user: the input histories (masked when ranking) and the
    targets, in the protocol's user order."""

    histories: list[list[str]]
    targets: list[str]

    @classmethod
    def valid(cls, split: Split, users: Sequence[str]) -> Task:
        return cls([list(split.train[u]) for u in users], [split.valid[u] for u in users])

    @classmethod
    def test(cls, split: Split, users: Sequence[str]) -> Task:
        return cls([list(split.history_for_test(u)) for u in users], [split.test[u] for u in users])


def target_ranks(scores: np.ndarray, task: Task, catalog: Catalog) -> np.ndarray:
    """0-based rank of each target among the unseen items, ties broken by catalog order."""
    scores = np.array(scores, dtype=np.float64)
    ranks = np.empty(len(task.targets), dtype=np.int64)
    for row, (history, target) in enumerate(zip(task.histories, task.targets, strict=True)):
        s = scores[row]
        s[[catalog.index(i) for i in history if i in catalog]] = -np.inf
        t = catalog.index(target)
        ahead = (s > s[t]) | ((s == s[t]) & (np.arange(s.size) < t))
        ranks[row] = int(ahead.sum())
    return ranks


def per_user(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user HR@k and NDCG@k from 0-based target ranks."""
    hit = ranks < k
    return {
        f"HR@{k}": hit.astype(np.float64),
        f"NDCG@{k}": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0),
    }


def summarize(values: Mapping[str, np.ndarray], seed: int) -> dict[str, object]:
    """Mean and 95% bootstrap interval of each per-user metric."""
    out: dict[str, object] = {}
    for name, v in values.items():
        lo, hi = bootstrap_ci(v, seed=seed)
        out[name] = round(float(v.mean()), 4)
        out[f"{name}_ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def log_softmax(scores: np.ndarray) -> np.ndarray:
    s = scores - scores.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


@dataclass
class MethodResult:
    """A method's chosen configuration, its figures and the search that chose it."""

    config: dict
    valid: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    search: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    test_scores: np.ndarray | None = None
    valid_scores: np.ndarray | None = None


class Protocol:
    """The split, the users and the scoring shared by every method."""

    def __init__(self, catalog: Catalog, split: Split, k: int = 10, seed: int = 0) -> None:
        self.catalog, self.split, self.k, self.seed = catalog, split, k, seed
        self.users = sorted(split.test, key=user_sort_key)
        self.valid_task = Task.valid(split, self.users)
        self.test_task = Task.test(split, self.users)

    def metrics(self, scores: np.ndarray, task: Task) -> dict[str, np.ndarray]:
        return per_user(target_ranks(scores, task, self.catalog), self.k)

    def ndcg(self, values: Mapping[str, np.ndarray]) -> float:
        return float(values[f"NDCG@{self.k}"].mean())

    def select(
        self,
        name: str,
        grid: Sequence[dict],
        fit: Callable[[dict], ScoreFn],
    ) -> MethodResult:
        """Fit each configuration of ``grid``, keep the best on validation NDCG@k, test it."""
        start = time.perf_counter()
        best = None
        search = []
        for config in grid:
            score = fit(config)
            valid_scores = score(self.valid_task.histories)
            valid = self.metrics(valid_scores, self.valid_task)
            chosen = getattr(score, "chosen", {})  # e.g. the epoch early stopping kept
            search.append({**config, **chosen, f"valid_NDCG@{self.k}": round(self.ndcg(valid), 4)})
            log.info(
                "%s %s: valid NDCG@%d %.4f", name, {**config, **chosen}, self.k, self.ndcg(valid)
            )
            if best is None or self.ndcg(valid) > self.ndcg(best[1]):
                best = ({**config, **chosen}, valid, score, valid_scores)
        assert best is not None
        config, valid, score, valid_scores = best
        test_scores = score(self.test_task.histories)  # the test item: once, chosen config only
        return MethodResult(
            config,
            valid,
            self.metrics(test_scores, self.test_task),
            search,
            time.perf_counter() - start,
            test_scores,
            valid_scores,
        )


# --------------------------------------------------------------------------- the baselines


def popularity_scores(catalog: Catalog, train: Mapping[str, Sequence[str]]) -> ScoreFn:
    pop = Popularity(catalog, train)
    return lambda histories: np.tile(pop.counts, (len(histories), 1))


def itemknn_scores(catalog: Catalog, train: Mapping[str, Sequence[str]], **params) -> ScoreFn:
    knn = ItemKNN(catalog, train, **params)
    return lambda histories: np.stack([knn.scores(h) for h in histories])


def sasrec_scores(
    catalog: Catalog, train: Mapping[str, Sequence[str]], valid_task: Task, metric, **params
) -> ScoreFn:
    """SASRec fitted on ``train``, its epoch chosen on the validation task."""
    model = SASRec(
        catalog,
        train,
        SASRecConfig(**params),
        validate=lambda m: metric(m.score_matrix(valid_task.histories)),
    )
    return _Chosen(model.score_matrix, {"epochs": model.best_epoch})


@dataclass(frozen=True)
class _Chosen:
    """A score function that also says what its fit chose (e.g. the early-stopped epoch)."""

    score: ScoreFn
    chosen: dict

    def __call__(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        return self.score(histories)


ITEMKNN_GRID = [
    {"neighbors": n, "shrink": s} for n, s in product((20, 50, 100, 200, 400), (0.0, 10.0, 50.0))
]
SASREC_GRID = [
    {"hidden": h, "blocks": b, "dropout": d, "max_len": m, "epochs": 200}
    for h, b, d, m in product((64, 128), (2,), (0.2, 0.5), (50, 100))
]
FUSION_WEIGHTS = [round(w, 2) for w in np.linspace(0.0, 1.0, 21)]


def fuse(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """``weight`` x log-softmax(a) + (1 - weight) x log-softmax(b): two next-item
    distributions mixed in log space (a product of experts)."""
    return weight * log_softmax(a) + (1.0 - weight) * log_softmax(b)


# --------------------------------------------------------------------------- the report


def paired(ours: MethodResult, other: MethodResult, k: int, seed: int) -> dict[str, float]:
    """Paired tests over users on test: NDCG@k sign flip (``delta``, ``p``), HR@k McNemar."""
    delta, p = sign_flip_test(ours.test[f"NDCG@{k}"], other.test[f"NDCG@{k}"], seed=seed)
    hr_delta = float((ours.test[f"HR@{k}"] - other.test[f"HR@{k}"]).mean())
    return {
        "metric": f"NDCG@{k}",
        "delta": round(delta, 4),
        "p": round(p, 4),
        f"HR@{k}_delta": round(hr_delta, 4),
        f"HR@{k}_p_mcnemar": round(mcnemar_exact(ours.test[f"HR@{k}"], other.test[f"HR@{k}"]), 4),
    }


def build_report(
    protocol: Protocol, results: Mapping[str, MethodResult], meta: Mapping[str, object]
) -> dict:
    """The report: per method its valid and test figures with intervals, the chosen config
    and the search; every method against SASRec, paired."""
    k, seed = protocol.k, protocol.seed
    report: dict = {
        "users": len(protocol.users),
        "selected_on": "validation",
        "k": k,
        "seed": seed,
        "methods": {},
        "paired": {},
        "meta": dict(meta),
    }
    for name, r in results.items():
        report["methods"][name] = {
            "valid": summarize(r.valid, seed),
            "test": summarize(r.test, seed),
            "config": r.config,
            "search": r.search,
            "seconds": round(r.seconds, 1),
        }
    if "sasrec" in results:
        for name, r in results.items():
            if name != "sasrec":
                report["paired"][f"{name}_vs_sasrec"] = paired(r, results["sasrec"], k, seed)
    return report


def plot_report(report: Mapping, path: Path) -> Path:
    k = report["k"]
    metrics = [f"HR@{k}", f"NDCG@{k}"]
    table = {m: {x: r["test"][x] for x in metrics} for m, r in report["methods"].items()}
    intervals = {
        m: {x: r["test"][f"{x}_ci95"] for x in metrics} for m, r in report["methods"].items()
    }
    return plot_metric_bars(
        table,
        metrics,
        path,
        f"Test, all {report['users']} users, 95% bootstrap intervals (chosen on validation)",
        intervals,
    )


# --------------------------------------------------------------------------- the command

METHODS = ("popularity", "itemknn", "sasrec", "llm", "llm+sasrec")


def run_quality(
    cfg: AppConfig,
    llm_runs: Sequence[Path],
    report_path: Path,
    methods: Sequence[str] = METHODS,
    sasrec_grid: Sequence[dict] = SASREC_GRID,
    itemknn_grid: Sequence[dict] = ITEMKNN_GRID,
) -> dict:
    """Tune and test every method of ``methods`` on all users; write the report (JSON, PNG).

    ``llm_runs`` are trained foundation-model versions (``llmrec foundation``), the LLM's
    candidates: each is scored on validation and the best one alone on test.
    """
    from llmrec.data import dataset_from_config, leave_last_out
    from llmrec.foundation import load_foundation

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {list(METHODS)}")
    if any(m.startswith("llm") for m in methods) and not llm_runs:
        raise ValueError("the llm methods need at least one trained run (--llm-run)")
    if "llm+sasrec" in methods and not {"llm", "sasrec"} <= set(methods):
        raise ValueError("llm+sasrec needs both llm and sasrec")
    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    catalog, train = dataset.catalog, split.train
    protocol = Protocol(catalog, split, cfg.eval.k, cfg.eval.seed)
    results: dict[str, MethodResult] = {}

    def valid_ndcg(scores: np.ndarray) -> float:
        return protocol.ndcg(protocol.metrics(scores, protocol.valid_task))

    if "popularity" in methods:
        results["popularity"] = protocol.select(
            "popularity", [{}], lambda _: popularity_scores(catalog, train)
        )
    if "itemknn" in methods:
        results["itemknn"] = protocol.select(
            "itemknn", itemknn_grid, lambda c: itemknn_scores(catalog, train, **c)
        )
    if "sasrec" in methods:
        results["sasrec"] = protocol.select(
            "sasrec",
            sasrec_grid,
            lambda c: sasrec_scores(catalog, train, protocol.valid_task, valid_ndcg, **c),
        )
    if "llm" in methods:

        def fit_llm(c: dict) -> ScoreFn:
            scorer = load_foundation(Path(c["run"]), catalog, cfg)
            return lambda histories: scorer.log_probs(histories).numpy()

        results["llm"] = protocol.select("llm", [{"run": str(r)} for r in llm_runs], fit_llm)
    if "llm+sasrec" in methods:
        llm, sas = results["llm"], results["sasrec"]
        start = time.perf_counter()
        search = []
        for w in FUSION_WEIGHTS:
            valid = protocol.metrics(
                fuse(llm.valid_scores, sas.valid_scores, w), protocol.valid_task
            )
            search.append(
                {"llm_weight": w, f"valid_NDCG@{protocol.k}": round(protocol.ndcg(valid), 4)}
            )
        w = max(search, key=lambda r: r[f"valid_NDCG@{protocol.k}"])["llm_weight"]
        results["llm+sasrec"] = MethodResult(
            {"llm_weight": w, "llm": llm.config, "sasrec": sas.config},
            protocol.metrics(fuse(llm.valid_scores, sas.valid_scores, w), protocol.valid_task),
            protocol.metrics(fuse(llm.test_scores, sas.test_scores, w), protocol.test_task),
            search,
            time.perf_counter() - start,
        )
    meta = {
        "dataset": dataset.name,
        "split": "leave-last-out; validation input = training history, test input = "
        "training history + validation item; the whole catalog minus the history ranked",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    report = build_report(protocol, results, meta)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_path, report)
    plot_report(report, report_path.with_suffix(".png"))
    return report
