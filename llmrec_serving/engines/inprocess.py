"""The in-process backend: transformers + peft in the gateway, for hosts without vLLM.

Adapters stay resident as tensors (validated LoraWeights); a request copies its adapter
into the base's one swappable LoRA (``llmrec.adapters.SwappableLora``: exact for any rank up
to its own) and holds it until the request ends, so requests run one at a time and the
admission queue in front orders them. Ranking reuses ``llmrec.recommend``'s KV-cache
scorer; each beam step runs in a worker thread so the event loop stays free and
a cancelled request stops between steps. Generation streams through transformers'
TextIteratorStreamer and stops at the next token when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llmrec.adapters import AdapterValidationError, LoraWeights, SwappableLora
from llmrec.recommend import BeamStep, KVCacheScorer, Scores
from llmrec_serving.engines.backend import (
    Delta,
    GenerationParams,
    Messages,
    ResetListeners,
    ServedAdapter,
    Usage,
)


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def _cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the first stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@torch.no_grad()
def _top_tokens(
    model: torch.nn.Module, prompt_ids: Sequence[int], allowed: Sequence[int], k: int
) -> list[tuple[int, float]]:
    ids = torch.tensor([list(prompt_ids)])
    logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
    cols = torch.tensor(list(allowed), dtype=torch.long)
    logprobs = torch.log_softmax(logits[cols].float(), dim=-1)
    top = logprobs.topk(min(k, len(cols)))
    return [(int(cols[i]), float(v)) for v, i in zip(top.values, top.indices, strict=True)]


class InProcessBackend:
    """Serves one base model with per-request adapters through a single swappable LoRA."""

    kind = "inprocess"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        rank: int,
        target_modules: Sequence[str],
        max_model_len: int,
    ):
        self.lora = SwappableLora(model, rank, tuple(target_modules))
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.resets = ResetListeners()
        self._weights: dict[str, tuple[str, LoraWeights]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Nothing to start: the model is loaded."""

    async def close(self) -> None:
        """Nothing to stop."""

    async def ready(self) -> bool:
        """Always ready once constructed."""
        return True

    async def load_adapter(self, adapter: ServedAdapter, weights: LoraWeights) -> None:
        """Keep the weights resident; refuse what the swappable LoRA cannot hold."""
        if weights.r > self.lora.rank:
            raise AdapterValidationError(adapter.path, f"rank {weights.r} > {self.lora.rank}")
        if set(weights.target_modules) != set(self.lora.target_modules):
            raise AdapterValidationError(
                adapter.path, f"targets {list(weights.target_modules)} differ from its LoRA's"
            )
        self._weights[adapter.name] = (adapter.digest, weights)

    async def unload_adapter(self, name: str) -> None:
        """Drop the resident weights."""
        self._weights.pop(name, None)

    @contextlib.contextmanager
    def _active(self, adapter: ServedAdapter | None) -> Iterator[torch.nn.Module]:
        """The model with ``adapter`` in its LoRA (or with the LoRA switched off)."""
        if adapter is None:
            with self.lora.model.disable_adapter():
                yield self.lora.model
            return
        digest, weights = self._weights[adapter.name]
        # The label carries the digest: a re-published user reuses the name, not the weights.
        self.lora.use(weights, f"{adapter.name}#{digest}")
        yield self.lora.model

    @asynccontextmanager
    async def scorer(self, adapter: ServedAdapter | None, prompt_ids: Sequence[int]):
        """A KV-cache scorer holding the model until the search ends."""
        async with self._lock:
            with self._active(adapter) as model:
                local = KVCacheScorer(model, prompt_ids)

                async def score(step: BeamStep) -> Scores:
                    return await asyncio.to_thread(local, step)

                yield score

    async def top_tokens(
        self,
        adapter: ServedAdapter | None,
        prompt_ids: Sequence[int],
        allowed: Sequence[int],
        k: int,
    ) -> list[tuple[int, float]]:
        """One forward pass; the log-softmax over ``allowed`` at the last position, top k."""
        async with self._lock:
            with self._active(adapter) as model:
                return await asyncio.to_thread(_top_tokens, model, prompt_ids, allowed, k)

    async def chat(
        self, adapter: ServedAdapter | None, messages: Messages, params: GenerationParams
    ) -> AsyncIterator[Delta]:
        """Stream the answer token by token; closing the iterator stops generation."""
        async with self._lock:
            with self._active(adapter) as model:
                async for delta in self._generate(model, messages, params):
                    yield delta

    async def _generate(
        self, model: torch.nn.Module, messages: Messages, params: GenerationParams
    ) -> AsyncIterator[Delta]:
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        n_prompt = int(inputs["input_ids"].shape[1])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        sampling = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.temperature > 0
            else {"do_sample": False}
        )
        result: dict[str, torch.Tensor] = {}

        def run() -> None:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            try:
                with torch.inference_mode():
                    result["out"] = model.generate(
                        **inputs,
                        max_new_tokens=params.max_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                        repetition_penalty=params.repetition_penalty,
                        **sampling,
                    )
            except BaseException:
                streamer.end()  # never leave the reader waiting on a dead thread
                raise

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        hold = max((len(s) for s in params.stop), default=0)
        text, sent, finish = "", 0, None
        try:
            while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
                text += piece
                cut = _cut_at_stop(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    cancel.set()
                    break
                # Hold back a tail that could still become a stop string.
                safe = len(text) - hold + 1 if hold else len(text)
                if safe > sent:
                    yield Delta(text[sent:safe])
                    sent = safe
            if len(text) > sent:
                yield Delta(text[sent:])
        finally:
            cancel.set()
            await asyncio.to_thread(worker.join)
        n_out = int(result["out"].shape[1]) - n_prompt if "out" in result else 0
        if finish is None:
            finish = "length" if n_out >= params.max_tokens else "stop"
        yield Delta("", finish, Usage(n_prompt, n_out))
