"""Serving benchmark: recommendation throughput and latency through the gateway and vLLM.

Starts the real stack on loopback (a managed vLLM OpenAI server with LoRA + the FastAPI
gateway), publishes one random rank-r LoRA per benchmark user into a temporary adapter
store, and measures, side by side on the same requests: recommendations on the base model
(no LoRA) and with 1, 16 and 100 distinct user adapters, under concurrency. With more
distinct adapters than ``--max-cpu-loras`` the gateway's LRU evicts and reloads during the
run: that cost is part of the figure. Also measures adapter load time: cold (validated and
loaded from disk into vLLM) and warm (already loaded: a cache hit), as the latency of a
user's first request against their next one. Prints a table, writes JSON and a PNG.

CPU command (tiny 2-layer Llama, the ML-100K catalog):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py --model tiny
The real SmolLM2-135M (much slower on a CPU):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py --model smollm2 \
        --requests 32 --adapters 0 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
import torch

matplotlib.use("Agg")
# Run as a script, this file's folder is sys.path[0], and this file would shadow the
# serving package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib.pyplot as plt  # noqa: E402

from llmrec.adapters import (  # noqa: E402
    AdapterStore,
    LoraWeights,  # noqa: E402
    module_shapes_for,
)
from llmrec.data import load_dataset  # noqa: E402
from llmrec.launch import free_port  # noqa: E402
from llmrec.model import (  # noqa: E402
    BASE_MODEL_ALIAS,
    build_tiny_model,
    fingerprint_model_dir,
    prepare_base_model,
)
from llmrec_serving.app import create_app, serve_in_thread  # noqa: E402
from llmrec_serving.config import load_serving_config  # noqa: E402
from llmrec_serving.keys import KeyStore  # noqa: E402
from llmrec_serving.services import build_services  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_load(
    url: str, jobs: list[tuple[str, list[str]]], admin: str, concurrency: int, k: int
):
    """Send every (user, history) job, ``concurrency`` at a time; latencies and wall time."""
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                user, history = queue.get_nowait()
                body = {"user": user, "history": history, "k": k, "explain": False}
                start = time.perf_counter()
                r = await client.post("/v1/recommendations", json=body)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, wall, errors


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m[1]) if m else 0.0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--data", choices=["ml-100k"], default="ml-100k")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 16, 100], help="0 = base")
    p.add_argument("--requests", type=int, default=96, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beam-width", type=int, default=10)
    p.add_argument("--rank", type=int, default=12, help="adapter rank (8 shared + 4 personal)")
    p.add_argument("--max-cpu-loras", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results/bench_serving"))
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = build_tiny_model(work / "tiny") if args.model == "tiny" else prepare_base_model()
    model_name = str(model_dir) if args.model == "tiny" else BASE_MODEL_ALIAS
    dataset = load_dataset(args.data)
    users = sorted(dataset.histories, key=lambda u: -len(dataset.histories[u]))[
        : max(args.adapters) + 8
    ]
    shapes, fp = module_shapes_for(model_dir), fingerprint_model_dir(model_dir)
    store = AdapterStore(work / "adapters", max_rank=64, module_shapes=shapes, base_fingerprint=fp)
    n_adapters = max(args.adapters)
    for i, user in enumerate(users[:n_adapters]):
        store.publish(
            user,
            LoraWeights.random(
                shapes, TARGETS, args.rank, i, str(model_dir), std=0.02, alpha=args.rank
            ),
            base_fingerprint=fp,
        )
    keys = KeyStore(work / "keys.json")
    admin = keys.add(None, admin=True)
    cfg = load_serving_config(None, [
        f"model.name_or_path={model_name}", "model.dtype=float32", f"data.name={args.data}",
        "prompts.max_history_items=10", f"recommend.beam_width={args.beam_width}",
        f"serve.store_dir={store.root}", f"serve.keys_file={keys.path}",
        f"profile.url=sqlite:///{work / 'profiles.db'}",
        f"serve.vllm_port={free_port()}", "serve.cpu_threads=nobind",
        f"serve.max_cpu_loras={args.max_cpu_loras}", f"serve.max_loras={args.max_loras}",
        "serve.limits.max_queue=1024", "serve.limits.per_user_concurrency=64",
        f"serve.limits.max_concurrency={args.concurrency}", "serve.limits.request_timeout_s=600",
        "serve.limits.queue_timeout_s=600",
    ])  # fmt: skip
    services = build_services(cfg)
    startup_timeout_s = cfg.serve.vllm_startup_timeout_s + 60
    t0 = time.perf_counter()
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s) as url:
        startup_s = time.perf_counter() - t0
        served_rank = services.router.store.max_rank
        print(f"stack up in {startup_s:.1f} s ({args.model} model, vLLM rank {served_rank})")
        # Adapter load, cold vs warm: a fresh user's first request, then the same again.
        cold, warm = [], []
        for user in users[n_adapters - 4 : n_adapters] if n_adapters >= 4 else []:
            history = list(dataset.histories[user][-10:])
            for bucket in (cold, warm):
                lat, _, _ = asyncio.run(run_load(url, [(user, history)], admin, 1, args.k))
                bucket.append(lat[0])
        text = httpx.get(f"{url}/metrics").text
        load_s = metric(text, "llmrec_adapter_load_seconds_sum") / max(
            1.0, metric(text, "llmrec_adapter_load_seconds_count")
        )
        scenarios = {}
        for n in args.adapters:
            # n = 0: users with no adapter and no shared one are served by the bare base.
            pool = users[n_adapters : n_adapters + 8] if n == 0 else users[:n]
            jobs = [(u, list(dataset.histories[u][-10:])) for u in pool]
            jobs = [jobs[i % len(jobs)] for i in range(args.requests)]
            before = httpx.get(f"{url}/metrics").text
            lat, wall, errors = asyncio.run(run_load(url, jobs, admin, args.concurrency, args.k))
            after = httpx.get(f"{url}/metrics").text
            name = "base (no LoRA)" if n == 0 else f"{n} adapter{'s' * (n > 1)}"
            scenarios[name] = {
                "distinct_adapters": n,
                "requests": len(lat),
                "errors": errors,
                "throughput_rps": len(lat) / wall,
                "p50_s": statistics.median(lat),
                "p99_s": percentile(lat, 99),
                "adapter_loads": metric(after, "llmrec_adapter_loads_total")
                - metric(before, "llmrec_adapter_loads_total"),
            }
            row = scenarios[name]
            print(
                f"{name:>16}: {row['throughput_rps']:6.2f} req/s  p50 {row['p50_s']:.3f} s  "
                f"p99 {row['p99_s']:.3f} s  loads {row['adapter_loads']:.0f}  errors {errors}"
            )
    base = scenarios.get("base (no LoRA)")
    report = {
        "model": args.model,
        "model_dir": str(model_dir),
        "data": args.data,
        "catalog_items": len(dataset.catalog),
        "k": args.k,
        "beam_width": args.beam_width,
        "adapter_rank": args.rank,
        "vllm_max_lora_rank": served_rank,
        "max_cpu_loras": args.max_cpu_loras,
        "max_loras": args.max_loras,
        "concurrency": args.concurrency,
        "host": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "startup_s": startup_s,
        "adapter_load": {
            "validate_and_load_mean_s": load_s,
            "first_request_cold_s": statistics.median(cold) if cold else None,
            "next_request_warm_s": statistics.median(warm) if warm else None,
        },
        "scenarios": scenarios,
        "vs_base": {
            name: {
                "throughput_ratio": row["throughput_rps"] / base["throughput_rps"],
                "p50_ratio": row["p50_s"] / base["p50_s"],
            }
            for name, row in scenarios.items()
        }
        if base
        else {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({"adapter_load": report["adapter_load"], "vs_base": report["vs_base"]}, indent=2)
    )
    plot(report, args.out / "serving.png")
    print(f"written: {args.out / 'serving.json'}, {args.out / 'serving.png'}")


def plot(report: dict, path: Path) -> None:
    names = list(report["scenarios"])
    rows = [report["scenarios"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [r["throughput_rps"] for r in rows], color="tab:blue")
    left.set_ylabel("recommendations / s")
    left.set_title(f"throughput, concurrency {report['concurrency']}")
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [r["p50_s"] for r in rows], width=0.4, label="p50")
    right.bar([i + 0.2 for i in x], [r["p99_s"] for r in rows], width=0.4, label="p99")
    right.set_xticks(list(x), names)
    right.set_ylabel("seconds")
    right.set_title("latency per request")
    right.legend()
    fig.suptitle(
        f"llmrec serving: {report['model']} model, {report['catalog_items']} items, "
        f"k={report['k']}, beam {report['beam_width']}, LoRA rank {report['adapter_rank']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
