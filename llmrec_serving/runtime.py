"""Builds the gateway's services from a ServingConfig: base, store, backend, router, keys."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from llmrec.adapters import AdapterStore, AdapterValidationError, module_shapes_for
from llmrec.agent import ProfileStore
from llmrec.data import dataset_from_config
from llmrec.model import (
    BASE_MODEL_ALIAS,
    auto_dtype,
    fingerprint_model_dir,
    load_model,
    load_tokenizer,
    prepare_base_model,
    resolve_model_path,
)
from llmrec.prompts import PromptBuilder
from llmrec_serving.adapters import AdapterRouter
from llmrec_serving.admission import Admission
from llmrec_serving.app import Services
from llmrec_serving.backend import Backend, ResetListeners
from llmrec_serving.config import ServingConfig, engine_rank
from llmrec_serving.keys import KeyStore
from llmrec_serving.launcher import EngineSpec, ManagedServer
from llmrec_serving.metrics import Metrics
from llmrec_serving.ranking import Ranker

log = logging.getLogger(__name__)

BASE_NAME = "base"
"""The base model's served name in vLLM (requests of users with no adapter at all)."""


def base_model_dir(cfg: ServingConfig) -> Path:
    """The local folder of the base model (the packaged SmolLM2 is prepared once)."""
    if cfg.model.name_or_path == BASE_MODEL_ALIAS:
        return Path(prepare_base_model(cfg.model.cache_dir))
    return Path(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))


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
        base_fingerprint=fingerprint_model_dir(base_dir),
    )


def vllm_dtype(cfg: ServingConfig) -> str:
    """The engine dtype: the model section's, with auto resolved as llmrec does."""
    return auto_dtype("cpu") if cfg.model.dtype == "auto" else cfg.model.dtype


def build_backend(cfg: ServingConfig, base_dir: Path, store: AdapterStore, tokenizer) -> Backend:
    """The configured backend (not started yet)."""
    serve = cfg.serve
    if serve.backend == "inprocess":
        from llmrec_serving.inprocess import InProcessBackend

        model, _ = load_model(
            str(base_dir), quantization=cfg.model.quantization, dtype=cfg.model.dtype
        )
        return InProcessBackend(
            model, tokenizer, store.max_rank, cfg.fed.target_modules or [], serve.max_model_len
        )
    from llmrec_serving.vllm_backend import VLLMBackend

    if serve.vllm_url is not None:
        return VLLMBackend(serve.vllm_url, BASE_NAME, serve.max_model_len)
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
    backend = VLLMBackend(server.url, BASE_NAME, serve.max_model_len, server=server)
    backend.resets = resets
    return backend


def build_services(cfg: ServingConfig) -> Services:
    """Everything the gateway needs, from the config (the backend starts with the app)."""
    base_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(str(base_dir))
    dataset = dataset_from_config(cfg)
    store = open_store(cfg, base_dir)
    log.info("serving %s with adapters from %s (max rank %d)", base_dir, store.root, store.max_rank)
    prompts = PromptBuilder(
        tokenizer,
        max_history_items=cfg.prompts.max_history_items,
        max_prompt_tokens=min(cfg.prompts.max_prompt_tokens, cfg.serve.max_model_len - 64),
    )
    metrics = Metrics()
    backend = build_backend(cfg, base_dir, store, tokenizer)
    limits = cfg.serve.limits
    return Services(
        cfg=cfg,
        backend=backend,
        router=AdapterRouter(store, backend, cfg.serve.max_cpu_loras, metrics),
        ranker=Ranker(backend, dataset.catalog, prompts, cfg.recommend.beam_width),
        prompts=prompts,
        tokenizer=tokenizer,
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
