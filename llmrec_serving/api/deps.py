"""What the routes share: typed dependencies and the time budget of engine work.

``ServicesDep`` is the process's :class:`~llmrec_serving.services.Services` (they live on
``app.state``); ``Caller`` is the authenticated key's principal (401 without one);
``ActingUser`` is the user a ``?user=`` route acts for. :func:`acting_user` is the one
check of who may act for whom: the ``?user=`` routes get it through ``ActingUser``, the
two routes whose body names the user (recommendations, chat completions) call it once
their body has validated.
"""

# No ``from __future__ import annotations``: FastAPI reads these signatures' real types.
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import Response

from llmrec.adapters import validate_user_id
from llmrec_serving.keys import Principal
from llmrec_serving.middleware import ClientError
from llmrec_serving.services import Services

log = logging.getLogger(__name__)


def get_services(request: Request) -> Services:
    """The services the app was created over."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def authenticate(request: Request, services: ServicesDep) -> Principal:
    """The principal of the request's bearer key; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    who = services.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
    if who is None:
        raise ClientError(
            401, "missing or invalid API key", {"WWW-Authenticate": 'Bearer realm="llmrec"'}
        )
    return who


Caller = Annotated[Principal, Depends(authenticate)]


def acting_user(who: Principal, requested: str | None, how: str | None = None) -> str:
    """The user ``who`` acts for: ``requested``, or the key's own user when None.

    422 when an admin key names nobody (``how`` says how to name one) or the name is not a
    valid user id; 403 when a user key names someone else.
    """
    if requested is None:
        if who.user_id is None:
            hint = f" ({how})" if how else ""
            raise ClientError(422, f"an admin key must name the user{hint}")
        return who.user_id
    try:
        validate_user_id(requested)
    except ValueError as err:
        raise ClientError(422, str(err)) from None
    if not who.may_act_for(requested):
        raise ClientError(403, "this key may only act for its own user")
    return requested


UserQuery = Annotated[str | None, Query(description="With an admin key: the user to act for.")]


def acting_user_of_query(who: Caller, user: UserQuery = None) -> str:
    """The acting user of a route that takes ``?user=`` (admin keys name the user so)."""
    return acting_user(who, user, "?user=...")


ActingUser = Annotated[str, Depends(acting_user_of_query)]


def known_items(services: Services, item_ids: list[str], name: str) -> list[str]:
    """``item_ids`` when they are few enough and all in the catalog; else 422 on ``name``."""
    limit = services.cfg.serve.limits.max_history_items
    if len(item_ids) > limit:
        raise ClientError(422, f"{name}: at most {limit} items")
    unknown = [i for i in item_ids if i not in services.catalog]
    if unknown:
        raise ClientError(422, f"{name}: unknown item ids {unknown[:5]}")
    return item_ids


# --------------------------------------------------------------------------- time budget


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guarded(
    services: Services, request: Request, route: str, work: Callable[[], Awaitable[Any]]
) -> Any:
    """Run ``work`` under the request time budget; cancel it if the client goes away."""
    task = asyncio.ensure_future(
        asyncio.wait_for(work(), services.cfg.serve.limits.request_timeout_s)
    )
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        services.metrics.cancelled.labels(route).inc()
        log.info("%s: client went away, work cancelled", route)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    try:
        return task.result()
    except TimeoutError:
        raise ClientError(504, "the request took longer than the server's time budget") from None
