"""The FastAPI gateway: :func:`create_app` assembles it from the services and the routes.

Every route maps the authenticated caller to a user and that user to their adapter; no
request field names an adapter or a path. Work runs under a time budget and is cancelled
when the client goes away; refusals are 4xx (or 429/503 with Retry-After under load),
never a 500 for anything a client can send. The routes are in ``api``, the error bodies
and the body-size guard in ``middleware``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from llmrec.launch import free_port
from llmrec_serving import openapi
from llmrec_serving.api import ROUTERS, build_agent
from llmrec_serving.api.deps import declared_query_only
from llmrec_serving.middleware import ERROR_HANDLERS, Guard
from llmrec_serving.services import Services

log = logging.getLogger(__name__)

_STOP_S = 120.0
"""How long :func:`serve_in_thread` waits for the gateway (and its engine) to stop."""


def create_app(services: Services) -> FastAPI:
    """The gateway over ``services``; the engines start and stop with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.engines.start()
        tasks = [
            asyncio.create_task(_sweep_adapters(services)),
            asyncio.create_task(_probe_engines(services)),
        ]
        yield
        for task in tasks:
            task.cancel()
        await services.engines.close()

    app = FastAPI(
        title="llmrec",
        summary="Personal generative recommendations: one LLM, one LoRA adapter per user.",
        version="0.1.0",
        lifespan=lifespan,
        exception_handlers=ERROR_HANDLERS,
    )
    app.state.services = services
    app.state.agent = build_agent(services)
    limits = services.cfg.serve.limits
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, metrics=services.metrics)
    for router in ROUTERS:
        app.include_router(router, dependencies=[Depends(declared_query_only)])
    openapi.install(app, limits)
    return app


async def _sweep_adapters(services: Services) -> None:
    """Unload, every ``store_poll_s``, the adapters of users deleted by another process, and
    those left on an engine that stood in for one that answers again."""
    while True:
        await asyncio.sleep(services.cfg.serve.store_poll_s)
        try:
            await services.engines.sweep()
        except Exception as err:  # a store that cannot be listed now may be readable next time
            log.warning("adapter store sweep failed: %s", err)


async def _probe_engines(services: Services) -> None:
    """Check every engine's health every ``engine_probe_s``: users follow the answers."""
    while True:
        await asyncio.sleep(services.cfg.serve.engine_probe_s)
        await services.engines.probe()


class GatewayStartError(RuntimeError):
    """The gateway of :func:`serve_in_thread` exited while starting, or did not serve in time."""


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str, startup_timeout_s: float) -> Iterator[str]:
    """``app`` served by uvicorn in a background thread on a free port of ``host``; yields
    its base URL once it serves, and stops it after the block.

    The app's lifespan starts and stops the engine (a managed vLLM server with it).
    """
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise GatewayStartError("the gateway failed to start (its log is above)")
            if time.monotonic() > deadline:
                raise GatewayStartError(f"the gateway did not start in {startup_timeout_s:.0f} s")
            time.sleep(0.2)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=_STOP_S)
