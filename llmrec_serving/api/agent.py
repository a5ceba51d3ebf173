"""The personal agent's routes: streaming chat, feedback, history, export, delete, the page.

Every route acts for the authenticated user only (an admin key names the user with
``?user=``); the adapter that answers is that user's own, through the same admission queue
and adapter router as every other request.

    POST   /v1/agent/chat                 {"message", "conversation_id"?} -> server-sent events
    GET    /v1/agent/conversations        the caller's conversations
    GET    /v1/agent/conversations/{id}   one conversation's messages
    POST   /v1/me/feedback                {"item_id", "action": up|down|forget}
    GET    /v1/me/history                 history, exclusions, feedback
    POST   /v1/me/history                 {"add": [...], "remove": [...]}
    POST   /v1/me/exclusions              {"add": [...], "remove": [...]}
    GET    /v1/me/adapter                 the caller's adapter as a zip (PEFT files + manifest)
    DELETE /v1/me                         delete the caller: profile, adapters, keys
    GET    /                              the chat page
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from llmrec.agent import Agent, AgentEvent, UnknownConversationError, UserErasure, erase_user
from llmrec.recommend import Grounder
from llmrec_serving.admission import Rejected
from llmrec_serving.api.deps import ActingUser, ServicesDep, known_items
from llmrec_serving.api.streams import EventStream, event_answer, open_stream
from llmrec_serving.engines import BackendError
from llmrec_serving.middleware import ClientError
from llmrec_serving.releases import Release
from llmrec_serving.schemas import (
    ChatRequest,
    FeedbackRequest,
    HistoryView,
    ItemEdit,
    ItemView,
    error_responses,
    event_stream,
    json_text,
)
from llmrec_serving.services import Services

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
"""The page's files besides index.html: only these names are ever served."""
AGENT_K = 3
"""Picks per answer unless the user asks for more: answers stay short."""

router = APIRouter()


class ZipFile(Response):
    """A zip archive (the media type the schema publishes for the adapter export)."""

    media_type = "application/zip"


# --------------------------------------------------------------------------- the agent


class GatewayTools:
    """The agent's :class:`llmrec.agent.AgentTools` on the gateway's engine: each call runs
    with the user's own adapter, behind the admission queue."""

    def __init__(self, services: Services):
        self.services = services

    async def rank(
        self, user_id: str, history: Sequence[str], k: int, excluded: set[str]
    ) -> list[tuple[str, float]]:
        """Top-k with the user's adapter."""
        s = self.services
        history = list(history)[-s.cfg.serve.limits.max_history_items :]
        async with s.admit(user_id) as lease:
            ranked = await lease.ranker.rank(lease, history, k, None, excluded)
        return [(r.item_id, r.score) for r in ranked]

    async def write(
        self, user_id: str, messages: list[dict[str, str]], max_tokens: int
    ) -> AsyncIterator[str]:
        """One greedy line from the user's adapter."""
        s = self.services
        params = s.reason_params(max_tokens)
        async with s.admit(user_id) as lease:
            async for delta in lease.chat(messages, params):
                if delta.text:
                    yield delta.text


def build_agent(services: Services) -> Agent:
    """The personal agent over ``services`` (one per app, on ``app.state.agent``)."""
    cfg = services.cfg
    agent = Agent(
        services.catalog,
        services.profiles,
        GatewayTools(services),
        Grounder(services.catalog, threshold=cfg.recommend.grounding_threshold),
        services.prompts,
        k=AGENT_K,
        max_k=cfg.serve.limits.max_k,
        reason_tokens=cfg.serve.explain_max_tokens,
        reasoner=services.ranker.reasoner,
        reasons=cfg.serve.reasons,
    )

    def new_release(release: Release) -> None:  # reasons from the served model's item space
        agent.reasoner = release.ranker.reasoner

    services.on_release.append(new_release)
    return agent


def get_agent(request: Request) -> Agent:
    """The app's agent."""
    return request.app.state.agent


AgentDep = Annotated[Agent, Depends(get_agent)]


# --------------------------------------------------------------------------- views


def _view(services: Services, item_id: str) -> ItemView:
    item = services.catalog[item_id]
    return ItemView(item_id=item_id, title=item.display, year=item.year, genres=item.genres)


def _history_view(services: Services, user: str) -> HistoryView:
    profiles, catalog = services.profiles, services.catalog
    return HistoryView(
        user=user,
        history=[_view(services, i) for i in profiles.history(user)],
        exclusions=[_view(services, i) for i in profiles.exclusions(user) if i in catalog],
        feedback=profiles.feedback(user),
        refresh_queued=profiles.queued_at(user) is not None,
    )


async def _edit(
    services: Services,
    user: str,
    edit: ItemEdit,
    remove: Callable[[str, list[str]], Any],
    add: Callable[[str, list[str]], Any],
) -> HistoryView:
    """Apply ``remove`` then ``add`` to the profile, then the caller's view of it."""
    added = known_items(services, edit.add, "add")
    removed = known_items(services, edit.remove, "remove")

    def apply() -> HistoryView:
        remove(user, removed)
        add(user, added)
        return _history_view(services, user)

    return await asyncio.to_thread(apply)


# --------------------------------------------------------------------------- the page


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    if name not in PAGE_FILES:  # a fixed list: no path from a request reaches the disk
        raise ClientError(404, "not found")
    return FileResponse(STATIC_DIR / name, media_type=PAGE_FILES[name])


# --------------------------------------------------------------------------- chat


@router.post(
    "/v1/agent/chat",
    tags=["agent"],
    response_class=EventStream,
    responses={
        **event_stream(json_text(AgentEvent)),
        **error_responses(400, 401, 403, 404, 413, 422, 429, 503, 504),
    },
)
async def chat(
    body: ChatRequest, user: ActingUser, services: ServicesDep, agent: AgentDep
) -> EventStream:
    """Talk to your personal agent; the answer streams as server-sent events
    (``data: {"type": conversation|text|cards|action|done|error, ...}``)."""
    limits = services.cfg.serve.limits
    if len(body.message) > limits.max_message_chars:
        raise ClientError(422, f"message: at most {limits.max_message_chars} characters")
    if body.conversation_id is not None and not await asyncio.to_thread(
        services.profiles.has_conversation, user, body.conversation_id
    ):
        raise ClientError(404, "no such conversation")

    stream = agent.respond(user, body.message, body.conversation_id)
    head = await open_stream(
        stream, limits.request_timeout_s, lambda event: event.type != "conversation"
    )

    return event_answer(
        head,
        stream,
        lambda message: AgentEvent(type="error", text=message),
        (Rejected, BackendError, UnknownConversationError, TimeoutError),
        f"agent chat of {user}",
    )


@router.get(
    "/v1/agent/conversations", tags=["agent"], responses=error_responses(400, 401, 403, 422)
)
async def conversations(user: ActingUser, services: ServicesDep) -> Any:
    """Your conversations, newest first."""
    return await asyncio.to_thread(services.profiles.conversations, user)


@router.get(
    "/v1/agent/conversations/{conversation_id}",
    tags=["agent"],
    responses=error_responses(400, 401, 403, 404, 422),
)
async def conversation(conversation_id: str, user: ActingUser, services: ServicesDep) -> Any:
    """The messages of one of your conversations."""
    try:
        return await asyncio.to_thread(services.profiles.messages, user, conversation_id)
    except UnknownConversationError:
        raise ClientError(404, "no such conversation") from None


# --------------------------------------------------------------------------- feedback, history


@router.post(
    "/v1/me/feedback",
    tags=["me"],
    response_model=HistoryView,
    responses=error_responses(400, 401, 403, 404, 413, 422),
)
async def feedback(body: FeedbackRequest, user: ActingUser, services: ServicesDep) -> Any:
    """Thumbs up (the item joins your history), thumbs down (excluded), or forget."""
    (item_id,) = known_items(services, [body.item_id], "item_id")
    profiles = services.profiles

    def apply() -> HistoryView:
        if body.action == "forget":
            profiles.exclude(user, [item_id])
        else:
            sentiment = "positive" if body.action == "up" else "negative"
            profiles.record_feedback(user, item_id, sentiment, "card")
        return _history_view(services, user)

    return await asyncio.to_thread(apply)


@router.get(
    "/v1/me/history",
    tags=["me"],
    response_model=HistoryView,
    responses=error_responses(400, 401, 403, 422),
)
async def history(user: ActingUser, services: ServicesDep) -> Any:
    """Your history (oldest first), exclusions and feedback."""
    return await asyncio.to_thread(_history_view, services, user)


@router.post(
    "/v1/me/history",
    tags=["me"],
    response_model=HistoryView,
    responses=error_responses(400, 401, 403, 404, 413, 422),
)
async def edit_history(body: ItemEdit, user: ActingUser, services: ServicesDep) -> Any:
    """Add items to or remove them from your history."""
    profiles = services.profiles
    add = partial(profiles.add_history, source="api")
    return await _edit(services, user, body, profiles.remove_history, add)


@router.post(
    "/v1/me/exclusions",
    tags=["me"],
    response_model=HistoryView,
    responses=error_responses(400, 401, 403, 404, 413, 422),
)
async def edit_exclusions(body: ItemEdit, user: ActingUser, services: ServicesDep) -> Any:
    """Exclude items from your recommendations, or allow them again."""
    profiles = services.profiles
    return await _edit(services, user, body, profiles.unexclude, profiles.exclude)


# --------------------------------------------------------------------------- export, delete


@router.get(
    "/v1/me/adapter",
    tags=["me"],
    response_class=ZipFile,
    responses={
        200: {"content": {ZipFile.media_type: {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(400, 401, 403, 404, 422),
    },
)
async def export_adapter(user: ActingUser, services: ServicesDep) -> ZipFile:
    """Your current personal adapter: a zip of the PEFT folder and its manifest
    (``llmrec user import`` takes it back, validated)."""
    store = services.store

    def export() -> bytes | None:
        if store.current(user) is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return store.export(user, Path(tmp) / "adapter.zip").read_bytes()

    data = await asyncio.to_thread(export)
    if data is None:
        raise ClientError(404, "you have no personal adapter yet (the shared one serves you)")
    name = f"llmrec-adapter-{user}.zip"
    return ZipFile(data, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.delete(
    "/v1/me",
    tags=["me"],
    response_model=UserErasure,
    responses=error_responses(400, 401, 403, 422),
)
async def delete_me(user: ActingUser, services: ServicesDep) -> Any:
    """Delete yourself: history, feedback, conversations, personal adapters (unloaded
    from the engine too) and keys. What your past training contributed to the shared
    adapter stays (docs/privacy.md)."""

    def erase() -> UserErasure:
        report = erase_user(user, services.profiles, services.store, services.cfg.fed.output_dir)
        return report.model_copy(update={"keys": services.keys.revoke(user)})

    report = await asyncio.to_thread(erase)
    # Out of the engine too: a later request (an admin's) gets the shared adapter.
    await services.engines.forget(user)
    return report
