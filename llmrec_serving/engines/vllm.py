"""The vLLM backend: a vLLM OpenAI server (managed or attached) driven over loopback HTTP.

Ranking: the trie beam search runs in the gateway and asks vLLM, per step, for the
full-vocabulary log-probabilities of exactly the open trie children. One completions
request carries every open beam as a prompt of token ids (the recommendation prompt + the
beam's path) with ``max_tokens=1`` and ``logprob_token_ids`` = the children (vLLM gathers
those ids from the raw log-softmax, at most 128 per request, so larger sets are split).
vLLM's prefix cache keeps the shared prompt, so a step costs about one token per beam.
This reproduces ``llmrec.recommend.Recommender``'s scores exactly (same model, same
log-softmax) and so the same ranking, while vLLM batches all users' steps together.
(Alternatives looked at: ``logprobs=N`` top-N misses children outside the top N; scoring
every title with ``prompt_logprobs`` costs the whole catalog's tokens per request; vLLM's
own beam search cannot be constrained to a trie.)

Adapters: ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (runtime LoRA updating).
vLLM's prefix cache keys blocks by adapter name and path, which a re-published user reuses
(``user@v1`` again), so every request also sends ``cache_salt`` = the weights' sha256.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from llmrec.adapters import LoraWeights
from llmrec.recommend import BeamStep, Scores
from llmrec_serving.engines.backend import (
    BackendError,
    Delta,
    GenerationParams,
    Messages,
    ResetListeners,
    ServedAdapter,
    Usage,
)
from llmrec_serving.engines.launcher import ManagedServer

log = logging.getLogger(__name__)

MAX_LOGPROB_TOKEN_IDS = 128
"""vLLM's cap on ``logprob_token_ids`` per request (vllm.sampling_params)."""
_TOKEN_KEY = "token_id:"  # top_logprobs keys with return_tokens_as_token_ids


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


class VLLMBackend:
    """Talks to one vLLM OpenAI server at ``url`` (with its ``api_key``, when it has one);
    starts and stops it when ``server``."""

    kind = "vllm"

    def __init__(
        self,
        url: str,
        base_name: str,
        max_model_len: int,
        server: ManagedServer | None = None,
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.base_name = base_name
        self.max_model_len = max_model_len
        self.server = server
        self.resets = ResetListeners()
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            # Idle connections expire before uvicorn's 5 s keep-alive closes them server-side.
            limits=httpx.Limits(
                max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0
            ),
        )

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the managed server (or check the attached one), warm it, drop stale adapters."""
        if self.server is not None:
            await self.server.start()
        elif not await self.ready():
            raise BackendError(503, f"no vLLM server answers at {self.url}")
        models = await self._get_json("/v1/models")
        names = [m["id"] for m in models.get("data", [])]
        if self.base_name not in names:
            # An attached server may serve the base under another name: use it.
            roots = [m["id"] for m in models.get("data", []) if m.get("parent") is None]
            if not roots:
                raise BackendError(503, f"vLLM at {self.url} serves no base model")
            log.warning("vLLM serves %s, not %s: using it", roots[0], self.base_name)
            self.base_name = roots[0]
        for model in models.get("data", []):
            if model.get("parent") is not None and "@v" in model["id"]:
                await self.unload_adapter(model["id"])  # an earlier gateway's, maybe stale
        # The first request of a fresh engine pays its warm-up: pay it now.
        await self._post("/v1/completions", {
            "model": self.base_name, "prompt": [0], "max_tokens": 1, "temperature": 0.0,
        })  # fmt: skip

    async def close(self) -> None:
        """Close the HTTP client and stop a managed server."""
        await self._client.aclose()
        if self.server is not None:
            await self.server.stop()

    async def ready(self) -> bool:
        """True while the server answers /health."""
        if self.server is not None and self.server.failed:
            return False
        try:
            return (await self._client.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    # ----------------------------------------------------------------- adapters

    async def load_adapter(self, adapter: ServedAdapter, weights: LoraWeights) -> None:
        """Register the adapter's folder under its name (vLLM reads the files itself)."""
        body = {"lora_name": adapter.name, "lora_path": str(adapter.path.resolve())}
        response = await self._request("POST", "/v1/load_lora_adapter", body)
        if response.status_code == 400 and "already been loaded" in response.text:
            await self.unload_adapter(adapter.name)  # left over from before: maybe other weights
            response = await self._request("POST", "/v1/load_lora_adapter", body)
        if response.status_code != 200:
            raise BackendError(503, f"vLLM refused {adapter.name}: {_error_message(response)}")

    async def unload_adapter(self, name: str) -> None:
        """Unregister ``name``; vLLM's own LRU then frees its memory."""
        response = await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code not in (200, 404):
            raise BackendError(503, f"vLLM could not unload {name}: {_error_message(response)}")

    # ----------------------------------------------------------------- ranking

    @asynccontextmanager
    async def scorer(self, adapter: ServedAdapter | None, prompt_ids: Sequence[int]):
        """Beam-step scorer over HTTP; stateless (each step sends prompt + paths)."""
        prompt = list(prompt_ids)
        target = self._target(adapter)

        async def score(step: BeamStep) -> Scores:
            wanted = sorted({t for cands in step.candidates for t in cands})
            chunks = [
                wanted[i : i + MAX_LOGPROB_TOKEN_IDS]
                for i in range(0, len(wanted), MAX_LOGPROB_TOKEN_IDS)
            ]
            found: list[dict[int, float]] = [{} for _ in step.paths]
            await asyncio.gather(
                *(self._score_chunk(target, prompt, step, c, found) for c in chunks)
            )
            return [[found[row][t] for t in cands] for row, cands in enumerate(step.candidates)]

        yield score

    async def _score_chunk(
        self,
        target: dict[str, Any],
        prompt: list[int],
        step: BeamStep,
        chunk: list[int],
        found: list[dict[int, float]],
    ) -> None:
        """Fill ``found[row]`` with the log-probabilities of ``chunk``'s tokens."""
        chunk_set = set(chunk)
        rows = [r for r, cands in enumerate(step.candidates) if chunk_set.intersection(cands)]
        body = target | {
            "prompt": [prompt + list(step.paths[r]) for r in rows],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(chunk),
            "logprob_token_ids": chunk,
            "return_tokens_as_token_ids": True,
        }
        reply = await self._post("/v1/completions", body)
        for choice in reply["choices"]:
            top = choice["logprobs"]["top_logprobs"][0]
            got = found[rows[choice["index"]]]
            for key, logprob in top.items():
                token = int(key.removeprefix(_TOKEN_KEY))
                if token in chunk_set:
                    got[token] = float(logprob)

    async def top_tokens(
        self,
        adapter: ServedAdapter | None,
        prompt_ids: Sequence[int],
        allowed: Sequence[int],
        k: int,
    ) -> list[tuple[int, float]]:
        """One completions request: ``allowed_token_ids`` masks every other token and
        ``logprobs=k`` returns the top k, renormalised over the allowed ones because the
        engine runs with ``--logprobs-mode processed_logprobs`` (the log-softmax after the
        mask)."""
        body = self._target(adapter) | {
            "prompt": list(prompt_ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": k,
            "allowed_token_ids": list(allowed),
            "return_tokens_as_token_ids": True,
        }
        reply = await self._post("/v1/completions", body)
        top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
        allowed_set = set(allowed)
        ranked = [(int(key.removeprefix(_TOKEN_KEY)), float(v)) for key, v in top.items()]
        ranked = [(t, v) for t, v in ranked if t in allowed_set]
        return sorted(ranked, key=lambda tv: -tv[1])[:k]

    # ----------------------------------------------------------------- chat

    async def chat(
        self, adapter: ServedAdapter | None, messages: Messages, params: GenerationParams
    ) -> AsyncIterator[Delta]:
        """Stream a chat completion from vLLM; leaving the loop closes the request there."""
        body = self._target(adapter) | {
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        finish: str | None = None
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._http_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise BackendError(502, f"vLLM: {chunk['error']}")
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            yield Delta(text)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        yield Delta(
                            "",
                            finish or "stop",
                            Usage(usage["prompt_tokens"], usage.get("completion_tokens", 0)),
                        )
        except httpx.HTTPError as err:
            raise BackendError(503, f"vLLM unavailable: {err!r}") from err

    # ----------------------------------------------------------------- HTTP

    def _target(self, adapter: ServedAdapter | None) -> dict[str, Any]:
        if adapter is None:
            return {"model": self.base_name}
        return {"model": adapter.name, "cache_salt": adapter.digest}

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One request, retried once on a dropped connection: a keep-alive connection the
        server closes just as it is reused fails with no response, and every call made
        here is safe to repeat (scoring reads; a repeated load is handled as a reload)."""
        try:
            return await self._client.request(method, path, json=body)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
            pass  # a stale keep-alive connection: once more on a fresh one
        except httpx.HTTPError as err:
            raise BackendError(503, f"vLLM unavailable: {err!r}") from err
        try:
            return await self._client.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise BackendError(503, f"vLLM unavailable: {err!r}") from err

    async def _post(self, path: str, body: Any) -> dict[str, Any]:
        response = await self._request("POST", path, body)
        if response.status_code != 200:
            raise self._http_error(response)
        return response.json()

    async def _get_json(self, path: str) -> dict[str, Any]:
        response = await self._request("GET", path)
        if response.status_code != 200:
            raise self._http_error(response)
        return response.json()

    @staticmethod
    def _http_error(response: httpx.Response) -> BackendError:
        # vLLM's 4xx are about the request the gateway built from client input (too long a
        # prompt, say): pass them on as 400; its 5xx mean the engine is in trouble.
        status = 400 if 400 <= response.status_code < 500 else 502
        return BackendError(status, f"vLLM: {_error_message(response)}")
