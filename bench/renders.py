"""How the item-token LLM should read a history: item tokens, titles, or both.

Trains the foundation model once per rendering (``llm.render``) on the same seeded user
sample, with the same settings and seed, then ranks every sampled user's validation item
against the whole catalog with each. The test item is never looked at. Writes per rendering
the validation HR@10 / NDCG@10 with 95% bootstrap intervals, the training time, and a paired
sign-flip test of each rendering against "items"; a PNG beside the JSON.

A title costs about nine tokens where an item token costs one, so on this CPU the titles
renderings train about ten times slower, and a window of 100 titles (about 950 tokens) does
not fit a batch of 16 in 24 GiB; the sample, the window and the epochs are arguments so that
the screen fits the machine (the report records the command that wrote it).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/renders.py --config training/configs/quality.yaml \
        --users 300 --window 20 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
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
    parser.add_argument("--window", type=int, default=20, help="history items read (llm.window)")
    parser.add_argument("--renders", nargs="+", default=list(HISTORY_RENDERS))
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/renders"))
    parser.add_argument("--report", type=Path, default=Path("bench/reports/renders.json"))
    args = parser.parse_args()
    if "items" not in args.renders:
        parser.error("--renders must include items (the reference of the paired tests)")

    results, per_user_ndcg = {}, {}
    for render in args.renders:
        cfg = load_config(
            args.config,
            [
                f"llm.render={render}",
                f"llm.n_users={args.users}",
                f"llm.epochs={args.epochs}",
                f"llm.window={args.window}",
                f"llm.output_dir={args.out_dir / render}",
            ],
        )
        dataset = dataset_from_config(cfg)
        split = leave_last_out(dataset.histories)
        run_dir = Path(cfg.llm.output_dir)
        curves_path = run_dir / CURVES_JSON
        finished = curves_path.is_file() and json.loads(curves_path.read_text()).get(
            "llm"
        ) == cfg.llm.model_dump(mode="json")
        if not finished:  # a run with these exact settings is reused
            train_foundation(cfg, dataset, split)
        curves = json.loads(curves_path.read_text())
        users = sample_users(sorted(split.train, key=user_sort_key), cfg.llm.n_users, cfg.llm.seed)
        users = sorted((u for u in users if u in split.valid), key=user_sort_key)
        task = Task.valid(split, users)
        start = time.perf_counter()
        scores = load_foundation(run_dir, dataset.catalog, cfg).log_probs(task.histories)
        values = per_user(target_ranks(scores.numpy(), task, dataset.catalog), K)
        per_user_ndcg[render] = values[f"NDCG@{K}"]
        results[render] = {
            "valid": summarize(values, cfg.llm.seed),
            "valid_by_epoch": curves["valid"],
            "best_epoch": curves["best_epoch"],
            "train_seconds": curves["seconds"],
            "score_seconds": round(time.perf_counter() - start, 1),
        }
        print(render, results[render]["valid"], flush=True)
    paired = {}
    for render in args.renders:
        if render != "items":
            delta, p = sign_flip_test(per_user_ndcg[render], per_user_ndcg["items"], seed=0)
            paired[f"{render}_vs_items"] = {
                "metric": f"NDCG@{K}",
                "delta": round(delta, 4),
                "p": round(p, 4),
            }
    report = {
        "users": len(users),
        "selected_on": "validation",
        "epochs": args.epochs,
        "window": args.window,
        "renders": results,
        "paired": paired,
        "command": " ".join(["bench/renders.py", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
    }
    write_json_atomic(args.report, report)
    metrics = [f"HR@{K}", f"NDCG@{K}"]
    plot_metric_bars(
        {r: {m: v["valid"][m] for m in metrics} for r, v in results.items()},
        metrics,
        args.report.with_suffix(".png"),
        title=f"History rendering (validation): {len(users)} users, window {args.window}, "
        f"{args.epochs} epoch(s)",
        intervals={r: {m: v["valid"][f"{m}_ci95"] for m in metrics} for r, v in results.items()},
    )
    print(json.dumps(report["paired"], indent=1))


if __name__ == "__main__":
    main()
