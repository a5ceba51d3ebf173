"""The OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions``.

The one model listed is the caller's personal agent: whatever ``model`` a request names,
the caller's own adapter answers (the admin key names the user with ``user``). Without a
system message of the client's, the agent's system prompt (the user's current history)
comes first. A streamed answer is admitted and started before its 200, so a refusal is a
real status code; a failure later is an ``error`` event inside the stream.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmrec_serving.api.deps import Caller, ServicesDep, acting_user, guarded
from llmrec_serving.engines import BackendError, Delta, GenerationParams, Messages, Usage
from llmrec_serving.middleware import ClientError
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
    UsageBody,
)
from llmrec_serving.services import Services

MODEL_ID = "llmrec"
"""The one model the gateway lists; the adapter behind it is the caller's own."""

router = APIRouter(tags=["chat"])


@dataclass(frozen=True)
class _Completion:
    """What one completion's answer is sent as: its id, time and inputs."""

    id: str
    created: int
    messages: Messages
    params: GenerationParams


@router.get("/v1/models", response_model=ModelList)
async def models(who: Caller) -> ModelList:
    """The one model: the caller's personal agent."""
    return ModelList(data=[ModelCard(id=MODEL_ID, created=0)])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, who: Caller, services: ServicesDep
) -> Any:
    """OpenAI-compatible chat, answered by the caller's own adapter (streaming too)."""
    user = acting_user(who, body.user)
    # Without a system message of the client's, the agent's names the user's history.
    own_system = body.messages[0].role in ("system", "developer")
    history = [] if own_system else await asyncio.to_thread(services.profiles.history, user)
    messages, params = _chat_inputs(services, body, history)
    completion = _Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), messages, params)
    if not body.stream:
        work = partial(_complete, services, user, completion)
        return await guarded(services, request, "chat", work)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _stream(services, user, completion, include_usage)


async def _complete(services: Services, user: str, completion: _Completion) -> ChatCompletion:
    """The whole answer at once."""
    async with services.admit(user) as adapter:
        chat = services.backend.chat(adapter, completion.messages, completion.params)
        deltas = [d async for d in chat]
    last = deltas[-1] if deltas else Delta("", "stop")
    return ChatCompletion(
        id=completion.id,
        created=completion.created,
        model=adapter.name if adapter is not None else "base",
        choices=[
            Choice(
                message=AssistantMessage(content="".join(d.text for d in deltas)),
                finish_reason=last.finish_reason or "stop",
            )
        ],
        usage=_usage(last.usage),
    )


async def _stream(
    services: Services, user: str, completion: _Completion, include_usage: bool
) -> StreamingResponse:
    """The answer as server-sent chunks; admission, adapter and the first piece come before
    the 200, so that a refusal is a real status code and not an error in a started stream."""
    timeout_s = services.cfg.serve.limits.request_timeout_s
    stack = AsyncExitStack()
    try:
        adapter = await stack.enter_async_context(services.admit(user))
        deltas = services.backend.chat(adapter, completion.messages, completion.params)
        stack.push_async_callback(deltas.aclose)
        first = await asyncio.wait_for(anext(deltas, None), timeout_s)
    except BaseException:
        await stack.aclose()
        raise
    model = adapter.name if adapter is not None else "base"

    def chunk(delta: DeltaBody, finish: str | None = None, usage=None) -> str:
        out = ChatCompletionChunk(
            id=completion.id,
            created=completion.created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)] if usage is None else [],
            usage=usage,
        )
        return f"data: {out.model_dump_json(exclude_none=usage is None)}\n\n"

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + timeout_s
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


def _usage(usage: Usage | None) -> UsageBody:
    if usage is None:
        return UsageBody(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


# --------------------------------------------------------------------------- inputs


def _strip_specials(text: str, pattern: re.Pattern | None) -> str:
    """Client text with control tokens removed (a chat must not forge turn boundaries)."""
    return pattern.sub("", text) if pattern is not None else text


def _messages(services: Services, body: ChatCompletionRequest, history: Sequence[str]) -> Messages:
    """The engine's messages, each checked against the limits; without a system message of
    the client's, the personal agent's (the user's current ``history``) comes first."""
    limits = services.cfg.serve.limits
    if len(body.messages) > limits.max_messages:
        raise ClientError(422, f"messages: at most {limits.max_messages}")
    messages = []
    for m in body.messages:
        text = m.text()
        if len(text) > limits.max_message_chars:
            raise ClientError(422, f"messages: each at most {limits.max_message_chars} characters")
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": _strip_specials(text, services.specials)})
    if messages[0]["role"] != "system":
        titles = services.ranker.catalog.displays(history)
        messages.insert(0, {"role": "system", "content": services.prompts.chat_system(titles)})
    return messages


def _chat_inputs(
    services: Services, body: ChatCompletionRequest, history: Sequence[str]
) -> tuple[Messages, GenerationParams]:
    """The engine's messages and sampling settings, checked against the limits."""
    limits = services.cfg.serve.limits
    messages = _messages(services, body, history)
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
