"""``POST /v1/recommendations``: top-k unseen catalog items for the caller, with reasons."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
import asyncio
from functools import partial
from typing import Any

from fastapi import APIRouter, Request

from llmrec_serving.api.deps import Caller, ServicesDep, acting_user, guarded, known_items
from llmrec_serving.middleware import ClientError
from llmrec_serving.schemas import (
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
    error_responses,
)
from llmrec_serving.services import Services

router = APIRouter(tags=["recommend"])


@router.post(
    "/v1/recommendations",
    response_model=RecommendationResponse,
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503, 504),
)
async def recommendations(
    body: RecommendationRequest, request: Request, who: Caller, services: ServicesDep
) -> Any:
    """Top-k unseen catalog items for the caller, each with a one-line reason."""
    cfg, limits = services.cfg, services.cfg.serve.limits
    user = acting_user(who, body.user)
    k = body.k or cfg.recommend.k
    if k > limits.max_k:
        raise ClientError(422, f"k: at most {limits.max_k}")
    known_items(services, body.history or [], "history")
    known_items(services, body.exclude, "exclude")
    if body.context is not None and len(body.context) > limits.max_context_chars:
        raise ClientError(422, f"context: at most {limits.max_context_chars} characters")
    # The profile is the truth, not the data set: a thumbs-down, "never show me X" or a
    # history edit through the agent changes this answer at once.
    stored, never = await asyncio.to_thread(_profile_of, services, user)
    history = list(body.history if body.history is not None else stored)
    history = history[-limits.max_history_items :]
    excluded = set(body.exclude) | set(never) | (set(history) if body.exclude_seen else set())
    explain = cfg.serve.explain if body.explain is None else body.explain

    work = partial(_recommend, services, user, history, k, body.context, excluded, explain)
    return await guarded(services, request, "recommendations", work)


def _profile_of(services: Services, user: str) -> tuple[list[str], list[str]]:
    """The user's current history and exclusions (one worker-thread hop for both)."""
    return services.profiles.history(user), services.profiles.exclusions(user)


async def _recommend(
    services: Services,
    user: str,
    history: list[str],
    k: int,
    context: str | None,
    excluded: set[str],
    explain: bool,
) -> RecommendationResponse:
    """Rank (and explain) with the user's adapter, behind the admission queue."""
    ranker = services.ranker
    async with services.admit(user) as adapter:
        items = await ranker.rank(adapter, history, k, context, excluded)
        if explain and items:
            items = await ranker.explain(adapter, history, items, services.reason_params())
    services.metrics.items.inc(len(items))
    return RecommendationResponse(
        user=user,
        adapter=adapter.name if adapter is not None else "base",
        items=[
            RecommendedItem(
                rank=r, item_id=i.item_id, title=i.title, score=i.score, reason=i.reason
            )
            for r, i in enumerate(items, 1)
        ],
    )
