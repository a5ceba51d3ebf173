"""The gateway's routes, one module per surface, and the dependencies they share.

``ops`` (health, readiness, metrics), ``recommend`` (``/v1/recommendations``), ``chat``
(the OpenAI-compatible chat), ``agent`` (the personal agent, the caller's own data and
the chat page); ``deps`` holds the services, caller and acting-user dependencies.
"""

from . import agent, chat, ops, recommend
from .agent import (
    AGENT_K,
    GatewayTools,
    build_agent,
)
from .chat import (
    MODEL_ID,
)
from .deps import (
    ActingUser,
    Caller,
    ServicesDep,
    acting_user,
    authenticate,
    get_services,
    guarded,
    known_items,
)

ROUTERS = (ops.router, recommend.router, chat.router, agent.router)
"""Every route of the gateway, in the order the app includes them."""

__all__ = [
    "AGENT_K",
    "ActingUser",
    "Caller",
    "GatewayTools",
    "MODEL_ID",
    "ROUTERS",
    "ServicesDep",
    "acting_user",
    "authenticate",
    "build_agent",
    "get_services",
    "guarded",
    "known_items",
]
