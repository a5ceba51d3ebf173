"""The personal agent: reading a turn, the user's profile, answers, erasure."""

from .agent import (
    BECAUSE_ITEMS,
    MAX_REASON_CHARS,
    Action,
    Agent,
    AgentEvent,
    Card,
    Engine,
    LocalEngine,
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
    "BECAUSE_ITEMS",
    "Card",
    "ConversationRecord",
    "Engine",
    "ErasureReport",
    "FeedbackRecord",
    "FeedbackSource",
    "GENRE_WORDS",
    "GenreLexicon",
    "HistoryEntry",
    "IntentParser",
    "LocalEngine",
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
