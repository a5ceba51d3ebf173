"""The interface every engine serves through: adapters in and out, beam steps, chat.

A backend knows nothing about users, keys or the catalog: the gateway hands it a
:class:`ServedAdapter` (already validated) or None for the bare base model, token ids for
ranking, and chat messages for text. Two implementations: ``vllm.VLLMBackend`` (a vLLM
OpenAI server) and ``inprocess.InProcessBackend`` (transformers + peft).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llmrec.adapters import LoraWeights
from llmrec.recommend import BeamStep, Scores


@dataclass(frozen=True)
class ServedAdapter:
    """One stored adapter version as the engine serves it."""

    name: str
    """The served model name, ``<user_id>@v<version>``."""
    user_id: str
    """Owner (``_shared`` for the shared adapter)."""
    path: Path
    """The plain PEFT folder."""
    digest: str
    """sha256 of the weights file: two versions that reuse a name (a user deleted and
    published again) differ here, so caches keyed by it never mix their weights."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one chat completion (already checked against the limits)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    """> 1 divides the logits of tokens already in the prompt or the text (CTRL's penalty,
    as vLLM and transformers apply it)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of generated text; the last one has ``finish_reason`` and ``usage``."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class BackendError(Exception):
    """The engine refused or failed a request; ``status`` is what the gateway answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


Messages = list[dict[str, str]]
"""Chat messages as an engine takes them: ``{"role": ..., "content": ...}``, in order."""

Scorer = Callable[[BeamStep], Awaitable[Scores]]
"""Full-vocabulary log-probabilities of a beam step's candidates, for one prompt."""


@dataclass
class ResetListeners:
    """Callbacks run when the engine lost its loaded adapters (e.g. it was restarted)."""

    callbacks: list[Callable[[], None]] = field(default_factory=list)

    def add(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on every reset."""
        self.callbacks.append(callback)

    def fire(self) -> None:
        """Tell every listener."""
        for callback in self.callbacks:
            callback()


class Backend(Protocol):
    """What the gateway needs from an engine."""

    kind: str
    """Short name for /readyz and the metrics: ``vllm`` or ``inprocess``."""
    max_model_len: int
    """Longest prompt + completion in tokens."""
    resets: ResetListeners
    """Run when the engine forgets its loaded adapters."""

    async def start(self) -> None:
        """Start (or connect to) the engine; returns once it serves."""

    async def close(self) -> None:
        """Stop what :meth:`start` started."""

    async def ready(self) -> bool:
        """True while the engine answers."""

    async def load_adapter(self, adapter: ServedAdapter, weights: LoraWeights) -> None:
        """Make ``adapter`` servable; ``weights`` are its validated tensors."""

    async def unload_adapter(self, name: str) -> None:
        """Forget a loaded adapter (a no-op if it is not loaded)."""

    def scorer(
        self, adapter: ServedAdapter | None, prompt_ids: Sequence[int]
    ) -> AbstractAsyncContextManager[Scorer]:
        """A scorer of beam steps after ``prompt_ids`` on ``adapter`` (None: the base)."""

    async def top_tokens(
        self,
        adapter: ServedAdapter | None,
        prompt_ids: Sequence[int],
        allowed: Sequence[int],
        k: int,
    ) -> list[tuple[int, float]]:
        """The ``k`` most likely next tokens among ``allowed`` after ``prompt_ids``, best
        first, each with its log-probability renormalised over ``allowed``: one forward pass
        (an item-token model's full ranking of the unseen items)."""

    def chat(
        self, adapter: ServedAdapter | None, messages: Messages, params: GenerationParams
    ) -> AsyncIterator[Delta]:
        """Stream the assistant's answer to ``messages``; cancelling the iteration stops it."""
