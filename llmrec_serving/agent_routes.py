"""The personal agent's routes: streaming chat, feedback, history, export, delete, the page.

A separate router the gateway includes (``create_app`` passes its auth dependency), so the
agent's surface lives in one place. Every route acts for the authenticated user only (an
admin key names the user with ``?user=``); the adapter that answers is that user's own,
through the same admission queue and adapter router as every other request.

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
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmrec.adapters import validate_user_id
from llmrec.agent import Agent, FeedbackRecord, UnknownConversationError, UserErasure, erase_user
from llmrec.recommend import Grounder
from llmrec_serving.admission import Rejected
from llmrec_serving.backend import BackendError, GenerationParams
from llmrec_serving.keys import Principal

if TYPE_CHECKING:
    from llmrec_serving.app import Services

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
"""The page's files besides index.html: only these names are ever served."""
AGENT_K = 3
"""Picks per answer unless the user asks for more: answers stay short."""


# --------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ChatRequest(_Body):
    """One user turn."""

    message: str = Field(min_length=1)
    """What the user says."""
    conversation_id: str | None = Field(None, max_length=36)
    """Continue this conversation (one of the caller's); None starts a new one."""


class FeedbackRequest(_Body):
    """Feedback on one item (a card's buttons)."""

    item_id: str = Field(min_length=1, max_length=128)
    action: Literal["up", "down", "forget"]
    """up: liked (joins the history); down: disliked (excluded); forget: never show it
    again, without saying it was disliked."""


class ItemEdit(_Body):
    """Items to add and remove."""

    add: list[str] = []
    remove: list[str] = []


class ItemView(BaseModel):
    """A catalog item as the page lists it."""

    item_id: str
    title: str
    year: int | None
    genres: list[str]


class HistoryView(BaseModel):
    """What the profile holds about the caller."""

    user: str
    history: list[ItemView]
    """Oldest first."""
    exclusions: list[ItemView]
    feedback: list[FeedbackRecord]
    refresh_queued: bool
    """Whether a personal-adapter refresh is due (``llmrec personalize --all-queued``)."""


# --------------------------------------------------------------------------- the engine


class GatewayEngine:
    """The agent's :class:`llmrec.agent.Engine` on the gateway's backend: each call runs
    with the user's own adapter, behind the admission queue."""

    def __init__(self, services: "Services"):
        self.services = services

    async def rank(
        self, user_id: str, history: Sequence[str], k: int, excluded: set[str]
    ) -> list[tuple[str, float]]:
        """Top-k with the user's adapter."""
        s = self.services
        history = list(history)[-s.cfg.serve.limits.max_history_items :]
        async with s.admission.slot(user_id), s.router.use(user_id) as adapter:
            ranked = await s.ranker.rank(adapter, history, k, None, excluded)
        return [(r.item_id, r.score) for r in ranked]

    async def write(
        self, user_id: str, messages: list[dict[str, str]], max_tokens: int
    ) -> AsyncIterator[str]:
        """One greedy line from the user's adapter."""
        s = self.services
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
        async with s.admission.slot(user_id), s.router.use(user_id) as adapter:
            async for delta in s.backend.chat(adapter, messages, params):
                if delta.text:
                    yield delta.text


# --------------------------------------------------------------------------- the router


def agent_router(services: "Services", principal: Callable[..., Principal]) -> APIRouter:
    """The agent's routes over ``services``; ``principal`` is the gateway's auth dependency."""
    cfg, limits = services.cfg, services.cfg.serve.limits
    catalog = services.catalog
    profiles = services.profiles
    agent = Agent(
        catalog,
        profiles,
        GatewayEngine(services),
        Grounder(catalog, threshold=cfg.recommend.grounding_threshold),
        services.prompts,
        k=AGENT_K,
        max_k=limits.max_k,
        reason_tokens=cfg.serve.explain_max_tokens,
    )
    router = APIRouter()
    Who = Annotated[Principal, Depends(principal)]
    UserParam = Annotated[str | None, Query(description="With an admin key: the user to act for.")]

    def acting(who: Principal, user: str | None) -> str:
        if user is None:
            if who.user_id is None:
                raise HTTPException(422, "an admin key must name the user (?user=...)")
            return who.user_id
        try:
            validate_user_id(user)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        if not who.may_act_for(user):
            raise HTTPException(403, "this key may only act for its own user")
        return user

    def known(item_ids: list[str], name: str) -> list[str]:
        if len(item_ids) > limits.max_history_items:
            raise HTTPException(422, f"{name}: at most {limits.max_history_items} items")
        unknown = [i for i in item_ids if i not in catalog]
        if unknown:
            raise HTTPException(422, f"{name}: unknown item ids {unknown[:5]}")
        return item_ids

    def view(item_id: str) -> ItemView:
        item = catalog[item_id]
        return ItemView(item_id=item_id, title=item.display, year=item.year, genres=item.genres)

    def history_view(user: str) -> HistoryView:
        return HistoryView(
            user=user,
            history=[view(i) for i in profiles.history(user)],
            exclusions=[view(i) for i in profiles.exclusions(user) if i in catalog],
            feedback=profiles.feedback(user),
            refresh_queued=profiles.queued_at(user) is not None,
        )

    # ----------------------------------------------------------------- the page

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in PAGE_FILES:  # a fixed list: no path from a request reaches the disk
            raise HTTPException(404, "not found")
        return FileResponse(STATIC_DIR / name, media_type=PAGE_FILES[name])

    # ----------------------------------------------------------------- chat

    @router.post("/v1/agent/chat", tags=["agent"])
    async def chat(body: ChatRequest, who: Who, user: UserParam = None) -> StreamingResponse:
        """Talk to your personal agent; the answer streams as server-sent events
        (``data: {"type": conversation|text|cards|action|done|error, ...}``)."""
        user_id = acting(who, user)
        if len(body.message) > limits.max_message_chars:
            raise HTTPException(422, f"message: at most {limits.max_message_chars} characters")
        if body.conversation_id is not None and not await asyncio.to_thread(
            profiles.has_conversation, user_id, body.conversation_id
        ):
            raise HTTPException(404, "no such conversation")

        async def events() -> AsyncIterator[str]:
            try:
                async for event in agent.respond(user_id, body.message, body.conversation_id):
                    yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
            except (Rejected, BackendError, UnknownConversationError, TimeoutError) as err:
                message = getattr(err, "reason", None) or getattr(err, "message", None) or str(err)
                log.warning("agent chat of %s stopped: %s", user_id, message)
                yield f"data: {json.dumps({'type': 'error', 'text': message})}\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @router.get("/v1/agent/conversations", tags=["agent"])
    async def conversations(who: Who, user: UserParam = None) -> Any:
        """Your conversations, newest first."""
        return await asyncio.to_thread(profiles.conversations, acting(who, user))

    @router.get("/v1/agent/conversations/{conversation_id}", tags=["agent"])
    async def conversation(conversation_id: str, who: Who, user: UserParam = None) -> Any:
        """The messages of one of your conversations."""
        try:
            return await asyncio.to_thread(profiles.messages, acting(who, user), conversation_id)
        except UnknownConversationError:
            raise HTTPException(404, "no such conversation") from None

    # ----------------------------------------------------------------- feedback, history

    @router.post("/v1/me/feedback", tags=["me"], response_model=HistoryView)
    async def feedback(body: FeedbackRequest, who: Who, user: UserParam = None) -> Any:
        """Thumbs up (the item joins your history), thumbs down (excluded), or forget."""
        user_id = acting(who, user)
        (item_id,) = known([body.item_id], "item_id")

        def apply() -> HistoryView:
            if body.action == "forget":
                profiles.exclude(user_id, [item_id])
            else:
                sentiment = "positive" if body.action == "up" else "negative"
                profiles.record_feedback(user_id, item_id, sentiment, "card")
            return history_view(user_id)

        return await asyncio.to_thread(apply)

    @router.get("/v1/me/history", tags=["me"], response_model=HistoryView)
    async def history(who: Who, user: UserParam = None) -> Any:
        """Your history (oldest first), exclusions and feedback."""
        return await asyncio.to_thread(history_view, acting(who, user))

    @router.post("/v1/me/history", tags=["me"], response_model=HistoryView)
    async def edit_history(body: ItemEdit, who: Who, user: UserParam = None) -> Any:
        """Add items to or remove them from your history."""
        user_id = acting(who, user)
        add, remove = known(body.add, "add"), known(body.remove, "remove")

        def apply() -> HistoryView:
            profiles.remove_history(user_id, remove)
            profiles.add_history(user_id, add, "api")
            return history_view(user_id)

        return await asyncio.to_thread(apply)

    @router.post("/v1/me/exclusions", tags=["me"], response_model=HistoryView)
    async def edit_exclusions(body: ItemEdit, who: Who, user: UserParam = None) -> Any:
        """Exclude items from your recommendations, or allow them again."""
        user_id = acting(who, user)
        add, remove = known(body.add, "add"), known(body.remove, "remove")

        def apply() -> HistoryView:
            profiles.unexclude(user_id, remove)
            profiles.exclude(user_id, add)
            return history_view(user_id)

        return await asyncio.to_thread(apply)

    # ----------------------------------------------------------------- export, delete

    @router.get("/v1/me/adapter", tags=["me"], response_class=Response)
    async def export_adapter(who: Who, user: UserParam = None) -> Response:
        """Your current personal adapter: a zip of the PEFT folder and its manifest
        (``llmrec user import`` takes it back, validated)."""
        user_id = acting(who, user)
        store = services.router.store

        def export() -> bytes | None:
            if store.current(user_id) is None:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                return store.export(user_id, Path(tmp) / "adapter.zip").read_bytes()

        data = await asyncio.to_thread(export)
        if data is None:
            raise HTTPException(404, "you have no personal adapter yet (the shared one serves you)")
        name = f"llmrec-adapter-{user_id}.zip"
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.delete("/v1/me", tags=["me"], response_model=UserErasure)
    async def delete_me(who: Who, user: UserParam = None) -> Any:
        """Delete yourself: history, feedback, conversations, personal adapters (unloaded
        from the engine too) and keys. What your past training contributed to the shared
        adapter stays (docs/privacy.md)."""
        user_id = acting(who, user)

        def erase() -> UserErasure:
            report = erase_user(user_id, profiles, services.router.store, cfg.fed.output_dir)
            return report.model_copy(update={"keys": services.keys.revoke(user_id)})

        report = await asyncio.to_thread(erase)
        # Out of the engine too: a later request (an admin's) gets the shared adapter.
        await services.router.forget(user_id)
        return report

    return router
