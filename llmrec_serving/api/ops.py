"""The operator's routes: liveness, readiness and the Prometheus metrics."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmrec.pseudonyms import served_name
from llmrec_serving.api.deps import Caller, ServicesDep
from llmrec_serving.middleware import ClientError
from llmrec_serving.schemas import Rollout, error_responses
from llmrec_serving.services import RolloutError

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "No engine answers: the same body, unavailable."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: at least one engine answers and can take requests (each engine's state
    and adapter count are listed)."""
    engines = services.engines
    ok = await engines.probe()
    body = {
        "status": "ready" if ok else "unavailable",
        "backend": engines.kind,
        "release": services.release.number,
        "adapters_loaded": sum(len(e.router.loaded) for e in engines),
        "engines": {e.name: {"up": e.up, "adapters_loaded": len(e.router.loaded)} for e in engines},
        "queue": {"running": services.admission.running, "waiting": services.admission.waiting},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(services: ServicesDep) -> Response:
    """Prometheus metrics of the gateway, with each engine's state and the adapters it
    holds (user ids pseudonymized)."""
    metrics = services.metrics
    metrics.queue_waiting.set(services.admission.waiting)
    metrics.queue_running.set(services.admission.running)
    metrics.engine_adapters.clear()
    for engine in services.engines:
        metrics.engine_up.labels(engine.name).set(int(engine.up))
        for name in engine.router.loaded:
            metrics.engine_adapters.labels(engine.name, served_name(name)).set(1)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/admin/rollout",
    response_model=Rollout,
    responses=error_responses(401, 403, 409, 503),
)
async def rollout(who: Caller, services: ServicesDep) -> Rollout:
    """Admin only: serve the foundation-model version the gateway's config names now (edit
    ``model.name_or_path`` and ``serve.store_dir`` to a new run's base and store, then call
    this). Its engines start and warm beside the current ones; once they serve, new
    requests go to them, requests already running finish on the old engines, and those
    stop. Answers when the new release serves (or 409/503 and the current one serves on)."""
    if not who.admin:
        raise ClientError(403, "only the admin key may roll out a new release")
    try:
        return Rollout(**await services.roll_out())
    except RolloutError as err:
        retry = {"Retry-After": str(services.cfg.serve.limits.retry_after_s)}
        raise ClientError(err.status, err.message, retry if err.status == 503 else None) from err
