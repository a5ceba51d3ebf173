"""Latency of trie-constrained recommendation on the real base model.

Measures, side by side in one run on the same users: median and p90 seconds per
`Recommender.recommend` call for each beam width and dtype, and the forward passes
it took. Prints a table, writes JSON and a PNG.

CPU command (about 5 minutes on 2 cores):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/recommend.py --users 20 --beams 5 10 20 40
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from llmrec.config import load_config  # noqa: E402
from llmrec.data import (
    dataset_from_config,  # noqa: E402
    leave_last_out,  # noqa: E402
)
from llmrec.finetune import sample_users  # noqa: E402
from llmrec.model import load_base  # noqa: E402
from llmrec.recommend import build_recommender  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()

    rows = []
    for dtype in args.dtypes:
        cfg = load_config(overrides=[f"model.dtype={dtype}"])
        ds = dataset_from_config(cfg)
        split = leave_last_out(ds.histories)
        users = sample_users(sorted(split.test, key=int), args.users, seed=0)
        model, tokenizer = load_base(cfg)
        for beam in args.beams:
            rec = build_recommender(cfg, ds, model, tokenizer)
            rec.beam_width = beam
            calls = 0
            forward = rec.model.forward

            def counted(*a, _f=forward, **k):
                nonlocal calls
                calls += 1
                return _f(*a, **k)

            rec.model.forward = counted
            rec.recommend(split.history_for_test(users[0]), k=10)  # warm-up
            seconds = []
            calls = 0
            for user in users:
                start = time.perf_counter()
                rec.recommend(split.history_for_test(user), k=10)
                seconds.append(time.perf_counter() - start)
            rec.model.forward = forward
            row = {
                "dtype": dtype,
                "beam_width": beam,
                "median_s": statistics.median(seconds),
                "p90_s": statistics.quantiles(seconds, n=10)[-1],
                "forwards_per_call": calls / len(users),
            }
            rows.append(row)
            print(
                f"{dtype:9s} beam {beam:3d}: median {row['median_s']:.3f}s  "
                f"p90 {row['p90_s']:.3f}s  forwards/call {row['forwards_per_call']:.1f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "users": args.users,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    (args.out / "recommend.json").write_text(json.dumps(report, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dtype in args.dtypes:
        pts = [r for r in rows if r["dtype"] == dtype]
        ax.plot([r["beam_width"] for r in pts], [r["median_s"] for r in pts], "o-", label=dtype)
    ax.set(xlabel="beam width", ylabel="median s / request", title="Trie-constrained decoding")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "recommend.png", dpi=120)
    print(f"written: {args.out / 'recommend.json'}, {args.out / 'recommend.png'}")


if __name__ == "__main__":
    main()
