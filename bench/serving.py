"""Serving benchmark: one engine request per recommendation, through the gateway and vLLM.

Starts the real stack on loopback (the managed vLLM OpenAI server with LoRA, and the FastAPI
gateway) over an item-token base, and measures, side by side in one run, recommendations of
``--k`` items without reasons (one engine request each):

- ``base-c1``, ``adapter-c1``: the base with no LoRA and one user's adapter, one request at
  a time;
- ``base-c8``, ``adapters1-c8``, ``adapters16-c8``, ``adapters100-c8``: the base, then 1, 16
  and 100 distinct users' adapters, ``--concurrency`` at a time; every adapter of a scenario
  is loaded before it is timed (cold loads are measured on their own);
- ``users100-c8``: the data set's first 100 users, each served as their export serves them
  (an adapter, or under a merged export often none);
- ``cold_load_ms``: validating a stored adapter and loading it into vLLM (the gateway's own
  timer, ``llmrec_adapter_load_seconds``), for users never served before;
- ``warm_swap_ms``: what switching between loaded adapters adds to a request: one request
  at a time, each history sent to the next of 16 loaded adapters (more than the engine's
  ``--max-loras`` slots, so every such request swaps one in) and then to one adapter that
  keeps its slot; the median of the pairs' differences;
- ``first_byte_s``: a streamed recommendation with reasons (``stream=true``): the first
  byte (the ranked items), the first reason and the whole answer.

The adapters are a federated run's own (``--run``: the base and store its ``export.json``
names, stacked or merged; the users' adapters hard-linked into a private store without the
shared adapter, so users outside it are served by the bare base); without ``--run``, random
rank-``--rank`` LoRAs over the untrained item-token base of the packaged model. Writes a
JSON report and a PNG beside it.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py \\
        --run outputs/fed-seed0 --out bench/reports/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import psutil
import torch

matplotlib.use("Agg")
# Run as a script, this file's folder is sys.path[0], and this file would shadow the
# serving package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib.pyplot as plt  # noqa: E402

from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for  # noqa: E402
from llmrec.atomic import write_json_atomic  # noqa: E402
from llmrec.data import Dataset, Split, leave_last_out, load_dataset, user_sort_key  # noqa: E402
from llmrec.launch import free_port, free_ports  # noqa: E402
from llmrec.model import build_tiny_model, fingerprint_model_dir, prepare_base_model  # noqa: E402
from llmrec.model.item_vocab import prepare_item_base  # noqa: E402
from llmrec.quality import per_user, summarize  # noqa: E402
from llmrec.stats import paired_comparison  # noqa: E402
from llmrec_serving.app import create_app, serve_in_thread  # noqa: E402
from llmrec_serving.config import load_serving_config  # noqa: E402
from llmrec_serving.keys import KeyStore  # noqa: E402
from llmrec_serving.releases import vllm_dtype  # noqa: E402
from llmrec_serving.services import build_services  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SWAP_ADAPTERS = 16
WINDOW_CAP = 100
"""Most history items a request carries (the run's window; the gateway's limit is 200)."""


@dataclass
class Timed:
    """Latencies of one batch of requests, its wall time, its failures and its answers."""

    latencies: list[float]
    wall_s: float
    errors: int
    answers: list[list[str]]
    """Each request's ranked item ids, in request order (empty when it failed)."""


Job = tuple[str, list[str]]
"""One recommendation: the acting user and the history it is ranked from."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def send(url: str, admin: str, jobs: list[Job], concurrency: int, k: int) -> Timed:
    """One items-only recommendation per job, ``concurrency`` at a time."""
    latencies: list[float] = []
    answers: list[list[str]] = [[] for _ in jobs]
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for index, job in enumerate(jobs):
        queue.put_nowait((index, job))
    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                index, (user, history) = queue.get_nowait()
                body = {"user": user, "history": history, "k": k, "explain": False}
                start = time.perf_counter()
                r = await client.post("/v1/recommendations", json=body)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    errors += 1
                    print(f"  {r.status_code}: {r.text[:200]}")
                else:
                    answers[index] = [item["item_id"] for item in r.json()["items"]]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Timed(latencies, wall, errors, answers)


def streamed(url: str, admin: str, job: Job, k: int) -> dict[str, float]:
    """A streamed recommendation with reasons: seconds to the first byte, the first reason
    and the end."""
    user, history = job
    body = {"user": user, "history": history, "k": k, "explain": True, "stream": True}
    headers = {"Authorization": f"Bearer {admin}"}
    out: dict[str, float] = {}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/recommendations", json=body, headers=headers,
                      timeout=600) as r:  # fmt: skip
        r.raise_for_status()
        for chunk in r.iter_text():
            now = time.perf_counter() - start
            out.setdefault("first_byte_s", now)
            if '"type":"reason"' in chunk:
                out.setdefault("first_reason_s", now)
    out["done_s"] = time.perf_counter() - start
    return out


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m[1]) if m else 0.0


def engine_requests(url: str, names: list[str]) -> list[float]:
    """Requests the gateway has sent to each engine so far."""
    text = httpx.get(f"{url}/metrics").text
    return [metric(text, f'llmrec_engine_requests_total{{engine="{n}"}}') for n in names]


def summary(timed: Timed) -> dict[str, float]:
    lat = timed.latencies
    return {
        "requests": len(lat),
        "errors": timed.errors,
        "req_s": len(lat) / timed.wall_s,
        "p50_s": statistics.median(lat),
        "p99_s": percentile(lat, 99),
    }


def engine_rss_mb(pid: int | None) -> float | None:
    """Resident memory of the engine's process tree, in MiB."""
    if pid is None:
        return None
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def link_run_store(store: Path, users: list[str], dest: Path) -> None:
    """``users``' adapters of a run's store, hard-linked (no copy) into ``dest`` (without
    the shared adapter: users outside it are served the bare base)."""
    for user in users:
        shutil.copytree(store / user, dest / user, copy_function=_link)


def _link(src: str, dst: str) -> None:
    Path(dst).hardlink_to(src)


class Histories:
    """Real histories, each handed out once (a repeated prompt would be answered from the
    engine's prefix cache and flatter the figures)."""

    def __init__(self, dataset: Dataset, window: int, seed: int):
        users = sorted(dataset.histories, key=user_sort_key)
        random.Random(seed).shuffle(users)
        self._histories = [list(dataset.histories[u][-window:]) for u in users]
        self._next = 0

    def take(self) -> list[str]:
        history = self._histories[self._next % len(self._histories)]
        self._next += 1
        return history


def served_quality(run: Callable[[list[Job], int], Timed], split: Split, k: int) -> dict:
    """Each user ranked by the gateway with their own adapter from the history before their
    validation and test items: per-user HR@k and NDCG@k of each."""
    out = {}
    for name, targets in (("valid", split.valid), ("test", split.test)):
        users = sorted(targets, key=user_sort_key)
        before = split.history_for_valid if name == "valid" else split.history_for_test
        answers = run([(u, before(u)[-WINDOW_CAP:]) for u in users], k).answers
        ranks = np.array([a.index(targets[u]) if targets[u] in a else k for u, a in
                          zip(users, answers, strict=True)])  # fmt: skip
        out[name] = {"users": users, "values": per_user(ranks, k)}
    return out


def previous_report(path: Path) -> dict:
    """The report already at ``path`` ({} if none): each of the two commands keeps the other's
    sections."""
    return json.loads(path.read_text()) if path.is_file() else {}


def stack_config(args, model_dir: Path, store_dir: Path, work: Path, *extra: str):
    """(config, admin key) of the bench's gateway + managed vLLM, with ``extra`` overrides."""
    keys = KeyStore(work / "keys.json")
    admin = keys.add(None, admin=True)
    cfg = load_serving_config(None, [
        f"model.name_or_path={model_dir}", f"data.name={args.data}",
        f"serve.store_dir={store_dir}", f"serve.keys_file={keys.path}",
        f"profile.url=sqlite:///{work / 'profiles.db'}",
        f"serve.max_cpu_loras={args.max_cpu_loras}", f"serve.max_loras={args.max_loras}",
        "serve.limits.max_queue=2048", "serve.limits.per_user_concurrency=64",
        f"serve.limits.max_concurrency={args.concurrency}", "serve.limits.request_timeout_s=600",
        "serve.limits.queue_timeout_s=600", *extra,
    ])  # fmt: skip
    return cfg, admin


def measure(args, model_dir: Path, store_dir: Path, dataset, split, layout: str) -> dict:
    """Everything measured on one served layout (``serve.quantization``)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-serving-{layout}-"))
    cfg, admin = stack_config(
        args, model_dir, store_dir, work,
        f"serve.quantization={layout}", f"serve.vllm_port={free_port()}",
    )  # fmt: skip
    services = build_services(cfg)
    histories = Histories(dataset, WINDOW_CAP, args.seed)
    adapter_users = sorted(services.store.users(), key=user_sort_key)
    population = sorted(dataset.histories, key=user_sort_key)
    base_users = [f"bench-base-{i}" for i in range(16)]  # no adapter: the bare base serves them
    t0 = time.perf_counter()
    with serve_in_thread(
        create_app(services), "127.0.0.1", cfg.serve.vllm_startup_timeout_s + 60
    ) as url:
        startup_s = time.perf_counter() - t0
        rss_mb = engine_rss_mb(getattr(services.engines[0].backend.server, "pid", None))
        served_rank = services.store.max_rank
        print(f"[{layout}] stack up in {startup_s:.1f} s, engine {rss_mb:.0f} MiB, "
              f"vLLM max rank {served_rank}")  # fmt: skip

        def run(jobs: list[Job], concurrency: int) -> Timed:
            return asyncio.run(send(url, admin, jobs, concurrency, args.k))

        def fresh(users: list[str], n: int) -> list[Job]:
            return [(users[i % len(users)], histories.take()) for i in range(n)]

        def loads() -> tuple[float, float]:
            text = httpx.get(f"{url}/metrics").text
            return (
                metric(text, "llmrec_adapter_load_seconds_sum"),
                metric(text, "llmrec_adapter_load_seconds_count"),
            )

        run(fresh(base_users, 2), 1)  # the gateway's own first-request costs, untimed
        # Cold loads: users never served, one at a time.
        cold_users = adapter_users[-args.cold :]
        before = loads()
        cold = run(fresh(cold_users, len(cold_users)), 1)
        after = loads()
        cold_load_ms = 1000 * (after[0] - before[0]) / max(1.0, after[1] - before[1])

        pools = {
            "base-c1": (base_users, 1),
            "adapter-c1": (adapter_users[:1], 1),
            "base-c8": (base_users, args.concurrency),
            "adapters1-c8": (adapter_users[:1], args.concurrency),
            "adapters16-c8": (adapter_users[:16], args.concurrency),
            "adapters100-c8": (adapter_users[:100], args.concurrency),
            # The first 100 users of the data set as their export serves them: under the
            # merged layout, those who add nothing to the shared model run with no LoRA.
            "users100-c8": (population[:100], args.concurrency),
        }
        scenarios = {}
        for name, (pool, concurrency) in pools.items():
            # Every adapter of the scenario loaded (untimed), on a one-item history.
            run([(u, histories.take()[-1:]) for u in pool], args.concurrency)
            before = loads()
            timed = run(fresh(pool, max(args.requests, len(pool))), concurrency)
            scenarios[name] = summary(timed) | {
                "distinct_adapters": len(set(pool) & set(adapter_users)),
                "concurrency": concurrency,
                "adapter_loads": loads()[1] - before[1],
            }
            row = scenarios[name]
            print(f"[{layout}] {name:>15}: {row['req_s']:6.2f} req/s  p50 {row['p50_s']:.3f} s"
                  f"  p99 {row['p99_s']:.3f} s  loads {row['adapter_loads']:.0f}  "
                  f"errors {row['errors']}")  # fmt: skip

        # Warm swaps, one request at a time: each history goes to the next of 16 loaded
        # adapters (more than the slots: each swaps one in), then to one adapter that
        # stays in its slot; the pairs share a prompt, so their difference is the swap.
        swapped, kept = adapter_users[1 : 1 + SWAP_ADAPTERS], adapter_users[0]
        run([(u, histories.take()[-1:]) for u in [kept, *swapped]], 1)  # all loaded
        n = max(args.requests, 2 * SWAP_ADAPTERS)
        pairs = [(swapped[i % len(swapped)], kept, histories.take()) for i in range(n)]
        timed = run([(user, h) for a, b, h in pairs for user in (a, b)], 1)
        cycle, same = timed.latencies[0::2], timed.latencies[1::2]
        swap_s = statistics.median(c - s for c, s in zip(cycle, same, strict=True))

        streams = [streamed(url, admin, job, args.k) for job in fresh(adapter_users, args.streams)]
        quality = (
            served_quality(lambda jobs, k: run(jobs, args.concurrency), split, args.k)
            if args.quality
            else None
        )
    shutil.rmtree(work, ignore_errors=True)
    stream = {key: statistics.median(s[key] for s in streams) for key in streams[0]}
    return {
        "engine": {
            "kind": "vllm",
            "quantization": layout,
            "dtype": vllm_dtype(cfg),
            "max_lora_rank": served_rank,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "startup_s": startup_s,
            "rss_mb": rss_mb,
        },
        "scenarios": scenarios,
        "ratios": {
            "lora_vs_base": scenarios["adapters1-c8"]["req_s"] / scenarios["base-c8"]["req_s"],
            "adapters_100_vs_1": scenarios["adapters100-c8"]["req_s"]
            / scenarios["adapters1-c8"]["req_s"],
        },
        "cold_load_ms": cold_load_ms,
        "cold_first_request_s": statistics.median(cold.latencies),
        "warm_swap_ms": 1000 * swap_s,
        "warm_swap": {
            "cycle16_p50_s": statistics.median(cycle),
            "same_p50_s": statistics.median(same),
            "pairs": n,
        },
        "first_byte_s": stream["first_byte_s"],
        "stream": stream | {"requests": len(streams), "reasons": cfg.serve.reasons},
        "quality": quality,
    }


def measure_replicas(args, model_dir: Path, store_dir: Path, dataset) -> dict:
    """One engine, then ``--replicas`` engines behind one gateway: the same requests (the
    first 100 stored users' adapters, each loaded before the timing, ``--concurrency`` at a
    time) through each, and the throughput ratio. One engine runs twice, with vLLM's own
    core binding (``auto``: on x86 it keeps one core for its scheduler) and bound to every
    core; the ratio is against the faster. The N engines split the cores between them.
    Each setup runs ``--repeats`` times, in an order that alternates (ABC CBA ...) so that
    a noisy neighbour weighs on all alike; each figure is the median over its runs."""
    every_core = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    setups = {
        "one_auto": (1, "auto"),
        "one_every_core": (1, every_core),
        "many": (args.replicas, "auto"),
    }
    order = [k for r in range(args.repeats) for k in list(setups)[:: 1 if r % 2 == 0 else -1]]
    runs: dict[str, list[dict]] = {key: [] for key in setups}
    for key in order:
        engines, threads = setups[key]
        work = Path(tempfile.mkdtemp(prefix=f"bench-serving-{key}-"))
        cfg, admin = stack_config(
            args, model_dir, store_dir, work, f"serve.replicas={engines}",
            f"serve.cpu_threads={threads}", f"serve.vllm_port={free_ports(engines)}",
        )  # fmt: skip
        services = build_services(cfg)
        histories = Histories(dataset, WINDOW_CAP, args.seed)  # the same requests each time
        pool = sorted(services.store.users(), key=user_sort_key)[:100]
        with serve_in_thread(
            create_app(services), "127.0.0.1", cfg.serve.vllm_startup_timeout_s + 60
        ) as url:
            names = [e.name for e in services.engines]
            asyncio.run(send(url, admin, [(u, histories.take()[-1:]) for u in pool], 8, args.k))
            before = engine_requests(url, names)
            jobs = [(pool[i % len(pool)], histories.take()) for i in range(max(args.requests, 100))]
            timed = asyncio.run(send(url, admin, jobs, args.concurrency, args.k))
            spread = [b - a for a, b in zip(before, engine_requests(url, names), strict=True)]
        shutil.rmtree(work, ignore_errors=True)
        runs[key].append(summary(timed) | {"requests_per_engine": spread})
        print(f"[{key}] {runs[key][-1]['req_s']:6.2f} req/s  p50 "
              f"{runs[key][-1]['p50_s']:.3f} s  per engine {spread}")  # fmt: skip
    rows = {
        key: {
            "engines": setups[key][0],
            "cpu_threads": setups[key][1],
            "req_s": statistics.median(r["req_s"] for r in done),
            "p50_s": statistics.median(r["p50_s"] for r in done),
            "p99_s": statistics.median(r["p99_s"] for r in done),
            "runs": done,
        }
        for key, done in runs.items()
    }
    one = max(rows["one_auto"], rows["one_every_core"], key=lambda r: r["req_s"])
    many = rows["many"]
    return {
        "command": "bench/serving.py " + " ".join(sys.argv[1:]),
        "host": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "scenario": f"100 users' adapters, {args.concurrency} at a time, k={args.k}",
        "engines": args.replicas,
        "repeats": args.repeats,
        **rows,
        "one": one,
        "ratio": many["req_s"] / one["req_s"],
        "p50_ratio": many["p50_s"] / one["p50_s"],
    }


def quality_report(results: dict[str, dict], k: int, seed: int) -> dict:
    """HR@k / NDCG@k with intervals per layout and split, and each quantized layout against
    ``none`` on the same users (paired)."""
    out: dict = {}
    for layout, result in results.items():
        out[layout] = {
            split: {"users": len(q["users"])} | summarize(q["values"], seed)
            for split, q in result["quality"].items()
        }
    for layout in [name for name in results if name != "none"]:
        out[f"{layout}_vs_none"] = {
            split: paired_comparison(
                results[layout]["quality"][split]["values"],
                results["none"]["quality"][split]["values"],
                k,
                seed,
            )
            for split in ("valid", "test")
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, help="a federated run folder (base/ + adapters/)")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2",
                   help="without --run: the base whose item-token version is served")  # fmt: skip
    p.add_argument("--data", choices=["ml-100k"], default="ml-100k")
    p.add_argument("--requests", type=int, default=32, help="requests per timed scenario")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rank", type=int, default=12, help="random adapters' rank (no --run)")
    p.add_argument("--cold", type=int, default=8, help="users whose first load is timed")
    p.add_argument("--streams", type=int, default=8, help="streamed requests with reasons")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-cpu-loras", type=int, default=128)
    p.add_argument("--quantized", action="store_true",
                   help="also serve the 4-bit (W4A16) version, side by side")  # fmt: skip
    p.add_argument("--quality", action="store_true",
                   help="rank each user's validation and test item via the gateway")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1,
                   help="N > 1: measure only one engine against N behind one gateway, and "
                   "write it under `replicas` in --out (its other figures are kept)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2,
                   help="with --replicas: runs of each setup, in alternating order")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/reports/serving.json"))
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    dataset = load_dataset(args.data)
    split = leave_last_out(dataset.histories)
    users = sorted(dataset.histories, key=user_sort_key)
    store_dir = work / "adapters"
    if args.run is not None:
        export = json.loads((args.run / "export.json").read_text())
        model_dir = Path(export["base"]).resolve()
        run_store = Path(export.get("store") or args.run / "adapters")
        run_users = [u for u in users if (run_store / u / "CURRENT").is_file()]
        link_run_store(run_store, run_users, store_dir)
        layout = "merged" if export.get("merge_shared") else "stacked"
        source = f"{args.run}: its {layout} export, {len(run_users)} users' own adapters"
    else:
        plain = build_tiny_model(work / "tiny") if args.model == "tiny" else prepare_base_model()
        model_dir = prepare_item_base(plain, dataset.catalog)
        shapes, fp = module_shapes_for(model_dir), fingerprint_model_dir(model_dir)
        store = AdapterStore(store_dir, max_rank=64, module_shapes=shapes, base_fingerprint=fp)
        for i, user in enumerate(users[: 100 + args.cold]):
            weights = LoraWeights.random(
                shapes, TARGETS, args.rank, i, str(model_dir), std=0.02, alpha=args.rank
            )
            store.publish(user, weights, base_fingerprint=fp)
        source = f"random rank-{args.rank} adapters over the untrained item-token {args.model}"
    if args.replicas > 1:
        report = previous_report(args.out)
        report["replicas"] = measure_replicas(args, model_dir, store_dir, dataset) | {
            "model": str(model_dir), "adapters": source,
        }  # fmt: skip
        write_json_atomic(args.out, report)
        plot(report, args.out.with_suffix(".png"))
        print(json.dumps({"replicas": report["replicas"]}, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return
    layouts = ["none", "w4a16"] if args.quantized else ["none"]
    results = {
        layout: measure(args, model_dir, store_dir, dataset, split, layout) for layout in layouts
    }
    report = {
        "command": "bench/serving.py " + " ".join(sys.argv[1:]),
        "model": str(model_dir),
        "adapters": source,
        "data": args.data,
        "catalog_items": len(dataset.catalog),
        "k": args.k,
        "seed": args.seed,
        "host": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        **{key: value for key, value in results["none"].items() if key != "quality"},
    }
    if args.quality:
        report["served_quality"] = quality_report(results, args.k, args.seed)
    if args.quantized:
        q = results["w4a16"]
        report["quantized"] = {
            "scheme": "W4A16 (llmrec.model.quantized), against the served dtype",
            "rss_mb": {layout: r["engine"]["rss_mb"] for layout, r in results.items()},
            "req_s": {
                name: {layout: r["scenarios"][name]["req_s"] for layout, r in results.items()}
                for name in q["scenarios"]
            },
            "p50_s": {
                name: {layout: r["scenarios"][name]["p50_s"] for layout, r in results.items()}
                for name in q["scenarios"]
            },
            "w4a16": {key: value for key, value in q.items() if key != "quality"},
        }
    previous = previous_report(args.out)
    if "replicas" in previous:  # --replicas's own command's section: kept, as it keeps this one
        report["replicas"] = previous["replicas"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    headline = ("ratios", "cold_load_ms", "warm_swap_ms", "first_byte_s", "stream")
    print(json.dumps({key: report[key] for key in headline}, indent=2))
    for key in ("served_quality", "quantized"):
        if key in report:
            print(json.dumps({key: report[key]}, indent=2))
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")
    shutil.rmtree(work, ignore_errors=True)


def plot(report: dict, path: Path) -> None:
    """Throughput and latency per scenario (every served layout side by side), and one
    engine against several when the report has ``replicas``."""
    names = list(report["scenarios"])
    layouts = {"as trained": report["scenarios"]}
    if "quantized" in report:
        layouts["4-bit"] = report["quantized"]["w4a16"]["scenarios"]
    replicas = report.get("replicas")
    fig, axes = plt.subplots(1, 3 if replicas else 2, figsize=(18 if replicas else 12, 4.5))
    left, right = axes[0], axes[1]
    x = np.arange(len(names))
    width = 0.8 / len(layouts)
    for i, (label, rows) in enumerate(layouts.items()):
        at = x - 0.4 + width * (i + 0.5)
        left.bar(at, [rows[n]["req_s"] for n in names], width=width, label=label)
        right.bar(at, [rows[n]["p50_s"] for n in names], width=width, label=f"{label} p50")
        right.scatter(at, [rows[n]["p99_s"] for n in names], marker="_", s=200, color="black")
    for axis, unit in ((left, "recommendations / s"), (right, "seconds (p99: black bars)")):
        axis.set_xticks(list(x), names, rotation=30)
        axis.set_ylabel(unit)
        axis.legend()
    left.set_title("throughput")
    right.set_title("latency per request")
    if replicas:
        rows = [replicas[key] for key in ("one_auto", "one_every_core", "many")]
        labels = ["1 engine\n(vLLM's binding)", "1 engine\n(every core)",
                  f"{replicas['engines']} engines"]  # fmt: skip
        axes[2].bar(labels, [r["req_s"] for r in rows], color=["tab:gray", "tab:gray", "tab:blue"])
        for i, r in enumerate(rows):
            axes[2].annotate(f"{r['req_s']:.2f}/s, p50 {r['p50_s']:.2f} s", (i, r["req_s"]),
                             ha="center", va="bottom")  # fmt: skip
        axes[2].set_ylabel("recommendations / s")
        axes[2].set_title(
            f"one gateway, {replicas['engines']} engines: x{replicas['ratio']:.2f} "
            f"({replicas['host']['cpus']} CPU cores)"
        )
    fig.suptitle(
        f"llmrec on vLLM: {'/'.join(Path(report['model']).parts[-2:])}, "
        f"{report['catalog_items']} items, k={report['k']}, items only; cold load "
        f"{report['cold_load_ms']:.0f} ms, warm swap {report['warm_swap_ms']:.0f} ms, first "
        f"byte {report['first_byte_s']:.2f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
