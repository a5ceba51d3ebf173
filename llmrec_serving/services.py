"""What the gateway's routes use, built once per process from a ServingConfig.

:class:`Services` holds the engine, the adapter router, the ranker, the profiles, the keys,
the admission queue and the metrics; :func:`build_services` builds them from the config
(the engine itself starts with the app).
"""

from __future__ import annotations

import contextlib
import logging
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
    EngineSpec,
    GenerationParams,
    InProcessBackend,
    ManagedServer,
    ResetListeners,
    ServedAdapter,
    VLLMBackend,
)
from llmrec_serving.keys import KeyStore
from llmrec_serving.prometheus import Metrics
from llmrec_serving.ranking import ItemReading, Ranker

log = logging.getLogger(__name__)

BASE_NAME = "base"
"""The base model's served name in vLLM (requests of users with no adapter at all)."""


@dataclass
class Services:
    """Everything the routes use, built once per process (:func:`build_services`)."""

    cfg: ServingConfig
    backend: Backend
    router: AdapterRouter
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
    async def admit(self, user_id: str) -> AsyncIterator[ServedAdapter | None]:
        """For the block: an admission permit for ``user_id``'s request, then their adapter,
        loaded and pinned (None: the bare base model). Raises ``Rejected`` when refused."""
        async with self.admission.permit(user_id), self.router.use(user_id) as adapter:
            yield adapter


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


def build_backend(cfg: ServingConfig, base_dir: Path, store: AdapterStore, tokenizer) -> Backend:
    """The configured backend (not started yet)."""
    serve = cfg.serve
    if serve.backend == "inprocess":
        model, _ = load_model(
            str(base_dir), quantization=cfg.model.quantization, dtype=cfg.model.dtype
        )
        return InProcessBackend(
            model, tokenizer, store.max_rank, cfg.fed.target_modules or [], serve.max_model_len
        )
    if serve.vllm_url is not None:
        key = serve.vllm_api_key.get_secret_value() if serve.vllm_api_key else None
        return VLLMBackend(serve.vllm_url, BASE_NAME, serve.max_model_len, api_key=key)
    spec = EngineSpec(
        model=str(base_dir),
        served_name=BASE_NAME,
        port=serve.vllm_port,
        max_loras=serve.max_loras,
        max_cpu_loras=serve.max_cpu_loras,
        max_lora_rank=store.max_rank,
        max_model_len=serve.max_model_len,
        block_size=serve.block_size,
        dtype=vllm_dtype(cfg),
        kv_cache_gib=serve.kv_cache_gib,
        cpu_threads=serve.cpu_threads,
        api_key=secrets.token_urlsafe(32),  # a new one per gateway: only it talks to vLLM
        extra_args=tuple(serve.vllm_args),
    )
    resets = ResetListeners()
    server = ManagedServer(
        spec,
        log_file=serve.keys_file.parent / "vllm.log",
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
    backend = build_backend(cfg, base_dir, store, tokenizer)
    limits = cfg.serve.limits
    reading = item_reading(cfg, base_dir)
    return Services(
        cfg=cfg,
        backend=backend,
        router=AdapterRouter(store, backend, cfg.serve.max_cpu_loras, metrics),
        ranker=Ranker(
            backend,
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
