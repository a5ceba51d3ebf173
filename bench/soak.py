"""Overload on loopback: the gateway at 4x its measured capacity, a mix of every kind of call.

The gateway runs as its own process (``llmrec serve``) over the serving world of the tests
(``llmrec_serving.testing.make_serving_world``: the fixture data set, per-user adapters) on the
real SmolLM2-135M item-token base (``--model tiny``: the tiny test model), on the in-process
backend or a managed vLLM server (``--backend``). The load generator must not be the
bottleneck: ``client_lag_p99_s`` says how late requests left it. Three phases:

1. unloaded: one request at a time for ``--warm`` seconds, the reference latencies;
2. capacity: ``max_concurrency + min(max_queue, max_concurrency)`` clients in a closed loop
   (every permit busy, nobody refused): completed requests per second is the capacity;
3. soak: open-loop Poisson arrivals at ``--load`` x capacity for ``--seconds``, from the
   data set's users through the admin key: recommendations (60%), chat completions (20%)
   and the agent's streamed chat (20%).

Checks: every answer is 2xx, or 429/503 with Retry-After; every admitted request (a 200)
completes (a stream ends with its ``done`` event or ``[DONE]``; a client time-out counts as a
hang); the p99 latency of admitted requests against the unloaded p99; the gateway's RSS in
the soak's last minute against its first.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py --seconds 300 --load 4 \
        serve.limits.max_concurrency=1 serve.limits.max_queue=0

Writes ``bench/reports/soak.json`` (``statuses``, ``admitted_incomplete``, ``p99_ratio``,
``rss_growth_mb``) and a PNG of the soak over time beside it. Goals (issue 17): only 2xx,
429 and 503; no admitted request incomplete; ``p99_ratio`` <= 2; flat memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmrec.atomic import write_json_atomic  # noqa: E402
from llmrec.data import load_generic  # noqa: E402
from llmrec.launch import free_port  # noqa: E402
from llmrec.model import build_tiny_model, prepare_base_model  # noqa: E402
from llmrec.model.item_vocab import prepare_item_base  # noqa: E402
from llmrec_serving.config import LimitsConfig, load_serving_config  # noqa: E402
from llmrec_serving.testing import make_serving_world  # noqa: E402

DATA = Path("tests/fixtures/tiny")
MIX = (("recommend", 0.6), ("chat", 0.2), ("agent", 0.2))
TIMEOUT_S = 120.0


@dataclass
class Outcome:
    kind: str
    started: float
    status: int  # 0: no answer (a hang or a broken connection)
    seconds: float
    complete: bool
    retry_after: bool
    lag: float
    """Seconds between the scheduled arrival and the request leaving this client."""
    error: str = ""
    """Why there was no answer (status 0)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--load", type=float, default=4.0, help="offered load / capacity")
    parser.add_argument("--warm", type=float, default=30.0, help="unloaded and capacity phases")
    parser.add_argument("--backend", choices=["inprocess", "vllm"], default="inprocess")
    parser.add_argument(
        "--model", choices=["smollm2", "tiny"], default="smollm2",
        help="the real SmolLM2-135M (item-token base), or the tiny test model",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=Path("bench/reports/soak.json"))
    parser.add_argument("overrides", nargs="*", help="serve.limits.*=... and other overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = load_generic(DATA / "interactions.csv", DATA / "catalog.csv")
        if args.model == "tiny":
            plain = build_tiny_model(root / "tiny", seed=0)
        else:
            plain = prepare_base_model()
        base = prepare_item_base(plain, dataset.catalog)
        world = make_serving_world(root / "world", base, DATA)
        port = free_port()
        overrides = [*world.overrides, f"serve.backend={args.backend}", f"serve.port={port}"]
        if args.backend == "vllm":
            overrides += [f"serve.vllm_port={free_port()}", "serve.cpu_threads=nobind",
                          "serve.kv_cache_gib=1"]  # fmt: skip
        overrides += args.overrides
        log = (root / "gateway.log").open("wb")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "llmrec", "serve", *overrides], stdout=log, stderr=log
        )
        try:
            out = asyncio.run(
                drive(
                    f"http://127.0.0.1:{port}",
                    world.keys["admin"],
                    sorted(dataset.histories),
                    gateway.pid,
                    load_serving_config(None, overrides).serve.limits,
                    args,
                )  # fmt: skip
            )
        finally:
            gateway.terminate()
            gateway.wait(timeout=120)
    out["command"] = "bench/soak.py " + " ".join(
        [
            f"--seconds {args.seconds:g}",
            f"--load {args.load:g}",
            f"--warm {args.warm:g}",
            f"--backend {args.backend}",
            f"--model {args.model}",
            f"--seed {args.seed}",
            *args.overrides,
        ]  # fmt: skip
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    timeline = out.pop("timeline")
    write_json_atomic(args.report, out)
    _plot(timeline, out, args.report.with_suffix(".png"))
    keys = ("statuses", "admitted_incomplete", "p99_ratio", "rss_growth_mb")
    print(json.dumps({k: out[k] for k in keys}))
    print(f"-> {args.report}")


async def drive(url: str, key: str, users: list[str], pid: int, limits: LimitsConfig, args) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {key}"}
    # No client-side pool limit: the gateway, not this client, decides who waits.
    pool = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=TIMEOUT_S, limits=pool
    ) as client:
        await _wait_ready(client)
        unloaded = []
        end = time.monotonic() + args.warm
        while time.monotonic() < end:
            unloaded.append(await call(client, rng.choice(users), _kind(rng), time.monotonic()))
        # Enough clients to keep every permit busy, and no more than can be admitted: a
        # refused client would only spin on 503s and take the CPU from the ones admitted.
        clients = limits.max_concurrency + min(limits.max_queue, limits.max_concurrency)
        closed = await _closed_loop(client, users, rng, clients, args.warm)
        capacity = sum(o.status == 200 for o in closed) / args.warm
        rate = args.load * capacity
        rss, soak = [], []
        start = time.monotonic()
        tasks: list[asyncio.Task] = []
        next_sample = start
        arrival = start
        while arrival < start + args.seconds:
            now = time.monotonic()
            if now >= next_sample:
                rss.append((now - start, _rss_mb(pid)))
                next_sample += 5.0
            if now < arrival:
                await asyncio.sleep(min(arrival - now, max(0.0, next_sample - now)))
                continue
            tasks.append(asyncio.create_task(call(client, rng.choice(users), _kind(rng), arrival)))
            arrival += rng.expovariate(rate)
        soak = list(await asyncio.gather(*tasks))
        rss.append((time.monotonic() - start, _rss_mb(pid)))
    admitted = [o for o in soak if o.status == 200]
    base_p99 = _p99([o.seconds for o in unloaded if o.status == 200 and o.complete])
    soak_p99 = _p99([o.seconds for o in admitted if o.complete])
    first = [m for t, m in rss if t <= 60.0]
    last = [m for t, m in rss if t >= rss[-1][0] - 60.0]
    statuses = Counter(o.status for o in soak)
    return {
        "backend": args.backend,
        "model": args.model,
        "limits": limits.model_dump(),
        "capacity_req_s": round(capacity, 3),
        "offered_req_s": round(rate, 3),
        "requests": len(soak),
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "unexpected": sum(n for code, n in statuses.items() if code not in (200, 429, 503)),
        "refused_without_retry_after": sum(
            o.status in (429, 503) and not o.retry_after for o in soak
        ),
        "admitted": len(admitted),
        "admitted_incomplete": sum(not o.complete for o in admitted),
        "hangs": statuses.get(0, 0),
        "no_answer": dict(Counter(o.error for o in soak if o.status == 0)),
        # The load generator's own delay: latencies count from the scheduled arrival, so a
        # client that falls behind would show up here and not hide as a slow gateway.
        "client_lag_p99_s": round(_p99([o.lag for o in soak]), 3),
        "unloaded_p99_s": round(base_p99, 3),
        "admitted_p99_s": round(soak_p99, 3),
        "p99_ratio": round(soak_p99 / base_p99, 3),
        "by_kind": {
            kind: {
                "requests": sum(o.kind == kind for o in soak),
                "admitted": sum(o.kind == kind for o in admitted),
                "p50_s": round(_median([o.seconds for o in admitted if o.kind == kind]), 3),
            }
            for kind, _ in MIX
        },
        "rss_mb_first_minute": round(statistics.median(first), 1),
        "rss_mb_last_minute": round(statistics.median(last), 1),
        "rss_growth_mb": round(statistics.median(last) - statistics.median(first), 1),
        "timeline": {"rss": rss, "outcomes": [(o.started - start, o.status) for o in soak]},
    }


def _kind(rng: random.Random) -> str:
    return rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]


async def call(client: httpx.AsyncClient, user: str, kind: str, started: float) -> Outcome:
    """One request of ``kind`` for ``user``, read to its end."""
    if kind == "recommend":
        request = client.build_request("POST", "/v1/recommendations", json={"user": user, "k": 10})
    elif kind == "chat":
        message = {"role": "user", "content": "Something to watch tonight?"}
        body = {"model": "llmrec", "user": user, "stream": True, "messages": [message]}
        request = client.build_request("POST", "/v1/chat/completions", json=body)
    else:
        request = client.build_request(
            "POST", "/v1/agent/chat", params={"user": user}, json={"message": "Recommend me 3"}
        )
    lag = time.monotonic() - started
    try:
        response = await client.send(request, stream=True)
        try:
            text = (await response.aread()).decode()
        finally:
            await response.aclose()
    except httpx.HTTPError as err:
        seconds = time.monotonic() - started
        return Outcome(kind, started, 0, seconds, False, False, lag, type(err).__name__)
    complete = response.status_code != 200 or (
        '"type":"done"' in text if kind == "agent" else "[DONE]" in text if kind == "chat" else True
    )
    return Outcome(
        kind, started, response.status_code, time.monotonic() - started, complete,
        "retry-after" in response.headers, lag,
    )  # fmt: skip


async def _closed_loop(client, users, rng, clients: int, seconds: float) -> list[Outcome]:
    end = time.monotonic() + seconds
    done: list[Outcome] = []

    async def one_client() -> None:
        while time.monotonic() < end:
            done.append(await call(client, rng.choice(users), _kind(rng), time.monotonic()))

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return done


async def _wait_ready(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1.0)
    raise RuntimeError("the gateway did not become ready")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no RSS for process {pid}")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _plot(timeline: dict, out: dict, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for code in sorted({s for _, s in timeline["outcomes"]}):
        times = [t for t, s in timeline["outcomes"] if s == code]
        top.hist(times, bins=60, histtype="step", label=str(code))
    top.set(ylabel="answers per bin", title=f"{out['offered_req_s']:.2f} req/s offered "
            f"({out['capacity_req_s']:.2f} capacity): p99 ratio {out['p99_ratio']}")  # fmt: skip
    top.legend(title="status")
    bottom.plot([t for t, _ in timeline["rss"]], [m for _, m in timeline["rss"]])
    bottom.set(xlabel="seconds into the soak", ylabel="gateway RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
