"""Request and response models: recommendations, the agent's routes, the OpenAI chat subset.

Our own API forbids unknown fields (a typo is a 422, not silently ignored); the OpenAI
models ignore them, as vLLM does, so clients that send extra OpenAI options still work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmrec.agent import FeedbackRecord

# ----------------------------------------------------------------------------- ours


class RecommendationRequest(BaseModel):
    """Ask for the next items for one user."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    user: str | None = None
    """The user; optional with a user key (it must be the key's user), required with the
    admin key."""
    k: int | None = Field(None, ge=1)
    """How many items (default: the recommend section's k; at most the server's limit)."""
    context: str | None = None
    """Optional free-text request, e.g. "something light tonight"."""
    history: list[str] | None = None
    """Item ids watched, oldest first; default: the user's current history (their profile,
    with every edit and thumbs-up applied)."""
    exclude: list[str] = []
    """Item ids never to return, on top of the user's own exclusions (always applied)."""
    exclude_seen: bool = True
    """Never return items of the history ranked from (this request's, else the profile's)."""
    explain: bool | None = None
    """Add a one-line reason per item (default: the server's setting)."""


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


class ErrorBody(BaseModel):
    """OpenAI-style error detail."""

    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """Every error the gateway answers."""

    error: ErrorBody


# ----------------------------------------------------------------------------- the agent's


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


# ----------------------------------------------------------------------------- OpenAI chat


class TextPart(BaseModel):
    """A text part of a multi-part message (the only kind served)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI ``POST /v1/chat/completions`` (the subset a text chat uses)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    """``llmrec-raw``: the adapter's free generation; any other name: the personal agent.
    Either way the adapter is the caller's own, chosen by their key."""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    """vLLM's extension: > 1 makes tokens already in the text less likely (default:
    ``serve.repetition_penalty``)."""
    user: str | None = None
    """With the admin key: the user whose adapter answers. With a user key: omitted or
    that user."""


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmrec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
