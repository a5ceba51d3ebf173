"""The agent's REST routes on the gateway (in-process backend, tiny model): streaming chat,
feedback that changes the next answer, history edits, export, delete, auth and 4xx."""

from __future__ import annotations

import io
import json
import logging
import zipfile

import pytest
from fastapi.testclient import TestClient

from llmrec.pseudonyms import RedactFilter
from llmrec_serving.app import create_app
from llmrec_serving.config import load_serving_config
from llmrec_serving.services import build_services


@pytest.fixture(scope="module")
def services(serving_world):
    cfg = load_serving_config(
        None,
        [
            *serving_world.overrides,
            "serve.backend=inprocess",
            "serve.explain_max_tokens=6",
            f"profile.url=sqlite:///{serving_world.tmp / 'profiles.db'}",
            f"fed.output_dir={serving_world.tmp / 'fed'}",
        ],
    )
    return build_services(cfg)


@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_app(services)) as c:
        yield c


def auth(world, who):
    return {"Authorization": f"Bearer {world.keys[who]}"}


def chat(client, world, who, message, conversation=None, **params):
    body = {"message": message, "conversation_id": conversation}
    with client.stream(
        "POST", "/v1/agent/chat", json=body, headers=auth(world, who), params=params
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "conversation" and events[-1]["type"] == "done", events
    cards = [c for e in events if e["type"] == "cards" for c in e["cards"]]
    return events[0]["conversation_id"], events[-1]["text"], cards


def test_chat_streams_grounded_cards_and_feedback_applies_at_once(client, services, serving_world):
    seen = set(services.profiles.base_histories["1"])
    conversation, text, cards = chat(client, serving_world, "1", "recommend three movies")
    assert len(cards) == 3 and text.count("\n") >= 3
    assert all(c["item_id"] in services.catalog and c["item_id"] not in seen for c in cards)
    down = cards[0]["item_id"]
    r = client.post(
        "/v1/me/feedback",
        json={"item_id": down, "action": "down"},
        headers=auth(serving_world, "1"),
    )
    assert r.status_code == 200 and down in [i["item_id"] for i in r.json()["exclusions"]]
    _, _, again = chat(client, serving_world, "1", "recommend three movies", conversation)
    assert down not in {c["item_id"] for c in again}
    up = again[0]["item_id"]
    r = client.post(
        "/v1/me/feedback", json={"item_id": up, "action": "up"}, headers=auth(serving_world, "1")
    )
    body = r.json()
    assert body["history"][-1]["item_id"] == up and body["refresh_queued"]
    messages = client.get(
        f"/v1/agent/conversations/{conversation}", headers=auth(serving_world, "1")
    ).json()
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2


def test_history_edits(client, services, serving_world):
    h = auth(serving_world, "2")
    before = [i["item_id"] for i in client.get("/v1/me/history", headers=h).json()["history"]]
    assert before == list(services.profiles.base_histories["2"])
    new = next(i for i in services.catalog.ids if i not in before)
    r = client.post("/v1/me/history", json={"add": [new], "remove": [before[0]]}, headers=h)
    after = [i["item_id"] for i in r.json()["history"]]
    assert after == [*before[1:], new]
    r = client.post("/v1/me/exclusions", json={"add": [before[1]]}, headers=h)
    assert [i["item_id"] for i in r.json()["exclusions"]] == [before[1]]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/me/history", {"add": ["no-such-item"]}, 404),
        ("POST", "/v1/me/history", {"add": "m1"}, 422),
        ("POST", "/v1/me/history", {"surprise": 1}, 422),
        ("POST", "/v1/me/feedback", {"item_id": "m1", "action": "love"}, 422),
        ("POST", "/v1/me/feedback", {"item_id": "nope", "action": "up"}, 404),
        ("POST", "/v1/agent/chat", {"message": ""}, 422),
        ("POST", "/v1/agent/chat", {"message": "x" * 9000}, 422),
        ("POST", "/v1/agent/chat", {"message": "hi", "conversation_id": "not-mine"}, 404),
        ("GET", "/v1/agent/conversations/not-mine", None, 404),
        ("GET", "/v1/me/history?user=2", None, 403),
        ("GET", "/v1/me/history?user=../x", None, 422),
        ("GET", "/v1/me/history?usr=1", None, 422),  # a typo is not ignored
        ("GET", "/v1/me/history?user=1&user=2", None, 422),
        ("GET", "/static/index.py", None, 404),
        ("GET", "/static/..%2Fapp.py", None, 404),
    ],
)
def test_bad_requests_get_clear_4xx(client, serving_world, method, path, body, status):
    r = client.request(method, path, json=body, headers=auth(serving_world, "1"))
    assert r.status_code == status, r.text
    if path.startswith("/v1"):
        assert r.json()["error"]["message"]


def test_auth(client, serving_world):
    assert client.get("/v1/me/history").status_code == 401
    bad = {"Authorization": "Bearer lrk_nope"}
    assert client.post("/v1/agent/chat", json={"message": "hi"}, headers=bad).status_code == 401
    admin = auth(serving_world, "admin")
    assert client.get("/v1/me/history", headers=admin).status_code == 400  # names nobody
    assert client.get("/v1/me/history?user=2", headers=admin).json()["user"] == "2"


def test_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_export_then_delete(client, services, serving_world):
    store = serving_world.store
    serving_world.publish("9", seed=9)
    keys = services.keys
    key = keys.add("9")
    h = {"Authorization": f"Bearer {key}"}
    chat_id, _, _ = chat(client, serving_world, "1", "hello")
    r = client.get("/v1/me/adapter", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    names = sorted(zipfile.ZipFile(io.BytesIO(r.content)).namelist())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    exported = serving_world.tmp / "9.zip"
    exported.write_bytes(r.content)
    assert store.import_zip("9-copy", exported).adapter_name == "9-copy@v1"  # validated
    assert client.get("/v1/me/adapter", headers=auth(serving_world, "3")).status_code == 404

    client.post("/v1/me/feedback", json={"item_id": "m1", "action": "up"}, headers=h)
    report = client.delete("/v1/me", headers=h).json()
    assert report["adapters"] and report["keys"] == 1 and report["profile"]["feedback"] == 1
    assert client.get("/v1/me/history", headers=h).status_code == 401  # the key is gone
    assert store.current("9") is None
    gone = client.get("/v1/me/history?user=9", headers=auth(serving_world, "admin")).json()
    assert gone["history"] == [] and gone["feedback"] == [] and gone["exclusions"] == []
    # Only user 9's data went: user 1's conversation is still there.
    assert client.get(f"/v1/agent/conversations/{chat_id}", headers=auth(serving_world, "1")).json()


def test_a_refused_turn_is_a_status_code_not_a_started_stream(client, services, serving_world):
    """Under load the agent's chat is refused before its 200 (503 + Retry-After), as every
    other route is: never a 200 whose stream then says it could not run."""
    admission = services.admission
    saved = admission.running, admission.max_queue
    admission.running, admission.max_queue = admission.max_concurrency, 0  # all busy, no queue
    try:
        r = client.post("/v1/agent/chat", json={"message": "recommend me 2"},
                        headers=auth(serving_world, "1"))  # fmt: skip
    finally:
        admission.running, admission.max_queue = saved
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error"]["message"]
    _, _, cards = chat(client, serving_world, "1", "recommend me 2")  # once it has room: 200
    assert cards


def test_an_erased_user_is_named_in_no_log_line_and_no_file(
    client, services, serving_world, caplog
):
    """Everything a user does (their adapter loaded, a recommendation, the agent's chat,
    feedback, history edits, an export, then DELETE /v1/me) leaves no log line with their id,
    and the erasure leaves no file with it: not the profile database (its marker is a digest),
    the adapter store, the key file, nor the client state."""
    who = "erin-5501"
    serving_world.publish(who, seed=11)
    h = {"Authorization": f"Bearer {services.keys.add(who)}"}
    admin = auth(serving_world, "admin")
    caplog.handler.addFilter(RedactFilter())  # as `llmrec serve`'s handler has it
    with caplog.at_level(logging.DEBUG):
        assert client.post("/v1/me/history", json={"add": ["m1", "m2"]}, headers=h).is_success
        assert client.post("/v1/recommendations", json={"k": 3}, headers=h).is_success
        assert client.post("/v1/me/feedback", json={"item_id": "m3", "action": "up"}, headers=h)
        with client.stream("POST", "/v1/agent/chat", params={"user": who}, headers=admin,
                           json={"message": "recommend me 2"}) as r:  # fmt: skip
            assert r.status_code == 200 and r.read()
        assert client.get("/v1/me/adapter", headers=h).is_success
        assert client.delete("/v1/me", headers=h).is_success
    # The server's lines: httpx's are this test client's own requests (the query string).
    lines = [caplog.handler.format(r) for r in caplog.records if not r.name.startswith("httpx")]
    assert any("POST /v1/agent/chat 200" in line for line in lines)  # the access log is there
    assert any("erased" in line for line in lines)
    assert [line for line in lines if who in line] == []
    files = [p for p in serving_world.tmp.rglob("*") if p.is_file()]
    assert any(p.name == "profiles.db" for p in files) and any(p.name == "keys.json" for p in files)
    assert [p for p in files if who.encode() in p.read_bytes()] == []
