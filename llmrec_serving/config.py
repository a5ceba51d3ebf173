"""The ``serve`` section: the gateway, the vLLM engine it runs, and the request limits.

``ServingConfig`` is :class:`llmrec.config.AppConfig` plus this section, loaded the same
way (defaults < YAML < ``LLMREC_*`` env, e.g. ``LLMREC_SERVE__PORT=9000`` < ``a.b=c``), so
one YAML file configures training, evaluation and serving alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from llmrec.config import AppConfig, load_config

_DOCS = ConfigDict(use_attribute_docstrings=True, extra="forbid")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM accepts as ``--max-lora-rank`` (vllm.config.lora.MaxLoRARanks)."""


class LimitsConfig(BaseModel):
    model_config = _DOCS

    max_body_bytes: int = Field(65536, ge=1024)
    """Largest request body; a bigger one gets 413 before it is parsed."""
    max_k: int = Field(50, ge=1, le=500)
    """Most items one recommendation request may ask for (beam width grows with k)."""
    max_history_items: int = Field(200, ge=1)
    """Longest history (and exclude list) a request may carry; the prompt keeps the last few."""
    max_context_chars: int = Field(500, ge=0)
    """Longest free-text context of a recommendation request."""
    max_tokens: int = Field(256, ge=1)
    """Most tokens a chat completion may generate."""
    max_messages: int = Field(64, ge=1)
    """Most messages in one chat request."""
    max_message_chars: int = Field(8000, ge=1)
    """Longest single chat message."""
    request_timeout_s: float = Field(120.0, gt=0)
    """Wall-clock budget of one request, queueing included; past it the answer is 504."""
    max_concurrency: int = Field(8, ge=1)
    """Requests the backend works on at once; more wait in the queue."""
    max_queue: int = Field(64, ge=0)
    """Requests allowed to wait; one more gets 503 + Retry-After instead of a longer queue."""
    per_user_concurrency: int = Field(4, ge=1)
    """Requests one user may have queued or running; one more gets 429 + Retry-After."""
    queue_timeout_s: float = Field(30.0, gt=0)
    """Longest wait in the queue for a permit to run before 503 + Retry-After."""
    retry_after_s: int = Field(1, ge=1)
    """The Retry-After seconds sent with 429/503."""


class ServeConfig(BaseModel):
    model_config = _DOCS

    backend: Literal["vllm", "inprocess"] = "vllm"
    """vllm: vLLM OpenAI servers (managed child processes, or ``vllm_urls``); inprocess:
    transformers + peft in the gateway process (where vLLM cannot be installed)."""
    host: str = "127.0.0.1"
    """Gateway bind address."""
    port: int = Field(8000, ge=1, le=65535)
    """Gateway port."""
    vllm_urls: list[str] = []
    """Attach to these already running vLLM servers (e.g. ``[http://10.0.0.5:8001,
    http://10.0.0.6:8001]``) instead of starting any; each must have been started with
    --enable-lora and runtime LoRA updating. Users are spread over them by consistent
    hashing (``llmrec_serving.replicas``)."""
    vllm_api_key: SecretStr | None = None
    """The API key of the attached servers (``vllm_urls``), if they have one; a managed
    server gets a new random key at every start."""
    replicas: int = Field(1, ge=1, le=64)
    """Managed vLLM servers to start, on ports ``vllm_port``, ``vllm_port + 1``, ...; users
    are spread over them by consistent hashing, and with ``cpu_threads: auto`` each gets
    its own share of the gateway's CPU cores."""
    engine_probe_s: float = Field(1.0, gt=0)
    """How often the gateway checks every engine's health: a dead engine's users move to
    their next engine within this time (and back once it answers again)."""
    vllm_port: int = Field(8001, ge=1, le=65535)
    """Port of the managed vLLM server (bound to 127.0.0.1: only the gateway talks to it)."""
    vllm_args: list[str] = []
    """Extra command-line arguments for the managed vLLM server."""
    vllm_startup_timeout_s: float = Field(600.0, gt=0)
    """How long the managed server may take to become healthy."""
    vllm_max_restarts: int = Field(3, ge=0)
    """Restarts of a managed server that died before the gateway gives up (readyz -> 503)."""
    store_dir: Path | None = None
    """Adapter store to serve; None = the fed section's store_dir."""
    max_loras: int = Field(4, ge=1)
    """Adapters in one engine batch (vLLM --max-loras): more mixes users, costs memory."""
    max_cpu_loras: int = Field(32, ge=1)
    """Adapters vLLM keeps in memory (--max-cpu-loras); also the gateway's LRU size."""
    max_lora_rank: int | None = None
    """vLLM --max-lora-rank; None = the smallest vLLM rank that holds every stored adapter
    (padding to a larger rank costs speed). Also the store's rank limit."""
    quantization: Literal["none", "w4a16"] = "none"
    """The served foundation model's weights: ``none``, as trained; ``w4a16``, its 4-bit
    version (``llmrec.model.quantized``: 4-bit weights per group of 32 input columns,
    computed in the engine's dtype), built once beside it, with every adapter trained on
    the model served on top. vLLM backend only; computes in bfloat16 (``model.dtype`` auto)
    or float16."""
    max_model_len: int = Field(1024, ge=64)
    """Context length of the engine: prompt + generated tokens."""
    block_size: int = Field(32, ge=16)
    """KV-cache block (vLLM --block-size): prefix caching reuses whole blocks, so small
    blocks let every beam step reuse the recommendation prompt (vLLM's CPU default is 128)."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """vLLM CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_threads: str = "auto"
    """VLLM_CPU_OMP_THREADS_BIND: auto, nobind, or core ids such as 0-3 (for every managed
    server alike; under ``auto`` with several, each is bound to its own share of cores)."""
    store_poll_s: float = Field(2.0, gt=0)
    """How often the gateway looks for users deleted from the adapter store by another
    process (``llmrec user delete``) and unloads their adapters: shorter forgets sooner."""
    keys_file: Path = Path("outputs/serving/keys.json")
    """Hashed API keys (``llmrec keys add USER``); read again when it changes."""
    explain: bool = True
    """Add a one-line reason to each recommended item by default."""
    reasons: Literal["facts", "model"] = "facts"
    """How reasons are written: ``facts``, a fixed sentence of the item's catalog facts and
    the history items nearest it in the model's item space; ``model``, the user's adapter
    phrasing the same facts, kept only when the claim checker finds nothing unsupported
    (else the ``facts`` sentence). See ``llmrec.recommend.reasons``."""
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)
    """The penalty on repeated tokens of free generation (``llmrec-raw`` chat, reasons under
    ``reasons: model``) unless a request sets its own; 1 is none."""
    explain_max_tokens: int = Field(40, ge=1, le=256)
    """Token budget of one reason the adapter phrases (``reasons: model``)."""
    limits: LimitsConfig = LimitsConfig()
    """Request limits, queue and time budget."""

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (vLLM refuses it otherwise)")
        if self.quantization != "none" and self.backend != "vllm":
            raise ValueError(f"quantization={self.quantization} needs backend=vllm")
        if self.replicas > 1 and (self.vllm_urls or self.backend != "vllm"):
            raise ValueError(
                "replicas > 1 starts managed vLLM servers: not with vllm_urls "
                "(list every server there) nor backend=inprocess"
            )
        if self.vllm_urls and self.backend != "vllm":
            raise ValueError("vllm_urls needs backend=vllm")
        if len(set(self.vllm_urls)) != len(self.vllm_urls):
            raise ValueError("vllm_urls lists a server twice")
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        return self


class ServingConfig(AppConfig):
    """Everything ``llmrec serve`` needs: the library's sections plus ``serve``."""

    serve: ServeConfig = ServeConfig()
    """The gateway, its engine and its limits."""

    @model_validator(mode="after")
    def _quantized_in_16_bits(self) -> ServingConfig:
        if self.serve.quantization != "none" and self.model.dtype == "float32":
            raise ValueError(
                f"model.dtype=float32 with serve.quantization={self.serve.quantization}: "
                "vLLM's 4-bit CPU kernel computes in bfloat16 or float16"
            )
        return self

    @property
    def store_dir(self) -> Path:
        """The adapter store served."""
        return self.serve.store_dir or self.fed.store_dir


def load_serving_config(
    path: Path | None = None, overrides: list[str] | None = None
) -> ServingConfig:
    """Like :func:`llmrec.config.load_config`, for the library's sections plus ``serve``."""
    return load_config(path, overrides, cls=ServingConfig)


def engine_rank(store_ranks: list[int], configured: int | None) -> int:
    """The vLLM ``--max-lora-rank``: the configured one, else the smallest that fits all."""
    if configured is not None:
        return configured
    need = max(store_ranks, default=16)
    for rank in VLLM_LORA_RANKS:
        if rank >= need:
            return rank
    raise ValueError(f"an adapter of rank {need} exceeds vLLM's largest rank {VLLM_LORA_RANKS[-1]}")
