"""The managed vLLM OpenAI server: command line, start-up health check, restart on death.

vLLM runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
of the CPU build looks up the wrong distribution), in a session of its own so that its
engine and worker processes stop with it. Runtime LoRA loading is switched on through
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; the server binds to 127.0.0.1 because only the
gateway may talk to it (it would let anyone load any adapter path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmrec.atomic import write_json_atomic

log = logging.getLogger(__name__)

MAX_TOP_TOKENS = 100
"""The most log-probabilities one request may ask for (the recommendation API's k cap)."""

_POLL_S = 0.5
_STOP_GRACE_S = 20.0


class EngineStartError(RuntimeError):
    """The vLLM server exited or never became healthy; the message ends with its log."""


def cpu_has_4bit_gemm() -> bool:
    """Whether the vLLM this host runs has its CPU 4-bit GEMM (``serve.quantization=w4a16``):
    on a CPU without AVX-512 vLLM loads its AVX2 kernels, which have none. True off the CPU
    platform."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return True
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


@dataclass(frozen=True)
class EngineSpec:
    """How to start one vLLM server."""

    model: str
    """Local base-model folder."""
    served_name: str
    """The base model's name in the API (``model`` of base requests)."""
    port: int
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    block_size: int
    dtype: str
    kv_cache_gib: float
    cpu_threads: str
    api_key: str = field(repr=False)
    """The server's own key (``VLLM_API_KEY``: in its environment, never on its command
    line, which any local user can read). vLLM checks it on ``/v1/*`` only; the rest of its
    routes are unauthenticated, which is why the server binds to loopback and the gateway
    forwards none of them."""
    extra_args: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The server's argv."""
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--enable-lora",
            "--max-loras", str(self.max_loras),
            "--max-cpu-loras", str(self.max_cpu_loras),
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-model-len", str(self.max_model_len),
            "--block-size", str(self.block_size),
            "--dtype", self.dtype,
            "--disable-uvicorn-access-log",
            # Log-probabilities after allowed_token_ids, renormalised over them: one request
            # then ranks an item-token model's unseen items (top_tokens); with no mask the
            # values equal the raw ones the trie scoring reads.
            "--logprobs-mode", "processed_logprobs",
            "--max-logprobs", str(MAX_TOP_TOKENS),
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        """The server's environment: ours plus the engine settings that only exist as env."""
        return os.environ | {
            "VLLM_API_KEY": self.api_key,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}",
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads,
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }


ENGINE_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(name)s] %(message)s"}},
    # The engine logs each adapter it loads by name and path, both of which hold the user id.
    "filters": {"redact": {"()": "llmrec.pseudonyms.RedactFilter"}},
    "handlers": {
        "engine": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact"],
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"vllm": {"handlers": ["engine"], "level": "INFO", "propagate": False}},
}
"""vLLM's logging (``VLLM_LOGGING_CONFIG_PATH``): its default, with user ids pseudonymized."""


class ManagedServer:
    """One vLLM server child process, restarted when it dies (up to ``max_restarts``)."""

    def __init__(
        self,
        spec: EngineSpec,
        log_file: Path,
        startup_timeout_s: float,
        max_restarts: int,
        on_restart: Callable[[], None],
    ):
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.port}"
        self.log_file = Path(log_file)
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.on_restart = on_restart
        self.restarts = 0
        self.failed: str | None = None  # why it is down for good
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the server and wait until it answers /health; raises EngineStartError."""
        await self._spawn()
        self._watch = asyncio.create_task(self._watchdog())

    async def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM: %s (log: %s)", " ".join(self.spec.command()), self.log_file)
        logging_config = self.log_file.with_suffix(".logging.json")
        write_json_atomic(logging_config, ENGINE_LOGGING)
        with open(self.log_file, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self.spec.command(),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.spec.env() | {"VLLM_LOGGING_CONFIG_PATH": str(logging_config)},
                start_new_session=True,  # its own process group: stop() ends all its children
            )
        await self._wait_healthy()

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.returncode is not None:
                    raise EngineStartError(f"vLLM exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        log.info("vLLM is up (pid %s)", self._proc.pid)
                        return
                await asyncio.sleep(_POLL_S)
        await self._terminate()
        raise EngineStartError(
            f"vLLM not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    async def _watchdog(self) -> None:
        """Restart the server when it dies; the router forgets its adapters each time."""
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.on_restart()
            if self.restarts >= self.max_restarts:
                self.failed = f"vLLM exited with {code} and was restarted {self.restarts} times"
                log.error("%s; giving up:\n%s", self.failed, self.log_tail())
                return
            self.restarts += 1
            log.error("vLLM exited with %s; restart %d/%d", code, self.restarts, self.max_restarts)
            try:
                await self._spawn()
            except EngineStartError as err:
                self.failed = str(err)
                log.error("vLLM restart failed: %s", err)
                return

    async def stop(self) -> None:
        """Stop the server and every process it started."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
