"""The personal agent: reading a turn, the user's profile, answers, erasure."""

from .agent import (
    BECAUSE_ITEMS,
    MAX_REASON_CHARS,
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
    GENRE_WORDS,
    Act,
    GenreLexicon,
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
    "BECAUSE_ITEMS",
    "Card",
    "ConversationRecord",
    "ErasureReport",
    "FeedbackRecord",
    "FeedbackSource",
    "GENRE_WORDS",
    "GenreLexicon",
    "HistoryEntry",
    "IntentParser",
    "LocalTools",
    "MAX_REASON_CHARS",
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
