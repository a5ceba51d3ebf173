"""Conversations with the real SmolLM2-135M over the gateway's agent API (ML-100K).

Asserts what must hold whatever the model writes: every card is a real catalog item,
constraints and exclusions hold, follow-ups refer to the previous answer, feedback lands
in the profile at once. The conversation is written to results/agent-transcript.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmrec_serving.app import create_app
from llmrec_serving.config import load_serving_config
from llmrec_serving.keys import KeyStore
from llmrec_serving.services import build_services

pytestmark = pytest.mark.slow
TRANSCRIPT = Path(__file__).resolve().parent.parent / "results" / "agent-transcript.md"
USER = "1"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-slow")
    keys = KeyStore(tmp / "keys.json")
    key = keys.add(USER)
    cfg = load_serving_config(
        None,
        [
            "serve.backend=inprocess",
            f"serve.store_dir={tmp / 'adapters'}",  # empty: the base model answers
            f"serve.keys_file={keys.path}",
            f"profile.url=sqlite:///{tmp / 'profiles.db'}",
            f"fed.output_dir={tmp / 'fed'}",
        ],
    )
    services = build_services(cfg)
    with TestClient(create_app(services)) as client:
        yield client, services, {"Authorization": f"Bearer {key}"}


class Chat:
    def __init__(self, client, headers):
        self.client, self.headers = client, headers
        self.conversation = None
        self.lines = ["# A chat with the personal agent (SmolLM2-135M, ML-100K user 1)", ""]

    def say(self, message: str):
        body = {"message": message, "conversation_id": self.conversation}
        with self.client.stream("POST", "/v1/agent/chat", json=body, headers=self.headers) as r:
            assert r.status_code == 200
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
        assert events[-1]["type"] == "done", events
        self.conversation = events[0]["conversation_id"]
        self.lines += [f"**user:** {message}", "", f"**agent:** {events[-1]['text']}", ""]
        return events[-1]["text"], [c for e in events if e["type"] == "cards" for c in e["cards"]]


def test_a_conversation(gateway):
    client, services, headers = gateway
    catalog = services.catalog
    chat = Chat(client, headers)
    seen = set(services.profiles.base_histories[USER])

    def history():
        return [
            i["item_id"] for i in client.get("/v1/me/history", headers=headers).json()["history"]
        ]

    try:
        text, cards = chat.say("Something like Heat but funnier")
        assert "Heat (1995)" in text and cards
        for c in cards:
            assert c["item_id"] in catalog and c["item_id"] not in seen
            assert "Comedy" in catalog[c["item_id"]].genres and c["title"] != "Heat (1995)"

        text, cards = chat.say("no horror, something from the 80s")
        assert cards
        for c in cards:
            item = catalog[c["item_id"]]
            assert 1980 <= item.year <= 1989 and "Horror" not in item.genres
            assert c["item_id"] not in seen
        picks = [c["item_id"] for c in cards]

        text, why = chat.say("why the second?")
        assert [c["item_id"] for c in why] == [picks[1]] and catalog.display(picks[1]) in text

        text, more = chat.say("more like the second")
        assert more and not {c["item_id"] for c in more} & set(picks)
        liked = more[0]["item_id"]

        chat.say("I watched it, loved it")
        assert history()[-1] == liked

        text, cards = chat.say("recommend three movies")
        assert len(cards) == 3 and liked not in {c["item_id"] for c in cards}
        never = cards[0]["item_id"]
        chat.say(f"never show me {catalog[never].title}")
        exclusions = client.get("/v1/me/history", headers=headers).json()["exclusions"]
        assert never in [i["item_id"] for i in exclusions]

        _, cards = chat.say("recommend five movies")
        assert len(cards) == 5 and never not in {c["item_id"] for c in cards}
        assert set(history()).isdisjoint(c["item_id"] for c in cards)
    finally:
        TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
        TRANSCRIPT.write_text("\n".join(chat.lines) + "\n")
