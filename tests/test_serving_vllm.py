"""The gateway in front of the REAL vLLM OpenAI server (CPU build) on loopback.

One module-scoped gateway starts a managed vLLM server for the tiny Llama
and an adapter store with two users' adapters and a shared one; every test then talks HTTP
to the gateway, with httpx and the official openai client, as a user would.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from llmrec.recommend.reasons import write_reason
from llmrec_serving.app import create_app, serve_in_thread
from llmrec_serving.config import load_serving_config
from llmrec_serving.engines import cpu_lora_slots
from llmrec_serving.services import build_services

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(serving_world, vllm_overrides):
    """(base url, services) of a gateway + managed vLLM server, stopped after the module."""
    cfg = load_serving_config(
        None,
        [*serving_world.overrides, *vllm_overrides],
    )
    services = build_services(cfg)
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=600) as url:
        yield url, services
    assert services.engines[0].backend.server.pid is None, "vLLM outlived the gateway"


def headers(world, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.keys[who]}"}


def engine_key(services) -> dict[str, str]:
    """The managed engine's own key (only the gateway has it)."""
    return {"Authorization": f"Bearer {services.engines[0].backend.server.spec.api_key}"}


def recommend(url, world, who: str, **body) -> dict:
    if who not in world.keys:
        body, who = body | {"user": who}, "admin"
    r = httpx.post(f"{url}/v1/recommendations", json=body, headers=headers(world, who), timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_user_is_ranked_by_vllm_with_their_own_adapter(
    gateway, serving_world, library_ranking
):
    url, services = gateway
    history = list(services.profiles.base_histories["1"])
    mine = recommend(url, serving_world, "1", history=history)
    theirs = recommend(url, serving_world, "2", history=history)
    assert (mine["adapter"], theirs["adapter"]) == ("1@v1", "2@v1")
    scores = [i["score"] for i in mine["items"]]
    assert [i["score"] for i in theirs["items"]] != pytest.approx(scores, abs=1e-2)
    # vLLM's ranking is the library's ranking with the same adapter, and not the base's.
    expected = library_ranking(services.catalog, serving_world.store.current("1").path, history)
    assert [i["item_id"] for i in mine["items"]] == [i for i, _ in expected]
    assert scores == pytest.approx([s for _, s in expected], abs=2e-2)
    base = library_ranking(services.catalog, None, history)
    assert scores != pytest.approx([s for _, s in base], abs=1e-2)
    seen = set(history)
    assert all(i["item_id"] in services.catalog and i["item_id"] not in seen for i in mine["items"])


def test_an_adapter_swapped_out_and_back_ranks_as_before(gateway, serving_world, library_ranking):
    """More adapters than the engine's slots (``serve.max_loras=2``): user 1's adapter leaves
    its slot and is written back (``cpu_lora_slots``), and still ranks as the library does."""
    url, services = gateway
    history = list(services.profiles.base_histories["1"])
    for user, seed in (("7", 70), ("8", 80)):
        serving_world.publish(user, seed=seed)
    first = recommend(url, serving_world, "1", history=history)
    for user in ("7", "8", "2", "7"):
        recommend(url, serving_world, user, history=history)
    again = recommend(url, serving_world, "1", history=history)
    expected = library_ranking(services.catalog, serving_world.store.current("1").path, history)
    for reply in (first, again):
        assert [i["item_id"] for i in reply["items"]] == [i for i, _ in expected]
        assert [i["score"] for i in reply["items"]] == pytest.approx(
            [s for _, s in expected], abs=2e-2
        )
    log = services.engines[0].backend.server.log_file.read_text()
    assert cpu_lora_slots.INSTALLED_MESSAGE in log


def test_the_engine_log_names_no_user(gateway, serving_world):
    """vLLM logs every adapter it loads by name and path; its log holds pseudonyms instead."""
    url, services = gateway
    recommend(url, serving_world, "1")
    text = services.engines[0].backend.server.log_file.read_text(errors="replace")
    loads = [line for line in text.splitlines() if "Loaded new LoRA adapter" in line]
    assert loads and all("'u-" in line for line in loads), loads
    assert not re.search(r"(?<![\w.-])[12](@v1|/v0001)", text)


def test_reasons_state_the_items_facts(gateway, serving_world):
    url, services = gateway
    history = list(services.profiles.base_histories["1"])
    body = recommend(url, serving_world, "1", k=2, explain=True, history=history)
    reasoner = services.ranker.reasoner
    for item in body["items"]:
        facts = reasoner.facts(item["item_id"], history)
        assert item["reason"] == write_reason(facts)
        assert reasoner.checker.problems(item["reason"], facts) == []


def test_chat_with_the_openai_client(gateway, serving_world):
    url, services = gateway
    messages = [{"role": "user", "content": "Recommend me a movie for tonight."}]
    answers = {}
    for who in ("1", "2"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=serving_world.keys[who])
        full = client.chat.completions.create(
            model="llmrec-raw", messages=messages, max_tokens=16, temperature=0
        )
        assert full.model == f"{who}@v1"
        stream = client.chat.completions.create(
            model="llmrec-raw", messages=messages, max_tokens=16, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == full.choices[0].message.content
        answers[who] = streamed
    assert answers["1"] != answers["2"]
    # the default model is the agent: its answer names catalog items, ranked by vLLM
    agent = client.chat.completions.create(model="llmrec", messages=messages)
    picks = [line[3:].split(" — ")[0] for line in agent.choices[0].message.content.splitlines()]
    picks = [p for p in picks if services.catalog.by_display(p)]
    assert agent.model == "llmrec" and len(picks) == 3


def test_cold_start_user_is_served_the_shared_adapter(gateway, serving_world):
    url, _ = gateway
    assert recommend(url, serving_world, "3")["adapter"] == "_shared@v1"


def test_hot_swap_without_restart(gateway, serving_world):
    url, services = gateway
    pid = services.engines[0].backend.server.pid
    serving_world.publish("5", seed=50)
    first = recommend(url, serving_world, "5", history=["m1", "m2"])
    serving_world.publish("5", seed=51)
    second = recommend(url, serving_world, "5", history=["m1", "m2"])
    assert (first["adapter"], second["adapter"]) == ("5@v1", "5@v2")
    assert [i["score"] for i in first["items"]] != pytest.approx(
        [i["score"] for i in second["items"]], abs=1e-2
    )
    assert services.engines[0].backend.server.pid == pid
    listed = httpx.get(f"{services.engines[0].backend.url}/v1/models", headers=engine_key(services))
    listed = listed.json()["data"]
    loaded = {m["id"] for m in listed if m.get("parent")}
    assert "5@v2" in loaded and "5@v1" not in loaded
    assert len(loaded) <= services.engines[0].router.capacity


def test_republished_user_is_not_served_stale_weights(gateway, serving_world):
    url, _ = gateway
    serving_world.publish("6", seed=60)
    before = recommend(url, serving_world, "6", history=["m1"])
    serving_world.store.delete("6")
    serving_world.publish("6", seed=61)
    after = recommend(url, serving_world, "6", history=["m1"])
    assert before["adapter"] == after["adapter"] == "6@v1"
    assert [i["score"] for i in before["items"]] != pytest.approx(
        [i["score"] for i in after["items"]], abs=1e-2
    )


def test_auth_isolation(gateway, serving_world):
    url, _ = gateway
    rec = f"{url}/v1/recommendations"
    assert httpx.post(rec, json={}).status_code == 401
    assert (
        httpx.post(rec, json={"user": "2"}, headers=headers(serving_world, "1")).status_code == 403
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="lrk_wrong").chat.completions.create(
            model="llmrec", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(
            base_url=f"{url}/v1", api_key=serving_world.keys["1"]
        ).chat.completions.create(
            model="llmrec", messages=[{"role": "user", "content": "hi"}], user="2"
        )


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/recommendations", {"k": 0}),
        ("/v1/recommendations", {"history": ["nope"]}),
        ("/v1/chat/completions", {"model": "m", "messages": []}),
        ("/v1/chat/completions", {"model": "llmrec-raw", "messages": [{"role": "user", "content": "w " * 3000}]}),  # noqa: E501
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}),  # noqa: E501
    ],
)  # fmt: skip
def test_bad_inputs_are_4xx(gateway, serving_world, path, body):
    url, _ = gateway
    r = httpx.post(f"{url}{path}", json=body, headers=headers(serving_world, "1"), timeout=60)
    assert 400 <= r.status_code < 500, r.text


def test_readiness_and_metrics(gateway):
    url, _ = gateway
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "vllm"
    text = httpx.get(f"{url}/metrics").text
    assert "llmrec_adapter_load_seconds_count" in text and "llmrec_adapter_cache_hits_total" in text


# The routes vLLM's security guide names as unauthenticated (its --api-key covers /v1 only),
# and the runtime LoRA routes: whatever this vLLM version lists, these are asked too.
ENGINE_ONLY = (
    "/pause", "/resume", "/is_paused", "/update_weights", "/invocations", "/collective_rpc",
    "/reset_prefix_cache", "/sleep", "/wake_up", "/is_sleeping", "/server_info", "/version",
    "/health", "/ping", "/tokenize", "/detokenize", "/start_profile", "/stop_profile",
    "/scale_elastic_ep", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/v1/completions", "/v1/embeddings", "/v1/responses",
)  # fmt: skip


def test_the_engine_stays_behind_the_gateway(gateway, serving_world):
    url, services = gateway
    engine = services.engines[0].backend.url
    assert engine.startswith("http://127.0.0.1:")
    # The engine has its own key: neither none nor a gateway key opens its /v1.
    assert httpx.get(f"{engine}/v1/models").status_code == 401
    assert httpx.get(f"{engine}/v1/models", headers=engine_key(services)).status_code == 200
    assert (
        httpx.get(f"{engine}/v1/models", headers=headers(serving_world, "admin")).status_code == 401
    )
    listed = httpx.get(f"{engine}/openapi.json").json()["paths"]
    assert "/v1/load_lora_adapter" in listed  # what this test is about is really there
    gateway_paths = set(httpx.get(f"{url}/openapi.json").json()["paths"])
    gateway_paths |= {"/", "/static/{name}", "/docs", "/docs/oauth2-redirect", "/redoc"}
    body = {"lora_name": "1@v1", "lora_path": str(serving_world.store.root), "model": "x"}
    asked = 0
    for template in sorted((set(listed) | set(ENGINE_ONLY)) - gateway_paths):
        path = re.sub(r"\{[^}]+\}", "x", template)
        for method in ("GET", "POST", "PUT", "DELETE"):
            r = httpx.request(
                method, f"{url}{path}", json=body, headers=headers(serving_world, "admin")
            )
            assert r.status_code in (404, 405), (method, path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == r.status_code  # the gateway's own refusal
            asked += 1
    assert asked >= 4 * len(ENGINE_ONLY)
