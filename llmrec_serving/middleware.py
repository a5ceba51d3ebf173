"""What wraps every route: one error body for every refusal, the body-size limit, metrics.

Every error the gateway answers has the same OpenAI-style body (``schemas.ErrorResponse``):
a route refuses with :class:`ClientError`, the admission queue with ``Rejected``, the engine
with ``BackendError``, FastAPI with its validation and HTTP errors; :data:`ERROR_HANDLERS`
turns each into that body. :class:`Guard` refuses oversized bodies (413) before a route
reads them, counts every request by route and status, and writes the access log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrec_serving.admission import Rejected
from llmrec_serving.engines import BackendError
from llmrec_serving.prometheus import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("llmrec_serving.access")
"""One line per request (uvicorn's own access log is off: it prints the query string)."""


class ClientError(Exception):
    """A request the gateway refuses; answered as ``status`` with ``message``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The gateway's error body: ``{"error": {"message", "type", "code"}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


# --------------------------------------------------------------------------- error handlers


async def _client_error(request: Request, err: ClientError) -> JSONResponse:
    return error_response(err.status, err.message, err.headers)


async def _rejected(request: Request, err: Rejected) -> JSONResponse:
    request.app.state.services.metrics.rejected.labels(str(err.status)).inc()
    return error_response(err.status, err.reason, {"Retry-After": str(err.retry_after_s)})


async def _backend_error(request: Request, err: BackendError) -> JSONResponse:
    log.warning("backend: %s", err.message)
    retry_after_s = request.app.state.services.cfg.serve.limits.retry_after_s
    headers = {"Retry-After": str(retry_after_s)} if err.status == 503 else {}
    return error_response(err.status, err.message, headers)


async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:10]
    )
    return error_response(422, problems or "invalid request")


async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return error_response(err.status_code, str(err.detail), getattr(err, "headers", None))


ERROR_HANDLERS = {
    ClientError: _client_error,
    Rejected: _rejected,
    BackendError: _backend_error,
    RequestValidationError: _invalid,
    StarletteHTTPException: _http,
}
"""The app's exception handlers: every refusal in the one error body."""


# --------------------------------------------------------------------------- ASGI guard


class _TooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: body-size limit (413) and per-route request metrics.

    Pure ASGI rather than BaseHTTPMiddleware so streaming and disconnects pass untouched.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, seen = time.perf_counter(), 500, 0
        started = False
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large()(scope, receive, send)
            self._observe(scope, 413, start)
            return

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            status = 413
            if not started:
                await self._too_large()(scope, receive, send)
        finally:
            self._observe(scope, status, start)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body over {self.max_body_bytes} bytes")

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", "other")
        seconds = time.perf_counter() - start
        self.metrics.requests.labels(name, str(status)).inc()
        self.metrics.latency.labels(name).observe(seconds)
        # The route's template, never the raw path or query: those can hold a user id.
        access_log.info("%s %s %d %.0f ms", scope["method"], name, status, seconds * 1000)
