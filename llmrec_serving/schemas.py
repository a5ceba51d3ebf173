"""Request and response models: recommendations, the agent's routes, the OpenAI chat subset.

Our own API forbids unknown fields (a typo is a 422, not silently ignored); the OpenAI
models ignore them, as vLLM does, so clients that send extra OpenAI options still work.
Every request model is strict: a value of another JSON type than its schema says ("5" for
an integer, 1 for a boolean) is a 422, never coerced, so the published schema is exactly
what is accepted. The limits an operator sets (``serve.limits``) are written into the
published schema by ``llmrec_serving.openapi``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmrec.adapters import USER_ID_RE
from llmrec.agent import AgentEvent, FeedbackRecord

USER_ID_PATTERN = USER_ID_RE.pattern
"""A user id, in the published schema and checked by it (the store's folder-name rule)."""

UserId = Annotated[str, Field(pattern=USER_ID_PATTERN)]


def _json_integer(value: Any) -> Any:
    """An integer field's check before validation: JSON Schema's integer is any number
    without a fraction (2.0 included), never a string or a boolean. The fields that call it
    are non-strict, so 2.0 becomes 2; this keeps "2" and true out."""
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON integer")
    return value


# ----------------------------------------------------------------------------- ours


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class RecommendationRequest(_Body):
    """Ask for the next items for one user."""

    user: UserId | None = None
    """The user; optional with a user key (it must be the key's user), required with the
    admin key."""
    k: int | None = Field(None, ge=1, strict=False)
    """How many items (default: the recommend section's k; at most the server's limit)."""
    context: str | None = None
    """Optional free-text request, e.g. "something light tonight"."""
    history: list[str] | None = None
    """Item ids watched, oldest first; default: the user's current history (their profile,
    with every edit and thumbs-up applied). An id not in the catalog is a 404."""
    exclude: list[str] = []
    """Item ids never to return, on top of the user's own exclusions (always applied). An
    id not in the catalog is a 404."""
    exclude_seen: bool = True
    """Never return items of the history ranked from (this request's, else the profile's)."""
    explain: bool | None = None
    """Add a one-line reason per item (default: the server's setting)."""
    stream: bool = False
    """Answer as server-sent events (``RecommendationEvent``): the ranked items as soon as
    they are known, then each reason as it is written, then ``done``."""

    _integers = field_validator("k", mode="before")(_json_integer)


class RecommendedItem(BaseModel):
    """One ranked catalog item."""

    rank: int
    """1 = best."""
    item_id: str
    title: str
    """Display title, "Title (Year)"."""
    score: float
    """Log-probability of the title under the user's adapter (higher is better)."""
    reason: str | None = None
    """One-line explanation written by the user's adapter."""


class RecommendationResponse(BaseModel):
    """The ranked items and what produced them."""

    user: str
    adapter: str
    """The served adapter, ``<user>@v<version>``, ``_shared@v<version>`` (cold start) or
    ``base`` (nothing published yet)."""
    items: list[RecommendedItem]


class RecommendationEvent(BaseModel):
    """One event of a streamed recommendation: ``items`` (the ranked list, no reasons yet),
    then one ``reason`` per item in the order they are written, then ``done``; ``error``
    ends a stream that could not finish."""

    type: Literal["items", "reason", "done", "error"]
    user: str | None = None
    """``items``: the user."""
    adapter: str | None = None
    """``items``: the served adapter (as in ``RecommendationResponse``)."""
    items: list[RecommendedItem] | None = None
    """``items``: the ranked items."""
    rank: int | None = None
    """``reason``: the rank of the item it explains."""
    item_id: str | None = None
    """``reason``: the item it explains."""
    reason: str | None = None
    """``reason``: the one-line reason; ``error``: what went wrong."""


class ErrorBody(BaseModel):
    """OpenAI-style error detail."""

    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """Every error the gateway answers."""

    error: ErrorBody


ERROR_DESCRIPTIONS = {
    400: "The request is well formed but cannot be served as asked (the admin key without "
    "the user it acts for, a conversation longer than the model's context).",
    401: "Missing or invalid API key.",
    403: "The key may not act for the user named.",
    404: "What the request names does not exist (an item id not in the catalog, a "
    "conversation or adapter of the caller's that is not there).",
    409: "The gateway's state does not allow it now (a rollout under way, a config that "
    "cannot be served).",
    413: "The request body is over ``serve.limits.max_body_bytes``.",
    422: "The request does not match its schema (the reason says which field).",
    429: "The user has too many requests in flight; retry after ``Retry-After`` seconds.",
    503: "The queue is full or the engine is unavailable; retry after ``Retry-After`` seconds.",
    504: "The request ran past ``serve.limits.request_timeout_s``.",
}


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to ``model`` in the published schema (one of :data:`PUBLISHED`)."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's documented refusals: each status with the one error body, always JSON (also
    on routes whose answer is an event stream or a zip, hence no ``model``: FastAPI would
    publish it under the route's own media type)."""
    content = {"application/json": {"schema": component_ref(ErrorResponse)}}
    return {c: {"description": ERROR_DESCRIPTIONS[c], "content": content} for c in codes}


def event_stream(data: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """A 200 of server-sent events, each event's ``data`` field as ``data`` describes (the
    Open API 3.1 way: the media type's schema is one event)."""
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"schema": event}}}}


def json_text(model: type[BaseModel]) -> dict[str, Any]:
    """A string holding ``model`` as JSON."""
    return {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": component_ref(model),
    }


# ----------------------------------------------------------------------------- the agent's


class ChatRequest(_Body):
    """One user turn."""

    message: str = Field(min_length=1)
    """What the user says."""
    conversation_id: str | None = Field(None, max_length=36)
    """Continue this conversation (one of the caller's); None starts a new one."""


class FeedbackRequest(_Body):
    """Feedback on one item (a card's buttons)."""

    item_id: str = Field(min_length=1, max_length=128)
    """A catalog item id (one that is not is a 404)."""
    action: Literal["up", "down", "forget"]
    """up: liked (joins the history); down: disliked (excluded); forget: never show it
    again, without saying it was disliked."""


class ItemEdit(_Body):
    """Items to add and remove (catalog item ids: one that is not is a 404)."""

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


# ----------------------------------------------------------------------------- OpenAI chat


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, use_attribute_docstrings=True)


class TextPart(_OpenAIBody):
    """A text part of a multi-part message (the only kind served)."""

    type: Literal["text"]
    text: str


class ChatMessage(_OpenAIBody):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def texts(self) -> list[str]:
        """The content's strings: the content itself, or each part's text."""
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [self.content]
        return [part.text for part in self.content]

    def text(self) -> str:
        """The content as one string."""
        return "".join(self.texts())


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1, max_length=64)]

USER_MESSAGE = {"contains": {"properties": {"role": {"const": "user"}}}}
"""JSON Schema of "at least one message is the user's" (the model validator below)."""


class ChatCompletionRequest(_OpenAIBody):
    """OpenAI ``POST /v1/chat/completions`` (the subset a text chat uses)."""

    model: str
    """``llmrec-raw``: the adapter's free generation; any other name: the personal agent.
    Either way the adapter is the caller's own, chosen by their key."""
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra=USER_MESSAGE)
    """At least one is the user's. The agent answers the last user message; the messages
    before it are the conversation so far."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, strict=False)
    max_completion_tokens: int | None = Field(None, ge=1, strict=False)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    """Up to 4 strings of 1-64 characters."""
    n: int | None = Field(None, ge=1, le=1, strict=False)
    seed: int | None = Field(None, ge=0, le=2**53 - 1, strict=False)
    """At most 2^53 - 1, the largest integer every JSON reader keeps exact: a larger one
    may arrive as a float rounded past the engine's int64 (found by ``bench/fuzz.py``)."""
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    """vLLM's extension: > 1 makes tokens already in the text less likely (default:
    ``serve.repetition_penalty``)."""
    user: UserId | None = None
    """With the admin key: the user whose adapter answers. With a user key: omitted or
    that user."""

    _integers = field_validator("max_tokens", "max_completion_tokens", "n", "seed", mode="before")(
        _json_integer
    )

    @model_validator(mode="after")
    def _has_user_message(self) -> ChatCompletionRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one must be the user's")
        return self


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageBody


class DeltaBody(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaBody
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageBody | None = None


class Rollout(BaseModel):
    """The foundation-model release served after a rollout."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    release: int
    """1 for the release the gateway started with, one more per rollout that changed it."""
    model: str
    """The served base's fingerprint (every adapter's manifest names the one it needs)."""
    engines: list[str]
    """The release's engines, as ``/metrics`` labels them."""
    changed: bool
    """False when the config named the base and store already served: nothing was done."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmrec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


PUBLISHED = (ErrorResponse, AgentEvent, ChatCompletionChunk, RecommendationEvent)
"""Models the routes refer to by :func:`component_ref` (not as a route's own model), which
``llmrec_serving.openapi`` therefore adds to the schema's components."""
