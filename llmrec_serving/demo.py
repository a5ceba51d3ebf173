"""``llmrec serve-demo``: the main job's last step, serving what ``llmrec demo`` trained.

It serves the adapter store of the demo's federated run (method ``ours``: shared + personal
adapters, found by the same config fingerprint the evaluation trained it under), picks a
cohort user with a personal adapter, makes them a temporary API key, starts the whole
stack on loopback (the managed vLLM server where vLLM is installed, else the in-process
backend), asks over REST for five recommendations with a free-text context and for one
chat answer, prints both, then revokes the key and stops everything.

    llmrec demo && llmrec serve-demo                # what `make demo` runs
    llmrec serve-demo serve.backend=inprocess       # without vLLM
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from llmrec.adapters import AdapterStore
from llmrec.data import user_sort_key
from llmrec.evaluate import federated_served_base, federated_store_dir
from llmrec_serving.config import ServingConfig

log = logging.getLogger(__name__)

METHOD = "ours"
"""The federated method whose adapters are served: shared + personal."""
CONTEXT = "something light for tonight"
"""The free-text context of the demo's recommendation request."""
QUESTION = "I have a free evening. What should I watch, and why?"
"""The demo's one chat message."""
K = 5


@dataclass(frozen=True)
class DemoResult:
    """What the demo asked and what the stack answered."""

    user: str
    backend: str
    recommendations: dict[str, Any]
    """The body of ``POST /v1/recommendations``."""
    chat: dict[str, Any]
    """The body of ``POST /v1/chat/completions``."""

    @property
    def answer(self) -> str:
        """The chat answer's text."""
        return self.chat["choices"][0]["message"]["content"]


class DemoError(RuntimeError):
    """The demo cannot run (nothing trained yet) or the stack answered with an error."""


def demo_config(cfg: ServingConfig) -> ServingConfig:
    """``cfg`` serving the federated run's store over the base it was published for, on vLLM
    only where it can run here."""
    serve = cfg.serve
    backend = serve.backend
    if backend == "vllm" and not serve.vllm_urls and importlib.util.find_spec("vllm") is None:
        log.warning("vLLM is not installed here: serving in-process (transformers + peft)")
        backend = "inprocess"
    update = {"store_dir": federated_store_dir(cfg, METHOD), "backend": backend}
    changes: dict[str, Any] = {"serve": serve.model_copy(update=update)}
    base = federated_served_base(cfg, METHOD)
    if base is not None:  # an item-token run: its adapters go with its own base version
        changes["model"] = cfg.model.model_copy(update={"name_or_path": str(base)})
    return cfg.model_copy(update=changes)


def pick_user(store: AdapterStore) -> str:
    """The first (in id order) cohort user with a personal adapter of their own."""
    users = store.users()  # a federated run publishes personal adapters for its cohort only
    if not users:
        raise DemoError(
            f"{store.root} holds no personal adapter: run `llmrec demo` first "
            f"(its evaluation trains the federated method {METHOD!r})"
        )
    return min(users, key=user_sort_key)


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body)
    if r.status_code != 200:
        raise DemoError(f"POST {path}: {r.status_code} {r.text[:500]}")
    return r.json()


def run_demo(cfg: ServingConfig) -> DemoResult:
    """Serve the federated run, ask as one of its users, stop; the key is always revoked."""
    from llmrec_serving.app import create_app, serve_in_thread
    from llmrec_serving.services import build_services

    cfg = demo_config(cfg)
    if not cfg.store_dir.is_dir():
        raise DemoError(
            f"no federated run for this config at {cfg.store_dir.parent}: run `llmrec demo` "
            "first, with the same config and overrides"
        )
    user = pick_user(AdapterStore(cfg.store_dir))
    services = build_services(cfg)
    key = services.keys.add(user)
    try:
        startup = cfg.serve.vllm_startup_timeout_s + 60
        with serve_in_thread(create_app(services), cfg.serve.host, startup) as url:
            headers = {"Authorization": f"Bearer {key}"}
            timeout = cfg.serve.limits.request_timeout_s + 10
            with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
                recommendations = _post(
                    client, "/v1/recommendations", {"k": K, "context": CONTEXT, "explain": True}
                )
                chat = _post(
                    client,
                    "/v1/chat/completions",
                    {"model": "llmrec", "messages": [{"role": "user", "content": QUESTION}]},
                )
    finally:
        services.keys.revoke_key(key)
    return DemoResult(user, services.engines.kind, recommendations, chat)


def show(result: DemoResult, console: Console) -> None:
    """Print the ranked items with their reasons, then the chat answer."""
    rec = result.recommendations
    table = Table(
        title=f"POST /v1/recommendations: user {result.user}, adapter {rec['adapter']}, "
        f'context "{CONTEXT}" ({result.backend} backend)'
    )
    for column in ("#", "item", "title", "log-prob", "reason"):
        table.add_column(column, overflow="fold")
    for item in rec["items"]:
        table.add_row(
            str(item["rank"]),
            item["item_id"],
            item["title"],
            f"{item['score']:.2f}",
            item.get("reason") or "",
        )
    console.print(table)
    title = f"POST /v1/chat/completions: user {result.user}, model {result.chat['model']}"
    console.print(Panel(f"[bold]> {QUESTION}[/bold]\n\n{result.answer}", title=title))
