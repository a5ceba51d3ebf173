"""Two gateway processes on one PostgreSQL profile database: no acknowledged write is lost.

Each gateway is its own ``llmrec serve`` process (in-process backend, the tiny model); both
take the same users' feedback at once, first accesses included (a first access imports the
user's history, a read-then-write that two processes may race). Every write answered 200
must be in the database afterwards, and nothing may be answered 5xx.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmrec.agent import ProfileStore

pytestmark = pytest.mark.slow

USERS = ("1", "2", "3", "4", "5", "6")


def _start(overrides: list[str], port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "llmrec", "serve", *overrides, f"serve.port={port}"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(url: str, gateway: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert gateway.poll() is None, "the gateway exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def test_two_gateways_lose_no_acknowledged_write(
    serving_world, postgres, free_port, tiny_dataset, tmp_path
):
    url = postgres("two_gateways")
    overrides = [*serving_world.overrides, "serve.backend=inprocess", f"profile.url={url}"]
    ports = [free_port(), free_port()]
    log = (tmp_path / "gateways.log").open("wb")
    gateways = [_start(overrides, port, log) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for gateway_url, gateway in zip(urls, gateways, strict=True):
            _wait_ready(gateway_url, gateway)
        admin = {"Authorization": f"Bearer {serving_world.keys['admin']}"}
        jobs = [
            (urls[n % 2], user, item)
            for user in USERS
            for n, item in enumerate(
                i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories[user]
            )
        ]

        def send(job) -> tuple[str, str, int]:
            gateway_url, user, item = job
            r = httpx.post(
                f"{gateway_url}/v1/me/feedback",
                params={"user": user},
                json={"item_id": item, "action": "down"},
                headers=admin,
                timeout=120,
            )
            return user, item, r.status_code

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, jobs))
    finally:
        for gateway in gateways:
            gateway.terminate()
        for gateway in gateways:
            gateway.wait(timeout=60)
    statuses = sorted({status for _, _, status in answers})
    assert statuses == [200], (statuses, (tmp_path / "gateways.log").read_text()[-3000:])
    store = ProfileStore(url, tiny_dataset.catalog, tiny_dataset.histories)
    for user in USERS:
        acked = sorted(item for u, item, _ in answers if u == user)
        assert sorted(f.item_id for f in store.feedback(user)) == acked
        assert sorted(store.exclusions(user)) == acked
        assert store.history(user) == list(dict.fromkeys(tiny_dataset.histories[user]))
    store.close()
