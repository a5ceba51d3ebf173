"""A release: one served foundation-model version, with its adapter store, engines and ranker.

A gateway serves one release at a time (``Services.release``). After a federated run writes
a new served base and publishes every user's adapter against it, :meth:`Services.roll_out`
builds the next release beside the current one (new engines on new ports, warmed up), then
switches: requests admitted from then on run on the new release, requests already admitted
finish on the old one (a release counts the requests pinned to it), and the old engines
stop once the last of them is done. No request is dropped, and no request ever mixes a
base with adapters trained on another.

This module builds releases from the config: the served base folder, the store validated
against it, the configured engines (one in process, attached vLLM servers, or managed
ones), and the ranker that reads the base's item space.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrec.adapters import AdapterStore, AdapterValidationError, module_shapes_for
from llmrec.config import ConfigError
from llmrec.data import Catalog
from llmrec.launch import free_ports
from llmrec.model import (
    BASE_MODEL_ALIAS,
    auto_dtype,
    load_model,
    prepare_base_model,
    resolve_model_path,
)
from llmrec.model.item_space import ItemSpace
from llmrec.model.item_vocab import ItemVocab, has_item_vocab, history_reading
from llmrec.model.quantized import adapter_fingerprint, prepare_quantized_version
from llmrec.prompts import PromptBuilder
from llmrec.recommend.reasons import Reasoner
from llmrec_serving.adapters import AdapterRouter
from llmrec_serving.config import ServingConfig, engine_rank
from llmrec_serving.engines import (
    Backend,
    EngineSpec,
    InProcessBackend,
    ManagedServer,
    ResetListeners,
    VLLMBackend,
)
from llmrec_serving.engines.launcher import cpu_has_4bit_gemm
from llmrec_serving.prometheus import Metrics
from llmrec_serving.ranking import ItemReading, Ranker
from llmrec_serving.replicas import Engine, Replicas

log = logging.getLogger(__name__)

BASE_NAME = "base"
"""The base model's served name in vLLM (requests of users with no adapter at all)."""


@dataclass(eq=False)
class Release:
    """One served foundation-model version and what serves it."""

    number: int
    """1 for the release the gateway started with, then 2, 3, ... per rollout."""
    fingerprint: str
    """The served base's adapter fingerprint: every adapter served was trained on it."""
    store: AdapterStore
    engines: Replicas
    ranker: Ranker
    active: int = 0
    """Requests admitted on this release and not finished."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no request is pinned to it."""

    def __post_init__(self) -> None:
        self.idle.set()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """For the block: one more request runs on this release."""
        self.active += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()

    def describe(self) -> dict[str, Any]:
        """What a rollout reports about it (no paths: they name runs)."""
        return {
            "release": self.number,
            "model": self.fingerprint,
            "engines": [e.name for e in self.engines],
        }


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
    cfg: ServingConfig, base_dir: Path, store: AdapterStore, tokenizer: Any, port: int
) -> list[Backend]:
    """The configured engines (not started yet): one in process, the attached vLLM servers,
    or ``serve.replicas`` managed ones on ports ``port``, ``port + 1``, ..."""
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
    if serve.quantization == "w4a16" and not cpu_has_4bit_gemm():
        raise ConfigError(
            "serve.quantization=w4a16: this CPU has no AVX-512, and vLLM's kernels for it "
            "have no 4-bit matmul; serve with serve.quantization=none"
        )
    threads = [serve.cpu_threads] * serve.replicas
    if serve.replicas > 1 and serve.cpu_threads == "auto":
        threads = cpu_shares(serve.replicas, sorted(os.sched_getaffinity(0)))
    return [
        managed_backend(cfg, base_dir, store, port + i, threads[i]) for i in range(serve.replicas)
    ]


def managed_backend(
    cfg: ServingConfig, base_dir: Path, store: AdapterStore, port: int, cpu_threads: str
) -> VLLMBackend:
    """A managed vLLM server on ``port`` (its log ``vllm.log`` on ``serve.vllm_port``, else
    ``vllm-<port>.log``) and the backend that drives it."""
    serve = cfg.serve
    spec = EngineSpec(
        model=str(base_dir),
        served_name=BASE_NAME,
        port=port,
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
        log_file=serve.keys_file.parent
        / ("vllm.log" if port == serve.vllm_port else f"vllm-{port}.log"),
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


def build_release(
    cfg: ServingConfig,
    base_dir: Path,
    number: int,
    catalog: Catalog,
    prompts: PromptBuilder,
    tokenizer: Any,
    metrics: Metrics,
) -> Release:
    """Release ``number`` of ``cfg``'s store over the served base ``base_dir``
    (:func:`base_model_dir`), engines built, not started. Managed engines of a later
    release take free ports: the current ones still serve."""
    store = open_store(cfg, base_dir)
    log.info("release %d: %s with adapters from %s (max rank %d)",
             number, base_dir, store.root, store.max_rank)  # fmt: skip
    port = cfg.serve.vllm_port if number == 1 else free_ports(cfg.serve.replicas)
    capacity = cfg.serve.max_cpu_loras
    engines = []
    for i, backend in enumerate(build_backends(cfg, base_dir, store, tokenizer, port)):
        name = f"engine-{i}" if number == 1 else f"r{number}-engine-{i}"
        engines.append(
            Engine(name, backend, AdapterRouter(store, backend, capacity, metrics, name))
        )
    reading = item_reading(cfg, base_dir)
    ranker = Ranker(
        catalog,
        prompts,
        cfg.recommend.beam_width,
        reading,
        Reasoner(catalog, ItemSpace.from_model_dir(base_dir) if reading else None),
        cfg.serve.reasons,
    )
    return Release(number, adapter_fingerprint(base_dir), store, Replicas(engines), ranker)


def compatible(old: Release, new: Release) -> str | None:
    """Why ``new`` cannot replace ``old`` under the same gateway, or None: it must read
    histories alike (the same item vocabulary, rendering and window, or both none), since
    profiles, prompts and the catalog stay."""
    a, b = old.ranker.items, new.ranker.items
    if (a is None) != (b is None):
        return "the new base has item tokens and the served one has none, or the reverse"
    if a is not None and b is not None:
        if a.vocab.item_ids != b.vocab.item_ids or a.vocab.first_token_id != b.vocab.first_token_id:
            return "the new base's item tokens are not the served base's"
        if (a.render, a.window) != (b.render, b.window):
            return (
                f"the new base reads histories as {b.render}/{b.window}, not {a.render}/{a.window}"
            )
    return None
