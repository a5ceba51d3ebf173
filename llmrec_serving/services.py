"""What the gateway's routes use, built once per process from a ServingConfig.

:class:`Services` holds the engines (each with its adapter router), the ranker, the
profiles, the keys, the admission queue and the metrics; :func:`build_services` builds them
from the config (the engines themselves start with the app).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from llmrec.adapters import AdapterStore
from llmrec.agent import ProfileStore
from llmrec.data import Catalog, dataset_from_config
from llmrec.model import load_tokenizer
from llmrec.model.quantized import adapter_fingerprint
from llmrec.prompts import PromptBuilder
from llmrec_serving.admission import Admission
from llmrec_serving.config import ServingConfig
from llmrec_serving.engines import BackendError, GenerationParams
from llmrec_serving.keys import KeyStore
from llmrec_serving.prometheus import Metrics
from llmrec_serving.ranking import Lease, Ranker
from llmrec_serving.releases import Release, base_model_dir, build_release, compatible
from llmrec_serving.replicas import Replicas

log = logging.getLogger(__name__)


class RolloutError(Exception):
    """A rollout that cannot happen now; ``status`` is the gateway's answer (409 or 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Services:
    """Everything the routes use, built once per process (:func:`build_services`)."""

    cfg: ServingConfig
    release: Release
    """The foundation-model version served now: its store, engines and ranker."""
    prompts: PromptBuilder
    tokenizer: Any
    specials: re.Pattern | None
    """The tokenizer's control tokens, removed from client chat text (a chat must not forge
    turn boundaries); None when it has none."""
    catalog: Catalog
    profiles: ProfileStore
    """Each user's current history and exclusions (the agent's edits and feedback apply
    at once); seeded from the data set on a user's first access."""
    keys: KeyStore
    admission: Admission
    metrics: Metrics
    reload: Callable[[], ServingConfig] | None = None
    """Reads the config again (``llmrec serve``: its file, overrides and environment), for
    :meth:`roll_out`; None refuses rollouts."""
    on_release: list[Callable[[Release], None]] = field(default_factory=list)
    """Called with each new release as it starts serving (the agent takes its reasoner)."""
    _rolling: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def engines(self) -> Replicas:
        """The current release's engines."""
        return self.release.engines

    @property
    def store(self) -> AdapterStore:
        """The current release's adapter store."""
        return self.release.store

    @property
    def ranker(self) -> Ranker:
        """The current release's ranker."""
        return self.release.ranker

    def reason_params(self, max_tokens: int | None = None) -> GenerationParams:
        """How an adapter writes a one-line reason: greedy, one line, the repetition
        penalty of free generation, ``serve.explain_max_tokens`` unless told."""
        serve = self.cfg.serve
        return GenerationParams(
            max_tokens=max_tokens or serve.explain_max_tokens,
            temperature=0.0,
            stop=("\n",),
            repetition_penalty=serve.repetition_penalty,
        )

    @asynccontextmanager
    async def admit(self, user_id: str) -> AsyncIterator[Lease]:
        """For the block: an admission permit for ``user_id``'s request, the current
        release (pinned: a rollout waits for the block to end before stopping it), the
        user's engine, and their adapter loaded and pinned on it. Raises ``Rejected`` when
        refused, and BackendError(503) when no engine answers. A request that fails as if
        its engine were dead has the engine checked at once, so the next ones go elsewhere."""
        async with self.admission.permit(user_id):
            release = self.release
            with release.pinned():
                engine = release.engines.pick(user_id)
                try:
                    async with engine.router.use(user_id) as adapter:
                        self.metrics.engine_requests.labels(engine.name).inc()
                        yield Lease(engine.backend, adapter, release.ranker)
                except BackendError as err:
                    if err.status >= 502:
                        await release.engines.check(engine)
                    raise

    async def roll_out(self) -> dict[str, Any]:
        """Serve the foundation-model version the config names now (read again through
        :attr:`reload`): build its release, start and warm its engines beside the current
        ones, switch, then stop the old engines once the requests pinned to them are done.
        Nothing changes when the config names the served base and store (``changed``
        false). Raises RolloutError: 409 when no config can be read again, one is under
        way, the config is invalid or its base reads histories otherwise; 503 when the new
        engines do not start (the current release serves on)."""
        if self.reload is None:
            raise RolloutError(409, "this gateway was not started from a config it can reread")
        if self._rolling.locked():
            raise RolloutError(409, "a rollout is under way")
        async with self._rolling:
            try:
                cfg = await asyncio.to_thread(self.reload)
                base_dir = await asyncio.to_thread(base_model_dir, cfg)
                fingerprint = await asyncio.to_thread(adapter_fingerprint, base_dir)
            except Exception as err:  # a config or base that cannot be read: say why
                raise RolloutError(409, f"the config cannot be served: {err}") from err
            old = self.release
            served = (old.fingerprint, old.store.root.resolve())
            if (fingerprint, cfg.store_dir.resolve()) == served:
                return old.describe() | {"changed": False}
            try:
                new = await asyncio.to_thread(
                    build_release, cfg, base_dir, old.number + 1, self.catalog, self.prompts,
                    self.tokenizer, self.metrics,
                )  # fmt: skip
            except Exception as err:
                raise RolloutError(409, f"the config cannot be served: {err}") from err
            why = compatible(old, new)
            if why is not None:
                await new.engines.close()
                raise RolloutError(409, f"cannot roll out: {why}")
            try:
                await new.engines.start()
            except Exception as err:
                await new.engines.close()
                raise RolloutError(503, f"the new release did not start: {err}") from err
            self.release, self.cfg = new, cfg
            for listener in self.on_release:
                listener(new)
            log.info("release %d serves; release %d drains (%d requests)",
                     new.number, old.number, old.active)  # fmt: skip
            try:
                await asyncio.wait_for(old.idle.wait(), cfg.serve.limits.request_timeout_s)
            except TimeoutError:
                log.warning("release %d: %d requests still running; stopping it", old.number,
                            old.active)  # fmt: skip
            await old.engines.close()
            return new.describe() | {"changed": True}


def specials_pattern(tokenizer: Any) -> re.Pattern | None:
    """One pattern matching every special token of ``tokenizer`` (longest first)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    specials = sorted((s for s in found if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def build_services(cfg: ServingConfig) -> Services:
    """Everything the gateway needs, from the config (the engines start with the app)."""
    base_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(str(base_dir))
    dataset = dataset_from_config(cfg)
    budget = min(cfg.prompts.max_prompt_tokens, cfg.serve.max_model_len - 64)
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts, max_prompt_tokens=budget)
    metrics = Metrics()
    limits = cfg.serve.limits
    return Services(
        cfg=cfg,
        release=build_release(cfg, base_dir, 1, dataset.catalog, prompts, tokenizer, metrics),
        prompts=prompts,
        tokenizer=tokenizer,
        specials=specials_pattern(tokenizer),
        catalog=dataset.catalog,
        profiles=ProfileStore(
            cfg.profile.url, dataset.catalog, dataset.histories, cfg.profile.max_conversations
        ),
        keys=KeyStore(cfg.serve.keys_file),
        admission=Admission(
            limits.max_concurrency,
            limits.max_queue,
            limits.per_user_concurrency,
            limits.queue_timeout_s,
            limits.retry_after_s,
        ),
        metrics=metrics,
    )
