"""The OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Two models are listed, both the caller's own (the admin key names the user with ``user``):

- ``llmrec``, the default (any name but ``llmrec-raw``): the personal agent answers the
  last user message. It reads the request, ranks the catalog with the user's adapter and
  answers with catalog items and their reasons from facts (``llmrec.agent``), so chat never
  invents a title or a genre. The client keeps the conversation, as OpenAI clients do: when
  the earlier messages are one of the user's stored agent conversations, "why the second
  one?" refers to its last answer; otherwise the turn starts a new conversation.
- ``llmrec-raw``: free generation by the user's adapter, on request only. Without a system
  message of the client's, the agent's system prompt (the user's history) comes first.

A streamed answer is admitted and started before its 200, so a refusal is a real status
code; a failure later is an ``error`` event inside the stream.
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

from llmrec.agent import Agent
from llmrec_serving.api.agent import AgentDep
from llmrec_serving.api.deps import Caller, ServicesDep, acting_user, guarded
from llmrec_serving.api.streams import EventStream
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
    error_responses,
    event_stream,
    json_text,
)
from llmrec_serving.services import Services

MODEL_ID = "llmrec"
"""The personal agent: the default model, whatever name a request gives."""
RAW_MODEL_ID = "llmrec-raw"
"""Free generation by the caller's adapter: only when a request names it."""

router = APIRouter(tags=["chat"])


@dataclass(frozen=True)
class _Completion:
    """What one completion's answer is sent as: its id and time."""

    id: str
    created: int

    @classmethod
    def new(cls) -> "_Completion":
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def models(who: Caller) -> ModelList:
    """The caller's personal agent, and their adapter's free generation."""
    return ModelList(
        data=[ModelCard(id=MODEL_ID, created=0), ModelCard(id=RAW_MODEL_ID, created=0)]
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        # with "stream": true, each event's data is a chunk, and the last "[DONE]"
        **event_stream({"anyOf": [{"const": "[DONE]"}, json_text(ChatCompletionChunk)]}),
        **error_responses(400, 401, 403, 413, 422, 429, 503, 504),
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    who: Caller,
    services: ServicesDep,
    agent: AgentDep,
) -> Any:
    """OpenAI-compatible chat, answered by the caller's personal agent, or by their
    adapter's free generation under ``model: llmrec-raw`` (streaming too)."""
    user = acting_user(who, body.user)
    if body.model != RAW_MODEL_ID:
        return await _agent_answer(services, agent, body, request, user)
    # Without a system message of the client's, the agent's names the user's history.
    own_system = body.messages[0].role in ("system", "developer")
    history = [] if own_system else await asyncio.to_thread(services.profiles.history, user)
    messages, params = _chat_inputs(services, body, history)
    completion = _Completion.new()
    if not body.stream:
        work = partial(_complete, services, user, completion, messages, params)
        return await guarded(services, request, "chat", work)
    stack = AsyncExitStack()
    try:
        lease = await stack.enter_async_context(services.admit(user))
        deltas = lease.chat(messages, params)
        stack.push_async_callback(deltas.aclose)
    except BaseException:
        await stack.aclose()
        raise
    return await _stream(services, lease.model, deltas, stack, completion, _include_usage(body))


def _include_usage(body: ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _complete(
    services: Services,
    user: str,
    completion: _Completion,
    messages: Messages,
    params: GenerationParams,
) -> ChatCompletion:
    """The whole answer at once."""
    async with services.admit(user) as lease:
        deltas = [d async for d in lease.chat(messages, params)]
    return _whole(completion, lease.model, deltas)


def _whole(completion: _Completion, model: str, deltas: list[Delta]) -> ChatCompletion:
    """The answer ``deltas`` make, as one chat completion (the last holds finish and usage)."""
    last = deltas[-1] if deltas else Delta("", "stop")
    return ChatCompletion(
        id=completion.id,
        created=completion.created,
        model=model,
        choices=[
            Choice(
                message=AssistantMessage(content="".join(d.text for d in deltas)),
                finish_reason=last.finish_reason or "stop",
            )
        ],
        usage=_usage(last.usage),
    )


async def _stream(
    services: Services,
    model: str,
    deltas: AsyncIterator[Delta],
    stack: AsyncExitStack,
    completion: _Completion,
    include_usage: bool,
) -> EventStream:
    """``deltas`` as server-sent chunks; the first piece comes before the 200, so that a
    refusal (admission, say) is a real status code and not an error in a started stream.
    ``stack`` holds what the answer needs and is closed when it ends."""
    timeout_s = services.cfg.serve.limits.request_timeout_s
    try:
        first = await asyncio.wait_for(anext(deltas, None), timeout_s)
    except BaseException:
        await stack.aclose()
        raise

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

    return EventStream(events())


# --------------------------------------------------------------------------- the agent


async def _agent_answer(
    services: Services, agent: Agent, body: ChatCompletionRequest, request: Request, user: str
) -> Any:
    """The agent's answer to the last message, as a chat completion (or its chunks)."""
    _check_messages(services, body)
    _, budget = _checked_params(services, body)  # the answer is deterministic: no sampling
    # The turn is the last user message (the schema requires one); what follows it, say an
    # assistant prefill, is not something an agent that answers from facts can continue.
    turn = max(i for i, m in enumerate(body.messages) if m.role == "user")
    message = _strip_specials(body.messages[turn].text(), services.specials)
    earlier = [(m.role, m.text()) for m in body.messages[:turn] if m.role in ("user", "assistant")]
    conversation = (
        await asyncio.to_thread(services.profiles.find_conversation, user, earlier)
        if earlier
        else None
    )
    completion = _Completion.new()

    async def deltas() -> AsyncIterator[Delta]:
        said, finish = [], "stop"
        async for event in agent.respond(user, message, conversation):
            if event.type != "text" or not event.text or finish == "length":
                continue  # the turn still runs to its end: its actions and its record
            piece = event.text
            if budget is not None:  # max_tokens cuts the answer, as it would a generation
                room = budget - len(services.tokenizer("".join(said))["input_ids"])
                ids = services.tokenizer(piece)["input_ids"]
                if len(ids) > room:
                    piece, finish = services.tokenizer.decode(ids[: max(room, 0)]), "length"
            said.append(piece)
            if piece:
                yield Delta(piece)
        yield Delta("", finish, _agent_usage(services, message, "".join(said)))

    if not body.stream:

        async def work() -> ChatCompletion:
            return _whole(completion, MODEL_ID, [d async for d in deltas()])

        return await guarded(services, request, "chat", work)
    answer = deltas()
    stack = AsyncExitStack()
    stack.push_async_callback(answer.aclose)
    return await _stream(services, MODEL_ID, answer, stack, completion, _include_usage(body))


def _agent_usage(services: Services, message: str, answer: str) -> Usage:
    """Tokens of the user's message and of the answer (the agent's work is ranking, not
    one generation: these count what it read and wrote)."""
    tokens = services.tokenizer
    return Usage(len(tokens(message)["input_ids"]), len(tokens(answer)["input_ids"]))


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


def _check_messages(services: Services, body: ChatCompletionRequest) -> None:
    """422 unless the request's messages are within the limits."""
    limits = services.cfg.serve.limits
    if len(body.messages) > limits.max_messages:
        raise ClientError(422, f"messages: at most {limits.max_messages}")
    if any(len(text) > limits.max_message_chars for m in body.messages for text in m.texts()):
        raise ClientError(422, f"messages: each text at most {limits.max_message_chars} characters")


def _messages(services: Services, body: ChatCompletionRequest, history: Sequence[str]) -> Messages:
    """The engine's messages, each checked against the limits; without a system message of
    the client's, the personal agent's (the user's current ``history``) comes first."""
    _check_messages(services, body)
    messages = []
    for m in body.messages:
        text = m.text()
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": _strip_specials(text, services.specials)})
    if messages[0]["role"] != "system":
        titles = services.catalog.displays(history)
        messages.insert(0, {"role": "system", "content": services.prompts.chat_system(titles)})
    return messages


def _chat_inputs(
    services: Services, body: ChatCompletionRequest, history: Sequence[str]
) -> tuple[Messages, GenerationParams]:
    """The engine's messages and sampling settings, checked against the limits."""
    limits = services.cfg.serve.limits
    messages = _messages(services, body, history)
    stops, asked = _checked_params(services, body)
    try:
        prompt = services.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    except Exception as err:  # a template that refuses a message order, say
        raise ClientError(400, f"messages cannot be rendered: {err}") from None
    room = services.engines.max_model_len - len(prompt)
    if room < 1:
        raise ClientError(
            400,
            f"the conversation is {len(prompt)} tokens; the model holds "
            f"{services.engines.max_model_len}",
        )
    if asked is not None and asked > room:
        raise ClientError(400, f"max_tokens: only {room} tokens fit after the conversation")
    params = GenerationParams(
        max_tokens=asked or min(limits.max_tokens, room),
        temperature=body.temperature if body.temperature is not None else 1.0,  # as OpenAI
        top_p=body.top_p if body.top_p is not None else 1.0,
        stop=tuple(stops),
        seed=body.seed,
        repetition_penalty=body.repetition_penalty or services.cfg.serve.repetition_penalty,
    )
    return messages, params


def _checked_params(
    services: Services, body: ChatCompletionRequest
) -> tuple[list[str], int | None]:
    """The request's stop strings and token budget (None: not given), 422 beyond the limits."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
        raise ClientError(422, "stop: at most 4 non-empty strings of up to 64 characters")
    limit = services.cfg.serve.limits.max_tokens
    for name in ("max_tokens", "max_completion_tokens"):  # both checked, even when both given
        value = getattr(body, name)
        if value is not None and value > limit:
            raise ClientError(422, f"{name}: at most {limit}")
    return stops, body.max_completion_tokens or body.max_tokens
