"""The FastAPI gateway: auth, limits, the recommendation and chat routes, health, metrics.

Every route maps the authenticated caller to a user and that user to their adapter; no
request field names an adapter or a path. Work runs under a time budget and is cancelled
when the client goes away; refusals are 4xx (or 429/503 with Retry-After under load),
never a 500 for anything a client can send.
"""

# No ``from __future__ import annotations``: FastAPI must see the route signatures' real
# types, and their Depends refer to functions local to create_app.
import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrec.adapters import validate_user_id
from llmrec.agent import ProfileStore
from llmrec.data import Catalog
from llmrec.prompts import PromptBuilder
from llmrec_serving.adapters import AdapterRouter
from llmrec_serving.admission import Admission, Rejected
from llmrec_serving.backend import Backend, BackendError, Delta, GenerationParams
from llmrec_serving.config import ServingConfig
from llmrec_serving.keys import KeyStore, Principal
from llmrec_serving.metrics import Metrics
from llmrec_serving.ranking import Ranker
from llmrec_serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    DeltaBody,
    ModelCard,
    ModelList,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
    UsageBody,
)

log = logging.getLogger(__name__)

MODEL_ID = "llmrec"
"""The one model the gateway lists; the adapter behind it is the caller's own."""


class ClientError(Exception):
    """A request the gateway refuses; answered as ``status`` with ``message``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Services:
    """Everything the routes use, built once per process (see ``serving.runtime``)."""

    cfg: ServingConfig
    backend: Backend
    router: AdapterRouter
    ranker: Ranker
    prompts: PromptBuilder
    tokenizer: Any
    catalog: Catalog
    profiles: ProfileStore
    """Each user's current history and exclusions (the agent's edits and feedback apply
    at once); seeded from the data set on a user's first access."""
    keys: KeyStore
    admission: Admission
    metrics: Metrics


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


# --------------------------------------------------------------------------- ASGI guard


class _TooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: body-size limit (413) and per-route request metrics.

    Pure ASGI rather than BaseHTTPMiddleware so streaming and disconnects pass untouched.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, seen = time.perf_counter(), 500, 0
        started = False
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _error(413, f"request body over {self.max_body_bytes} bytes")(
                scope, receive, send
            )
            self._observe(scope, 413, start)
            return

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            status = 413
            if not started:
                await _error(413, f"request body over {self.max_body_bytes} bytes")(
                    scope, receive, send
                )
        finally:
            self._observe(scope, status, start)

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", "other")
        self.metrics.requests.labels(name, str(status)).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - start)


# --------------------------------------------------------------------------- helpers


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _guarded(
    services: Services, request: Request, route: str, work: Callable[[], Awaitable[Any]]
) -> Any:
    """Run ``work`` under the request time budget; cancel it if the client goes away."""
    task = asyncio.ensure_future(
        asyncio.wait_for(work(), services.cfg.serve.limits.request_timeout_s)
    )
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        services.metrics.cancelled.labels(route).inc()
        log.info("%s: client went away, work cancelled", route)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    try:
        return task.result()
    except TimeoutError:
        raise ClientError(504, "the request took longer than the server's time budget") from None


async def _sweep_deleted_users(services: Services) -> None:
    """Unload, every ``store_poll_s``, the adapters of users deleted by another process."""
    while True:
        await asyncio.sleep(services.cfg.serve.store_poll_s)
        try:
            await services.router.sweep()
        except Exception as err:  # a store that cannot be listed now may be readable next time
            log.warning("adapter store sweep failed: %s", err)


def _strip_specials(text: str, pattern: re.Pattern | None) -> str:
    """Client text with control tokens removed (a chat must not forge turn boundaries)."""
    return pattern.sub("", text) if pattern is not None else text


def _specials_pattern(tokenizer: Any) -> re.Pattern | None:
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    specials = sorted((s for s in found if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


# --------------------------------------------------------------------------- the app


def create_app(services: Services) -> FastAPI:
    """The gateway over ``services``; the backend starts and stops with the app."""
    cfg, limits, metrics = services.cfg, services.cfg.serve.limits, services.metrics
    specials = _specials_pattern(services.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.backend.start()
        sweeper = asyncio.create_task(_sweep_deleted_users(services))
        yield
        sweeper.cancel()
        await services.backend.close()

    app = FastAPI(
        title="llmrec",
        summary="Personal generative recommendations: one LLM, one LoRA adapter per user.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, metrics=metrics)

    # ----------------------------------------------------------------- errors

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, err: ClientError) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, err: Rejected) -> JSONResponse:
        metrics.rejected.labels(str(err.status)).inc()
        return _error(err.status, err.reason, {"Retry-After": str(err.retry_after_s)})

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, err: BackendError) -> JSONResponse:
        log.warning("backend: %s", err.message)
        headers = {"Retry-After": str(limits.retry_after_s)} if err.status == 503 else {}
        return _error(err.status, err.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:10]
        )
        return _error(422, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    # ----------------------------------------------------------------- auth

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        who = services.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise ClientError(
                401, "missing or invalid API key", {"WWW-Authenticate": 'Bearer realm="llmrec"'}
            )
        return who

    def acting_user(who: Principal, requested: str | None) -> str:
        if requested is None:
            if who.user_id is None:
                raise ClientError(422, "an admin key must name the user")
            return who.user_id
        try:
            validate_user_id(requested)
        except ValueError as err:
            raise ClientError(422, str(err)) from None
        if not who.may_act_for(requested):
            raise ClientError(403, "this key may only act for its own user")
        return requested

    # ----------------------------------------------------------------- health, metrics

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Readiness: the engine answers and can take requests."""
        ok = await services.backend.ready()
        body = {
            "status": "ready" if ok else "unavailable",
            "backend": services.backend.kind,
            "adapters_loaded": len(services.router.loaded),
            "queue": {"running": services.admission.running, "waiting": services.admission.waiting},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        """Prometheus metrics of the gateway."""
        metrics.queue_waiting.set(services.admission.waiting)
        metrics.queue_running.set(services.admission.running)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------- recommendations

    @app.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        tags=["recommend"],
        responses={code: {"model": Any} for code in (401, 403, 413, 422, 429, 503, 504)},
    )
    async def recommendations(
        body: RecommendationRequest, request: Request, who: Annotated[Principal, Depends(principal)]
    ) -> Any:
        """Top-k unseen catalog items for the caller, each with a one-line reason."""
        user = acting_user(who, body.user)
        k = body.k or cfg.recommend.k
        if k > limits.max_k:
            raise ClientError(422, f"k: at most {limits.max_k}")
        for name, ids in (("history", body.history or []), ("exclude", body.exclude)):
            if len(ids) > limits.max_history_items:
                raise ClientError(422, f"{name}: at most {limits.max_history_items} items")
            unknown = [i for i in ids if i not in services.catalog]
            if unknown:
                raise ClientError(422, f"{name}: unknown item ids {unknown[:5]}")
        if body.context is not None and len(body.context) > limits.max_context_chars:
            raise ClientError(422, f"context: at most {limits.max_context_chars} characters")
        # The profile is the truth, not the data set: a thumbs-down, "never show me X" or a
        # history edit through the agent changes this answer at once.
        stored, never = await asyncio.to_thread(_profile_of, services.profiles, user)
        history = list(body.history if body.history is not None else stored)
        history = history[-limits.max_history_items :]
        excluded = set(body.exclude) | set(never) | (set(history) if body.exclude_seen else set())
        explain = cfg.serve.explain if body.explain is None else body.explain

        async def work() -> RecommendationResponse:
            async with services.admission.slot(user), services.router.use(user) as adapter:
                items = await services.ranker.rank(adapter, history, k, body.context, excluded)
                if explain and items:
                    items = await services.ranker.explain(
                        adapter, history, items, cfg.serve.explain_max_tokens
                    )
            metrics.items.inc(len(items))
            return RecommendationResponse(
                user=user,
                adapter=adapter.name if adapter is not None else "base",
                items=[
                    RecommendedItem(
                        rank=r, item_id=i.item_id, title=i.title, score=i.score, reason=i.reason
                    )
                    for r, i in enumerate(items, 1)
                ],
            )

        return await _guarded(services, request, "recommendations", work)

    # ----------------------------------------------------------------- OpenAI chat

    @app.get("/v1/models", response_model=ModelList, tags=["chat"])
    async def models(who: Annotated[Principal, Depends(principal)]) -> ModelList:
        """The one model: the caller's personal agent."""
        return ModelList(data=[ModelCard(id=MODEL_ID, created=0)])

    @app.post("/v1/chat/completions", tags=["chat"], response_model=ChatCompletion)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, who: Annotated[Principal, Depends(principal)]
    ) -> Any:
        """OpenAI-compatible chat, answered by the caller's own adapter (streaming too)."""
        user = acting_user(who, body.user)
        # Without a system message of the client's, the agent's names the user's history.
        own_system = body.messages[0].role in ("system", "developer")
        history = [] if own_system else await asyncio.to_thread(services.profiles.history, user)
        messages, params = _chat_inputs(services, body, history, specials)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        if not body.stream:

            async def work() -> ChatCompletion:
                async with services.admission.slot(user), services.router.use(user) as adapter:
                    deltas = [d async for d in services.backend.chat(adapter, messages, params)]
                last = deltas[-1] if deltas else Delta("", "stop")
                usage = last.usage
                return ChatCompletion(
                    id=completion_id,
                    created=created,
                    model=adapter.name if adapter is not None else "base",
                    choices=[
                        Choice(
                            message=AssistantMessage(content="".join(d.text for d in deltas)),
                            finish_reason=last.finish_reason or "stop",
                        )
                    ],
                    usage=_usage(usage),
                )

            return await _guarded(services, request, "chat", work)

        # Streaming: admission, adapter and the first piece come before the 200, so that a
        # refusal is a real status code and not an error inside a started stream.
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(services.admission.slot(user))
            adapter = await stack.enter_async_context(services.router.use(user))
            deltas = services.backend.chat(adapter, messages, params)
            stack.push_async_callback(deltas.aclose)
            first = await asyncio.wait_for(anext(deltas, None), limits.request_timeout_s)
        except BaseException:
            await stack.aclose()
            raise
        model = adapter.name if adapter is not None else "base"

        def chunk(delta: DeltaBody, finish: str | None = None, usage=None) -> str:
            out = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if usage is None else [],
                usage=usage,
            )
            return f"data: {out.model_dump_json(exclude_none=usage is None)}\n\n"

        async def events() -> AsyncIterator[str]:
            deadline = time.monotonic() + limits.request_timeout_s
            last: Delta | None = None
            try:
                yield chunk(DeltaBody(role="assistant", content=""))
                piece = first
                while piece is not None:
                    last = piece
                    if piece.text:
                        yield chunk(DeltaBody(content=piece.text))
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    piece = await asyncio.wait_for(anext(deltas, None), remaining)
                yield chunk(DeltaBody(), (last.finish_reason if last else None) or "stop")
                if include_usage:
                    yield chunk(DeltaBody(), usage=_usage(last.usage if last else None))
            except (BackendError, TimeoutError) as err:
                message = err.message if isinstance(err, BackendError) else "time budget exceeded"
                error = {"error": {"message": message, "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
            finally:
                await stack.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    from llmrec_serving.agent_routes import agent_router  # the personal agent and the chat page

    app.include_router(agent_router(services, principal))
    return app


def _usage(usage) -> UsageBody:
    if usage is None:
        return UsageBody(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _profile_of(profiles: ProfileStore, user: str) -> tuple[list[str], list[str]]:
    """The user's current history and exclusions (one worker-thread hop for both)."""
    return profiles.history(user), profiles.exclusions(user)


def _chat_inputs(
    services: Services,
    body: ChatCompletionRequest,
    history: Sequence[str],
    specials: re.Pattern | None,
) -> tuple[list[dict[str, str]], GenerationParams]:
    """The engine's messages and sampling settings, checked against the limits.

    Without a system message of the client's, the personal agent's system prompt (the
    user's current ``history``) comes first.
    """
    limits = services.cfg.serve.limits
    if len(body.messages) > limits.max_messages:
        raise ClientError(422, f"messages: at most {limits.max_messages}")
    messages = []
    for m in body.messages:
        text = m.text()
        if len(text) > limits.max_message_chars:
            raise ClientError(422, f"messages: each at most {limits.max_message_chars} characters")
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": _strip_specials(text, specials)})
    if messages[0]["role"] != "system":
        titles = services.ranker.titles(history)
        messages.insert(0, {"role": "system", "content": services.prompts.chat_system(titles)})
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
        raise ClientError(422, "stop: at most 4 non-empty strings of up to 64 characters")
    try:
        prompt = services.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    except Exception as err:  # a template that refuses a message order, say
        raise ClientError(400, f"messages cannot be rendered: {err}") from None
    room = services.backend.max_model_len - len(prompt)
    if room < 1:
        raise ClientError(
            400,
            f"the conversation is {len(prompt)} tokens; the model holds "
            f"{services.backend.max_model_len}",
        )
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ClientError(422, f"max_tokens: at most {limits.max_tokens}")
    if asked is not None and asked > room:
        raise ClientError(400, f"max_tokens: only {room} tokens fit after the conversation")
    params = GenerationParams(
        max_tokens=asked or min(limits.max_tokens, room),
        temperature=body.temperature if body.temperature is not None else 1.0,  # as OpenAI
        top_p=body.top_p if body.top_p is not None else 1.0,
        stop=tuple(stops),
        seed=body.seed,
    )
    return messages, params
