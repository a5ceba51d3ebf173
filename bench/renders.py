"""How the item-token LLM should read a history: item tokens, titles, or both, over how many.

Trains the foundation model once per (rendering, window) of the grid (``llm.render``,
``llm.window``) on the same seeded user sample, with the same other settings and seed, then
ranks every sampled user's validation item against the whole catalog with each. The test item
is never looked at. Writes per configuration (``<render>/w<window>``) the validation HR@10 /
NDCG@10 with 95% bootstrap intervals, the training time, and a paired sign-flip test of each
against the first configuration of the grid; a PNG beside the JSON.

A title costs about nine tokens where an item token costs one, so on this CPU the titles
renderings train about ten times slower, and a window of 100 titles (about 950 tokens) does
not fit a batch of 16 in 24 GiB; the sample, the windows and the epochs are arguments so that
the screen fits the machine (the report records the command that wrote it). A finished run
with the same settings is reused.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/renders.py --users 300 --windows 20 --epochs 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/renders.py --users 300 --renders items \
        --windows 20 50 100 --epochs 1 --report bench/reports/windows.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from itertools import product
from pathlib import Path

from llmrec.atomic import write_json_atomic
from llmrec.config import load_config
from llmrec.data import dataset_from_config, leave_last_out, user_sort_key
from llmrec.finetune import sample_users
from llmrec.foundation import CURVES_JSON, load_foundation, train_foundation
from llmrec.plots import plot_metric_bars
from llmrec.prompts import HISTORY_RENDERS
from llmrec.quality import Task, per_user, summarize, target_ranks
from llmrec.stats import sign_flip_test

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("training/configs/quality.yaml"))
    parser.add_argument("--users", type=int, default=300, help="seeded user sample (0 = all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--renders", nargs="+", default=list(HISTORY_RENDERS))
    parser.add_argument("--windows", type=int, nargs="+", default=[20], help="llm.window values")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/renders"))
    parser.add_argument("--report", type=Path, default=Path("bench/reports/renders.json"))
    args = parser.parse_args()

    results, per_user_ndcg = {}, {}
    for render, window in product(args.renders, args.windows):
        name = f"{render}/w{window}"
        cfg = load_config(
            args.config,
            [
                f"llm.render={render}",
                f"llm.n_users={args.users}",
                f"llm.epochs={args.epochs}",
                f"llm.window={window}",
                f"llm.output_dir={args.out_dir / f'{render}-w{window}'}",
            ],
        )
        dataset = dataset_from_config(cfg)
        split = leave_last_out(dataset.histories)
        run_dir = Path(cfg.llm.output_dir)
        curves_path = run_dir / CURVES_JSON
        if not (
            curves_path.is_file()
            and _settings(json.loads(curves_path.read_text())["llm"])
            == _settings(cfg.llm.model_dump(mode="json"))
        ):
            train_foundation(cfg, dataset, split)
        curves = json.loads(curves_path.read_text())
        users = sample_users(sorted(split.train, key=user_sort_key), cfg.llm.n_users, cfg.llm.seed)
        users = sorted((u for u in users if u in split.valid), key=user_sort_key)
        task = Task.valid(split, users)
        start = time.perf_counter()
        scores = load_foundation(run_dir, dataset.catalog, cfg).log_probs(task.histories)
        values = per_user(target_ranks(scores.numpy(), task, dataset.catalog), K)
        per_user_ndcg[name] = values[f"NDCG@{K}"]
        results[name] = {
            "render": render,
            "window": window,
            "valid": summarize(values, cfg.llm.seed),
            "valid_by_epoch": curves["valid"],
            "best_epoch": curves["best_epoch"],
            "train_seconds": curves["seconds"],
            "score_seconds": round(time.perf_counter() - start, 1),
        }
        print(name, results[name]["valid"], flush=True)
    reference = next(iter(results))
    paired = {}
    for name in results:
        if name != reference:
            delta, p = sign_flip_test(per_user_ndcg[name], per_user_ndcg[reference], seed=0)
            paired[f"{name}_vs_{reference}"] = {
                "metric": f"NDCG@{K}",
                "delta": round(delta, 4),
                "p": round(p, 4),
            }
    best = max(results, key=lambda n: results[n]["valid"][f"NDCG@{K}"])
    report = {
        "users": len(users),
        "selected_on": "validation",
        "epochs": args.epochs,
        "configs": results,
        "best": best,
        "paired": paired,
        "command": " ".join(["bench/renders.py", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
    }
    write_json_atomic(args.report, report)
    metrics = [f"HR@{K}", f"NDCG@{K}"]
    plot_metric_bars(
        {n: {m: v["valid"][m] for m in metrics} for n, v in results.items()},
        metrics,
        args.report.with_suffix(".png"),
        title=f"Item-token LLM, validation: {len(users)} users, {args.epochs} epoch(s)",
        intervals={n: {m: v["valid"][f"{m}_ci95"] for m in metrics} for n, v in results.items()},
    )
    print(json.dumps({"best": best, **paired}, indent=1))


def _settings(llm: dict) -> dict:
    """What a run was trained with, but where it was written."""
    return {k: v for k, v in llm.items() if k != "output_dir"}


if __name__ == "__main__":
    main()
