"""``POST /v1/recommendations``: top-k unseen catalog items for the caller, with reasons."""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' types.
import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

from fastapi import APIRouter, Request

from llmrec_serving.admission import Rejected
from llmrec_serving.api.deps import Caller, ServicesDep, acting_user, guarded, known_items
from llmrec_serving.api.streams import event_answer, open_stream
from llmrec_serving.engines import BackendError
from llmrec_serving.middleware import ClientError
from llmrec_serving.schemas import (
    RecommendationEvent,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
    error_responses,
    event_stream,
    json_text,
)
from llmrec_serving.services import Services

router = APIRouter(tags=["recommend"])


@router.post(
    "/v1/recommendations",
    response_model=RecommendationResponse,
    responses={
        **event_stream(json_text(RecommendationEvent)),
        **error_responses(400, 401, 403, 404, 413, 422, 429, 503, 504),
    },
)
async def recommendations(
    body: RecommendationRequest, request: Request, who: Caller, services: ServicesDep
) -> Any:
    """Top-k unseen catalog items for the caller, each with a one-line reason; with
    ``stream``, as server-sent events (``RecommendationEvent``): the items first."""
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

    events = _events(services, user, history, k, body.context, excluded, explain)
    if body.stream:
        head = await open_stream(events, limits.request_timeout_s, lambda e: e.type == "items")
        error = partial(RecommendationEvent, type="error")
        expected = (Rejected, BackendError, TimeoutError)
        return event_answer(head, events, lambda m: error(reason=m), expected, f"stream of {user}")
    return await guarded(services, request, "recommendations", partial(_collect, events))


def _profile_of(services: Services, user: str) -> tuple[list[str], list[str]]:
    """The user's current history and exclusions (one worker-thread hop for both)."""
    return services.profiles.history(user), services.profiles.exclusions(user)


async def _events(
    services: Services,
    user: str,
    history: list[str],
    k: int,
    context: str | None,
    excluded: set[str],
    explain: bool,
) -> AsyncIterator[RecommendationEvent]:
    """Rank with the user's adapter behind the admission queue, then explain: the ranked
    items first, then each reason as it is written, then ``done``."""
    async with services.admit(user) as lease:
        ranked = await lease.ranker.rank(lease, history, k, context, excluded)
        services.metrics.items.inc(len(ranked))
        yield RecommendationEvent(
            type="items",
            user=user,
            adapter=lease.model,
            items=[
                RecommendedItem(rank=r, item_id=i.item_id, title=i.title, score=i.score)
                for r, i in enumerate(ranked, 1)
            ],
        )
        if explain:
            params = services.reason_params()
            async for index, item in lease.ranker.explain(lease, history, ranked, params):
                yield RecommendationEvent(
                    type="reason", rank=index + 1, item_id=item.item_id, reason=item.reason
                )
    yield RecommendationEvent(type="done")


async def _collect(events: AsyncIterator[RecommendationEvent]) -> RecommendationResponse:
    """The whole answer of a stream of events, as one response."""
    async with aclosing(events):
        response = None
        async for event in events:
            if event.type == "items":
                response = RecommendationResponse(
                    user=event.user, adapter=event.adapter, items=event.items
                )
            elif event.type == "reason":
                response.items[event.rank - 1].reason = event.reason
    return response
