"""The operator's routes: liveness, readiness and the Prometheus metrics."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmrec_serving.api.deps import ServicesDep

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "The engine does not answer: the same body, unavailable."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: the engine answers and can take requests."""
    ok = await services.backend.ready()
    body = {
        "status": "ready" if ok else "unavailable",
        "backend": services.backend.kind,
        "adapters_loaded": len(services.router.loaded),
        "queue": {"running": services.admission.running, "waiting": services.admission.waiting},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(services: ServicesDep) -> Response:
    """Prometheus metrics of the gateway."""
    metrics = services.metrics
    metrics.queue_waiting.set(services.admission.waiting)
    metrics.queue_running.set(services.admission.running)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
