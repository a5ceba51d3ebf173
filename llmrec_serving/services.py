"""What the gateway's routes use, built once per process from a ServingConfig.

:class:`Services` holds the engines (each with its adapter router), the ranker, the
profiles, the keys, the admission queue and the metrics; :func:`build_services` builds them
from the config (the engines themselves start with the app).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrec.adapters import AdapterStore, AdapterValidationError, module_shapes_for
from llmrec.agent import ProfileStore
from llmrec.data import Catalog, dataset_from_config
from llmrec.model import (
    BASE_MODEL_ALIAS,
    auto_dtype,
    load_model,
    load_tokenizer,
    prepare_base_model,
    resolve_model_path,
)
from llmrec.model.item_space import ItemSpace
from llmrec.model.item_vocab import ItemVocab, has_item_vocab, history_reading
from llmrec.model.quantized import adapter_fingerprint, prepare_quantized_version
from llmrec.prompts import PromptBuilder
from llmrec.recommend.reasons import Reasoner
from llmrec_serving.adapters import AdapterRouter
from llmrec_serving.admission import Admission
from llmrec_serving.config import ServingConfig, engine_rank
from llmrec_serving.engines import (
    Backend,
    BackendError,
    EngineSpec,
    GenerationParams,
    InProcessBackend,
    Lease,
    ManagedServer,
    ResetListeners,
    VLLMBackend,
)
from llmrec_serving.keys import KeyStore
from llmrec_serving.prometheus import Metrics
from llmrec_serving.ranking import ItemReading, Ranker
from llmrec_serving.replicas import Engine, Replicas

log = logging.getLogger(__name__)

BASE_NAME = "base"
"""The base model's served name in vLLM (requests of users with no adapter at all)."""


@dataclass
class Services:
    """Everything the routes use, built once per process (:func:`build_services`)."""

    cfg: ServingConfig
    engines: Replicas
    """The engines, each with the adapters loaded on it; a user is served by one of them."""
    store: AdapterStore
    ranker: Ranker
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
        """For the block: an admission permit for ``user_id``'s request, their engine, and
        their adapter loaded and pinned on it. Raises ``Rejected`` when refused, and
        BackendError(503) when no engine answers. A request that fails as if its engine
        were dead has the engine checked at once, so the next ones go elsewhere."""
        async with self.admission.permit(user_id):
            engine = self.engines.pick(user_id)
            try:
                async with engine.router.use(user_id) as adapter:
                    self.metrics.engine_requests.labels(engine.name).inc()
                    yield Lease(engine.backend, adapter)
            except BackendError as err:
                if err.status >= 502:
                    await self.engines.check(engine)
                raise


def specials_pattern(tokenizer: Any) -> re.Pattern | None:
    """One pattern matching every special token of ``tokenizer`` (longest first)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    specials = sorted((s for s in found if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def base_model_dir(cfg: ServingConfig) -> Path:
    """The local folder of the served base model (the packaged SmolLM2 is prepared once;
    under ``serve.quantization=w4a16`` its 4-bit version, built once beside it)."""
    if cfg.model.name_or_path == BASE_MODEL_ALIAS:
        base = Path(prepare_base_model(cfg.model.cache_dir))
    else:
        base = Path(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))
    return prepare_quantized_version(base) if cfg.serve.quantization == "w4a16" else base


def stored_ranks(store: AdapterStore) -> list[int]:
    """Ranks of the current adapters in ``store`` (broken entries are skipped)."""
    ranks = []
    for user_id in [*store.users(), None]:
        with contextlib.suppress(AdapterValidationError):
            ref = store.current(user_id) if user_id is not None else store.shared()
            if ref is not None:
                ranks.append(ref.manifest.rank)
    return ranks


def open_store(cfg: ServingConfig, base_dir: Path) -> AdapterStore:
    """The adapter store, validating against the served base at the engine's rank."""
    rank = engine_rank(stored_ranks(AdapterStore(cfg.store_dir)), cfg.serve.max_lora_rank)
    return AdapterStore(
        cfg.store_dir,
        max_rank=rank,
        module_shapes=module_shapes_for(base_dir),
        base_fingerprint=adapter_fingerprint(base_dir),
    )


def vllm_dtype(cfg: ServingConfig) -> str:
    """The engine dtype: the model section's, with auto resolved as llmrec does (always a
    16-bit one for a 4-bit base: vLLM's 4-bit CPU kernel computes in nothing else)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    dtype = auto_dtype("cpu")
    return "bfloat16" if cfg.serve.quantization != "none" and dtype == "float32" else dtype


def cpu_shares(n: int, cpus: list[int]) -> list[str]:
    """``cpus`` cut into ``n`` contiguous shares as vLLM's core lists ("0,1"), one per
    managed engine: engines sharing cores would slow each other down."""
    if len(cpus) < n:
        raise ValueError(f"serve.replicas={n} engines need at least {n} CPU cores, not {len(cpus)}")
    cut = [len(cpus) * i // n for i in range(n + 1)]
    return [",".join(map(str, cpus[cut[i] : cut[i + 1]])) for i in range(n)]


def build_backends(
    cfg: ServingConfig, base_dir: Path, store: AdapterStore, tokenizer: Any
) -> list[Backend]:
    """The configured engines (not started yet): one in process, the attached vLLM servers,
    or ``serve.replicas`` managed ones."""
    serve = cfg.serve
    if serve.backend == "inprocess":
        model, _ = load_model(
            str(base_dir), quantization=cfg.model.quantization, dtype=cfg.model.dtype
        )
        return [
            InProcessBackend(
                model, tokenizer, store.max_rank, cfg.fed.target_modules or [], serve.max_model_len
            )
        ]
    if serve.vllm_urls:
        key = serve.vllm_api_key.get_secret_value() if serve.vllm_api_key else None
        return [
            VLLMBackend(url, BASE_NAME, serve.max_model_len, api_key=key) for url in serve.vllm_urls
        ]
    threads = [serve.cpu_threads] * serve.replicas
    if serve.replicas > 1 and serve.cpu_threads == "auto":
        threads = cpu_shares(serve.replicas, sorted(os.sched_getaffinity(0)))
    return [managed_backend(cfg, base_dir, store, i, threads[i]) for i in range(serve.replicas)]


def managed_backend(
    cfg: ServingConfig, base_dir: Path, store: AdapterStore, index: int, cpu_threads: str
) -> VLLMBackend:
    """Managed vLLM server ``index`` (port ``vllm_port + index``, log ``vllm-<index>.log``;
    the first one's is ``vllm.log``) and the backend that drives it."""
    serve = cfg.serve
    spec = EngineSpec(
        model=str(base_dir),
        served_name=BASE_NAME,
        port=serve.vllm_port + index,
        max_loras=serve.max_loras,
        max_cpu_loras=serve.max_cpu_loras,
        max_lora_rank=store.max_rank,
        max_model_len=serve.max_model_len,
        block_size=serve.block_size,
        dtype=vllm_dtype(cfg),
        kv_cache_gib=serve.kv_cache_gib,
        cpu_threads=cpu_threads,
        api_key=secrets.token_urlsafe(32),  # a new one per gateway: only it talks to vLLM
        extra_args=tuple(serve.vllm_args),
    )
    resets = ResetListeners()
    server = ManagedServer(
        spec,
        log_file=serve.keys_file.parent / (f"vllm-{index}.log" if index else "vllm.log"),
        startup_timeout_s=serve.vllm_startup_timeout_s,
        max_restarts=serve.vllm_max_restarts,
        on_restart=resets.fire,  # a restarted engine has no adapters loaded
    )
    backend = VLLMBackend(
        server.url, BASE_NAME, serve.max_model_len, server=server, api_key=spec.api_key
    )
    backend.resets = resets
    return backend


def item_reading(cfg: ServingConfig, base_dir: Path) -> ItemReading | None:
    """How the served base reads histories, when it is an item-token base."""
    if not has_item_vocab(base_dir):
        return None
    render, window = history_reading(base_dir, cfg.llm.window)
    return ItemReading(ItemVocab.read(base_dir), render, window)


def build_services(cfg: ServingConfig) -> Services:
    """Everything the gateway needs, from the config (the backend starts with the app)."""
    base_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(str(base_dir))
    dataset = dataset_from_config(cfg)
    store = open_store(cfg, base_dir)
    log.info("serving %s with adapters from %s (max rank %d)", base_dir, store.root, store.max_rank)
    budget = min(cfg.prompts.max_prompt_tokens, cfg.serve.max_model_len - 64)
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts, max_prompt_tokens=budget)
    metrics = Metrics()
    capacity = cfg.serve.max_cpu_loras
    engines = Replicas(
        [
            Engine(f"engine-{i}", b, AdapterRouter(store, b, capacity, metrics, f"engine-{i}"))
            for i, b in enumerate(build_backends(cfg, base_dir, store, tokenizer))
        ]
    )
    limits = cfg.serve.limits
    reading = item_reading(cfg, base_dir)
    return Services(
        cfg=cfg,
        engines=engines,
        store=store,
        ranker=Ranker(
            dataset.catalog,
            prompts,
            cfg.recommend.beam_width,
            reading,
            Reasoner(dataset.catalog, ItemSpace.from_model_dir(base_dir) if reading else None),
            cfg.serve.reasons,
        ),
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
