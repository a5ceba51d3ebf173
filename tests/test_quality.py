"""The quality protocol: ranks, selection on validation, and the report from its own numbers."""

import json
from pathlib import Path

import numpy as np
import pytest

from llmrec.config import load_config
from llmrec.data import leave_last_out
from llmrec.quality import Protocol, Task, fuse, per_user, run_quality, target_ranks

FIXTURES = Path(__file__).parent / "fixtures" / "tiny"
TINY_DATA = [
    "data.name=generic",
    f"data.interactions={FIXTURES / 'interactions.csv'}",
    f"data.catalog={FIXTURES / 'catalog.csv'}",
]


def test_target_rank_masks_the_history_and_breaks_ties_by_catalog_order(tiny_dataset):
    catalog = tiny_dataset.catalog
    ids = catalog.ids
    task = Task([[ids[0], ids[1]]], [ids[3]])
    scores = np.zeros((1, len(ids)))
    scores[0, 0] = scores[0, 1] = 10.0  # seen: masked, so not ahead of the target
    assert target_ranks(scores, task, catalog)[0] == 1  # ids[2] ties and comes first
    scores[0, 3] = 1.0
    assert target_ranks(scores, task, catalog)[0] == 0
    values = per_user(np.array([0, 1, 9, 10]), k=10)
    assert values["HR@10"].tolist() == [1, 1, 1, 0]
    assert values["NDCG@10"][1] == pytest.approx(1 / np.log2(3))


def test_fusion_weight_one_is_the_first_method():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    assert (np.argsort(fuse(a, b, 1.0), 1) == np.argsort(a, 1)).all()
    assert (np.argsort(fuse(a, b, 0.0), 1) == np.argsort(b, 1)).all()


def test_the_report_is_written_from_the_evaluations_own_numbers(tiny_dataset, tmp_path):
    cfg = load_config(None, TINY_DATA)
    grid = [
        {"hidden": 16, "blocks": 1, "dropout": 0.2, "max_len": 10, "epochs": 4, "eval_every": 2}
    ]
    path = tmp_path / "quality.json"
    report = run_quality(
        cfg,
        [],
        path,
        ["popularity", "itemknn", "sasrec"],
        sasrec_grid=grid,
        itemknn_grid=[{"neighbors": 5, "shrink": 0.0}, {"neighbors": 10, "shrink": 10.0}],
    )
    assert json.loads(path.read_text()) == report and path.with_suffix(".png").is_file()
    assert report["users"] == len(leave_last_out(tiny_dataset.histories).test)
    assert report["selected_on"] == "validation"
    split = leave_last_out(tiny_dataset.histories)
    protocol = Protocol(tiny_dataset.catalog, split)
    # Popularity recomputed by hand from the training split.
    counts = np.zeros(len(tiny_dataset.catalog))
    for items in split.train.values():
        for i in set(items):
            counts[tiny_dataset.catalog.index(i)] += 1
    scores = np.tile(counts, (len(protocol.users), 1))
    test = protocol.metrics(scores, protocol.test_task)
    assert report["methods"]["popularity"]["test"]["NDCG@10"] == round(test["NDCG@10"].mean(), 4)
    knn = report["methods"]["itemknn"]
    best = max(knn["search"], key=lambda r: r["valid_NDCG@10"])
    assert knn["config"] == {k: v for k, v in best.items() if k != "valid_NDCG@10"}
    assert knn["valid"]["NDCG@10"] == best["valid_NDCG@10"]
    for name in ("popularity", "itemknn"):
        pair = report["paired"][f"{name}_vs_sasrec"]
        assert pair["delta"] == pytest.approx(
            report["methods"][name]["test"]["NDCG@10"]
            - report["methods"]["sasrec"]["test"]["NDCG@10"],
            abs=2e-4,
        )
        assert 0 < pair["p"] <= 1
    lo, hi = report["methods"]["sasrec"]["test"]["HR@10_ci95"]
    assert lo <= report["methods"]["sasrec"]["test"]["HR@10"] <= hi


def test_unknown_methods_and_missing_runs_are_refused(tmp_path):
    cfg = load_config(None, TINY_DATA)
    with pytest.raises(ValueError, match="unknown methods"):
        run_quality(cfg, [], tmp_path / "q.json", ["bogus"])
    with pytest.raises(ValueError, match="--llm-run"):
        run_quality(cfg, [], tmp_path / "q.json", ["llm"])
