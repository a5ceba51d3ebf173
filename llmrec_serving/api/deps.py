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
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmrec.adapters import validate_user_id
from llmrec_serving.keys import Principal
from llmrec_serving.middleware import ClientError
from llmrec_serving.schemas import USER_ID_PATTERN
from llmrec_serving.services import Services

log = logging.getLogger(__name__)


def get_services(request: Request) -> Services:
    """The services the app was created over."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


BEARER = HTTPBearer(
    auto_error=False,  # a missing key is our 401, in the one error body
    description="A user's key (it acts for that user) or the admin key (it names the user).",
)
"""The gateway's one security scheme, published in the schema of every authenticated route."""


def authenticate(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    """The principal of the request's bearer key; 401 without a valid one."""
    who = services.keys.authenticate(credentials.credentials) if credentials else None
    if who is None:
        raise ClientError(
            401, "missing or invalid API key", {"WWW-Authenticate": 'Bearer realm="llmrec"'}
        )
    return who


Caller = Annotated[Principal, Depends(authenticate)]


def acting_user(who: Principal, requested: str | None, how: str | None = None) -> str:
    """The user ``who`` acts for: ``requested``, or the key's own user when None.

    400 when an admin key names nobody (``how`` says how to name one), 422 when the name is
    not a valid user id, 403 when a user key names someone else.
    """
    if requested is None:
        if who.user_id is None:  # well formed, but this key needs the field: not a 422
            hint = f" ({how})" if how else ""
            raise ClientError(400, f"an admin key must name the user{hint}")
        return who.user_id
    try:
        validate_user_id(requested)
    except ValueError as err:
        raise ClientError(422, str(err)) from None
    if not who.may_act_for(requested):
        raise ClientError(403, "this key may only act for its own user")
    return requested


UserQuery = Annotated[
    str | None,
    Query(description="With an admin key: the user to act for.", pattern=USER_ID_PATTERN),
]


def acting_user_of_query(who: Caller, user: UserQuery = None) -> str:
    """The acting user of a route that takes ``?user=`` (admin keys name the user so)."""
    return acting_user(who, user, "?user=...")


ActingUser = Annotated[str, Depends(acting_user_of_query)]


def declared_query_only(request: Request) -> None:
    """422 on a query parameter the route does not declare, or a declared one given twice:
    the published schema says what each route takes, and, as the bodies forbid unknown
    fields, a typo (``?usr=``) is an error rather than silently ignored. Every route gets it
    (``create_app``)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    declared = {p.alias for p in get_flat_dependant(dependant).query_params} if dependant else set()
    for name in request.query_params:
        if name not in declared:
            raise ClientError(422, f"unknown query parameter {name!r}")
        if len(request.query_params.getlist(name)) > 1:
            raise ClientError(422, f"query parameter {name!r}: at most once")


def known_items(services: Services, item_ids: list[str], name: str) -> list[str]:
    """``item_ids`` when they are few enough (else 422: the published schema says how many)
    and all in the catalog (else 404, naming them: the request is well formed, the items
    it names do not exist)."""
    limit = services.cfg.serve.limits.max_history_items
    if len(item_ids) > limit:
        raise ClientError(422, f"{name}: at most {limit} items")
    unknown = [i for i in item_ids if i not in services.catalog]
    if unknown:
        raise ClientError(404, f"{name}: unknown item ids {unknown[:5]}")
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
