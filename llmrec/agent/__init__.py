"""The personal agent: reading a turn, the user's profile, answers, erasure."""

from .agent import (
    Action,
    Agent,
    AgentEvent,
    AgentTools,
    Card,
    LocalTools,
)
from .erasure import (
    UserErasure,
    erase_user,
)
from .intent import (
    Act,
    IntentParser,
    Parsed,
    Ref,
    YearRange,
)
from .profile import (
    ConversationRecord,
    ErasureReport,
    FeedbackRecord,
    FeedbackSource,
    HistoryEntry,
    MessageRecord,
    ProfileStore,
    Role,
    Sentiment,
    UnknownConversationError,
    UnknownItemError,
)

__all__ = [
    "Act",
    "Action",
    "Agent",
    "AgentEvent",
    "AgentTools",
    "Card",
    "ConversationRecord",
    "ErasureReport",
    "FeedbackRecord",
    "FeedbackSource",
    "HistoryEntry",
    "IntentParser",
    "LocalTools",
    "MessageRecord",
    "Parsed",
    "ProfileStore",
    "Ref",
    "Role",
    "Sentiment",
    "UnknownConversationError",
    "UnknownItemError",
    "UserErasure",
    "YearRange",
    "erase_user",
]
