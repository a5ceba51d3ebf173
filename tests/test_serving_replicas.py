"""Several engines behind one gateway: the hashing of users onto engines, and two REAL
managed vLLM CPU servers on loopback.

Affinity (a user's requests go to one engine, where their adapter stays loaded), hot swap on
either engine, and failover (an engine killed: its users move to the other one, which loads
their adapters on demand; nothing but 2xx, 429 or 503 meanwhile). Which engine served is
read from the gateway's /metrics and from each engine's own list of loaded adapters.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter

import httpx
import pytest

from llmrec.config import ConfigError
from llmrec.launch import free_ports
from llmrec.pseudonyms import served_name
from llmrec_serving.app import create_app, serve_in_thread
from llmrec_serving.config import load_serving_config
from llmrec_serving.releases import cpu_shares
from llmrec_serving.replicas import rendezvous_order
from llmrec_serving.services import build_services

USERS = [str(u) for u in range(4, 14)]
"""Users given adapters here (the serving world's 1 and 2 keep theirs)."""


# --------------------------------------------------------------------------- no engines


def test_users_spread_evenly_and_only_a_removed_engines_users_move():
    names = [f"engine-{i}" for i in range(3)]
    users = [str(u) for u in range(3000)]
    first = {u: names[rendezvous_order(u, names)[0]] for u in users}
    counts = Counter(first.values())
    assert all(900 < counts[n] < 1100 for n in names), counts
    assert rendezvous_order("42", names) == rendezvous_order("42", list(names))  # stable
    # engine-2 goes: only its users move, and they split over the two others.
    left = names[:2]
    after = {u: left[rendezvous_order(u, left)[0]] for u in users}
    moved = {u for u in users if after[u] != first[u]}
    assert moved == {u for u in users if first[u] == "engine-2"}
    assert 400 < sum(after[u] == "engine-0" for u in moved) < 600
    # ... and each moves to its second choice, the failover order.
    assert all(after[u] == names[rendezvous_order(u, names)[1]] for u in moved)


def test_managed_engines_get_their_own_cores():
    assert cpu_shares(2, [0, 1]) == ["0", "1"]
    assert cpu_shares(3, list(range(8))) == ["0,1", "2,3,4", "5,6,7"]
    with pytest.raises(ValueError, match="at least 3 CPU cores"):
        cpu_shares(3, [0, 1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["serve.replicas=2", "serve.backend=inprocess"], "replicas > 1"),
        (["serve.replicas=2", "serve.vllm_urls=[http://a:1]"], "replicas > 1"),
        (["serve.vllm_urls=[http://a:1, http://a:1]"], "twice"),
        (["serve.vllm_urls=[http://a:1]", "serve.backend=inprocess"], "needs backend=vllm"),
        (["serve.replicas=0"], "serve.replicas"),
    ],
)
def test_engine_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_serving_config(None, overrides)


# --------------------------------------------------------------------------- two vLLM engines


@pytest.fixture(scope="module")
def gateway(serving_world):
    """(base url, services): a gateway over two managed vLLM servers that are not restarted
    when they die (so a killed one stays dead), stopped after the module."""
    for i, user in enumerate(USERS):
        serving_world.publish(user, seed=400 + i)
    cfg = load_serving_config(
        None,
        [
            *serving_world.overrides,
            "serve.backend=vllm",
            "serve.replicas=2",
            f"serve.vllm_port={free_ports(2)}",
            "serve.vllm_max_restarts=0",
            "serve.cpu_threads=nobind",
            "serve.kv_cache_gib=1",
            "serve.max_cpu_loras=8",
            "serve.max_loras=2",
            "serve.engine_probe_s=0.5",
            "serve.store_poll_s=0.5",
        ],
    )
    services = build_services(cfg)
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=900) as url:
        yield url, services
    assert all(e.backend.server.pid is None for e in services.engines), "vLLM outlived it"


def ask(url, world, user: str, history=("m1", "m2")) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/recommendations",
        json={"user": user, "history": list(history), "k": 3, "explain": False},
        headers={"Authorization": f"Bearer {world.keys['admin']}"},
        timeout=300,
    )


def recommend(url, world, user: str) -> dict:
    r = ask(url, world, user)
    assert r.status_code == 200, r.text
    return r.json()


def on_engine(engine) -> set[str]:
    """The adapters the vLLM server itself lists (asked with its own key)."""
    key = {"Authorization": f"Bearer {engine.backend.server.spec.api_key}"}
    listed = httpx.get(f"{engine.backend.url}/v1/models", headers=key, timeout=10).json()
    return {m["id"] for m in listed["data"] if m.get("parent")}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics, 0 when absent (prometheus_client writes the
    labels sorted by name)."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    sample = f"{name}{{{inner}}}" if labels else name
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def homed(services, engine_index: int) -> list[str]:
    """USERS whose first choice is engine ``engine_index``."""
    engine = services.engines[engine_index]
    return [u for u in USERS if services.engines.order(u)[0] is engine]


@pytest.mark.slow
def test_both_engines_serve_and_each_user_sticks_to_one(gateway, serving_world):
    url, services = gateway
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready"
    assert {n: e["up"] for n, e in ready["engines"].items()} == {
        "engine-0": True,
        "engine-1": True,
    }
    first, second = homed(services, 0), homed(services, 1)
    assert first and second, "the hash puts every test user on one engine"
    for user in (first[0], second[0]):
        home = services.engines.order(user)[0]
        before = httpx.get(f"{url}/metrics").text
        answers = [recommend(url, serving_world, user) for _ in range(2)]
        after = httpx.get(f"{url}/metrics").text
        assert {a["adapter"] for a in answers} == {f"{user}@v1"}
        for engine in services.engines:
            sent = metric(after, "llmrec_engine_requests_total", engine=engine.name) - metric(
                before, "llmrec_engine_requests_total", engine=engine.name
            )
            held = f"{user}@v1" in on_engine(engine)
            listed = metric(
                after,
                "llmrec_engine_adapter",
                engine=engine.name,
                adapter=served_name(f"{user}@v1"),
            )
            assert (sent, held, listed) == ((2, True, 1) if engine is home else (0, False, 0))
        # the second request found the adapter loaded
        assert metric(after, "llmrec_adapter_cache_hits_total") > metric(
            before, "llmrec_adapter_cache_hits_total"
        )


@pytest.mark.slow
def test_hot_swap_on_either_engine(gateway, serving_world):
    url, services = gateway
    for index in (0, 1):
        user = homed(services, index)[1]
        engine = services.engines[index]
        first = recommend(url, serving_world, user)
        serving_world.publish(user, seed=900 + index)
        second = recommend(url, serving_world, user)
        assert (first["adapter"], second["adapter"]) == (f"{user}@v1", f"{user}@v2")
        assert [i["score"] for i in first["items"]] != pytest.approx(
            [i["score"] for i in second["items"]], abs=1e-3
        )
        loaded = on_engine(engine)
        assert f"{user}@v2" in loaded and f"{user}@v1" not in loaded
        assert not {f"{user}@v1", f"{user}@v2"} & on_engine(services.engines[1 - index])


@pytest.mark.slow
def test_a_killed_engine_hands_its_users_to_the_other(gateway, serving_world):
    url, services = gateway
    dead, alive = services.engines[0], services.engines[1]
    movers, stayers = homed(services, 0), homed(services, 1)
    for user in movers[:2] + stayers[:2]:
        recommend(url, serving_world, user)
    os.killpg(dead.backend.server.pid, signal.SIGKILL)
    statuses: dict[str, list[int]] = {u: [] for u in movers[:2] + stayers[:2]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for user in statuses:
            statuses[user].append(ask(url, serving_world, user).status_code)
        if all(s[-3:] == [200] * 3 for s in statuses.values()):
            break
    seen = {code for codes in statuses.values() for code in codes}
    assert seen <= {200, 429, 503}, statuses
    assert all(s[-3:] == [200] * 3 for s in statuses.values()), statuses
    assert all(code == 200 for user in stayers[:2] for code in statuses[user]), statuses
    # The movers' adapters were loaded on the engine that stands in, on demand.
    served = [recommend(url, serving_world, user)["adapter"] for user in movers[:2]]
    assert set(served) <= on_engine(alive) and set(served).isdisjoint(dead.router.loaded)
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready"
    assert (ready["engines"]["engine-0"]["up"], ready["engines"]["engine-1"]["up"]) == (False, True)
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "llmrec_engine_up", engine="engine-0") == 0
    assert metric(text, "llmrec_engine_up", engine="engine-1") == 1
