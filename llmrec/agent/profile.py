"""Per-user profiles of the personal agent: history, feedback, exclusions, conversations.

One embedded database (SQLite by default; any SQLAlchemy URL) holds, per user:

- ``history``: the items the user has watched, oldest first. A user's first access copies
  their history from the data set (``base_histories``); from then on the profile is the
  truth, so edits and feedback change what the next recommendation sees at once;
- ``feedback``: thumbs up (the item joins the history) and thumbs down (the item is
  excluded), with where it came from (a chat turn, a card button, the CLI);
- ``exclusions``: items never to recommend ("never show me X", "forget this");
- ``conversations`` and their ``messages`` (with the items each answer showed, so a
  follow-up like "why the second?" can refer to them);
- ``refresh_queue``: users whose history changed since their personal adapter was trained
  (``llmrec personalize --all-queued`` drains it).

:meth:`ProfileStore.erase` deletes all of it. What stays is one ``erased_users`` row: a
SHA-256 of the id and the time of erasure, so that the data set's original history of that id
is not imported again on the next access (docs/privacy.md).

The tables are in :mod:`llmrec.agent.tables`; callers see only the frozen records here.
This module knows nothing about models, adapters or HTTP; every method is synchronous
(the gateway calls it from a worker thread).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from llmrec.adapters import validate_user_id
from llmrec.agent.tables import (
    USER_TABLES,
    Base,
    ConversationRow,
    ErasedRow,
    ExclusionRow,
    FeedbackRow,
    HistoryRow,
    MessageRow,
    ProfileRow,
    QueuedRow,
    empty_wal,
    erased_digest,
    open_db,
)
from llmrec.data import Catalog
from llmrec.pseudonyms import pseudonym

log = logging.getLogger(__name__)

Sentiment = Literal["positive", "negative"]
FeedbackSource = Literal["chat", "card", "cli", "api"]
Role = Literal["user", "assistant"]


class UnknownItemError(ValueError):
    """An item id that is not in the catalog."""

    def __init__(self, item_ids: Sequence[str]):
        super().__init__(f"unknown item ids: {list(item_ids)[:5]}")
        self.item_ids = list(item_ids)


class UnknownConversationError(LookupError):
    """A conversation id the user does not own (or that does not exist)."""


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- records


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


_R = TypeVar("_R", bound=_Record)


class HistoryEntry(_Record):
    """One item of a user's history."""

    item_id: str
    added_at: datetime
    source: str
    """``dataset`` (imported), ``chat``, ``card``, ``cli`` or ``api``."""


class FeedbackRecord(_Record):
    """One thumbs up or down."""

    item_id: str
    sentiment: Sentiment
    source: FeedbackSource
    at: datetime


class MessageRecord(_Record):
    """One chat message; ``items`` are the item ids an answer showed."""

    role: Role
    content: str
    items: list[str]
    kind: str
    at: datetime


class ConversationRecord(_Record):
    """A conversation and how many messages it holds."""

    id: str
    created_at: datetime
    messages: int


class ErasureReport(_Record):
    """What :meth:`ProfileStore.erase` deleted (row counts per kind)."""

    history: int
    feedback: int
    exclusions: int
    conversations: int
    messages: int
    queued: int


# --------------------------------------------------------------------------- the store


class ProfileStore:
    """The profile database of one deployment.

    ``catalog`` validates every item id written (unknown ids raise
    :class:`UnknownItemError`); ``base_histories`` (the data set's histories) seed a
    user's history on first access.
    """

    def __init__(
        self,
        url: str,
        catalog: Catalog,
        base_histories: Mapping[str, Sequence[str]] | None = None,
        max_conversations: int = 50,
    ):
        self.url = url
        self.catalog = catalog
        self.base_histories = base_histories or {}
        self.max_conversations = max_conversations
        self.db = open_db(url)

    def close(self) -> None:
        """Release the database connections."""
        self.db.dispose()

    # ----------------------------------------------------------------- internals

    def _session(self) -> Session:
        return Session(self.db, expire_on_commit=False)

    def _check_items(self, item_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(item_ids))  # keep order, drop repeats
        unknown = [i for i in ids if i not in self.catalog]
        if unknown:
            raise UnknownItemError(unknown)
        return ids

    def _open(self, s: Session, user_id: str) -> None:
        """Create the user's profile on first access, importing the data set's history."""
        validate_user_id(user_id)
        if s.get(ProfileRow, user_id) is not None:
            return
        now = _now()
        s.add(ProfileRow(user_id=user_id, created_at=now))
        if s.get(ErasedRow, erased_digest(user_id)) is not None:
            return  # erased: the data set's history of this id is not imported again
        base = [i for i in dict.fromkeys(self.base_histories.get(user_id, ())) if i in self.catalog]
        s.add_all(
            HistoryRow(user_id=user_id, item_id=i, seq=n, added_at=now, source="dataset")
            for n, i in enumerate(base)
        )
        s.flush()

    def _history_ids(self, s: Session, user_id: str) -> list[str]:
        rows = s.scalars(
            select(HistoryRow.item_id).where(HistoryRow.user_id == user_id).order_by(HistoryRow.seq)
        )
        return list(rows)

    def _append(self, s: Session, user_id: str, item_ids: list[str], source: str) -> list[str]:
        have = set(self._history_ids(s, user_id))
        new = [i for i in item_ids if i not in have]
        top = s.scalar(select(func.max(HistoryRow.seq)).where(HistoryRow.user_id == user_id))
        start = -1 if top is None else top
        now = _now()
        s.add_all(
            HistoryRow(user_id=user_id, item_id=i, seq=start + 1 + n, added_at=now, source=source)
            for n, i in enumerate(new)
        )
        return new

    def _user_rows(
        self, user_id: str, table: type[Base], order_by: Any, record: type[_R]
    ) -> list[_R]:
        """The user's rows of ``table`` in ``order_by`` order, as ``record``s."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            rows = s.scalars(select(table).where(table.user_id == user_id).order_by(order_by))
            return [record.model_validate(r) for r in rows]

    def _enqueue(self, s: Session, user_id: str, reason: str) -> None:
        if s.get(QueuedRow, user_id) is None:
            s.add(QueuedRow(user_id=user_id, reason=reason, queued_at=_now()))

    # ----------------------------------------------------------------- history

    def history(self, user_id: str) -> list[str]:
        """The user's history as item ids, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            return self._history_ids(s, user_id)

    def history_entries(self, user_id: str) -> list[HistoryEntry]:
        """The user's history with when and how each item was added, oldest first."""
        return self._user_rows(user_id, HistoryRow, HistoryRow.seq, HistoryEntry)

    def add_history(self, user_id: str, item_ids: Sequence[str], source: str = "api") -> list[str]:
        """Append items to the history (ones already there stay where they are); returns the
        ones added. The user is queued for a personal-adapter refresh when any was added."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            added = self._append(s, user_id, ids, source)
            if added:
                self._enqueue(s, user_id, "history")
            return added

    def remove_history(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Remove items from the history; returns the ones that were there."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            present = set(self._history_ids(s, user_id))
            gone = [i for i in ids if i in present]
            if gone:
                s.execute(
                    delete(HistoryRow).where(
                        HistoryRow.user_id == user_id, HistoryRow.item_id.in_(gone)
                    )
                )
                self._enqueue(s, user_id, "history")
            return gone

    # ----------------------------------------------------------------- feedback, exclusions

    def record_feedback(
        self, user_id: str, item_id: str, sentiment: Sentiment, source: FeedbackSource
    ) -> None:
        """A thumbs up puts the item into the history (and lifts an exclusion of it); a
        thumbs down excludes it. Either way the feedback is kept, and a thumbs up queues a
        personal-adapter refresh (the history, which training reads, changed)."""
        (item_id,) = self._check_items([item_id])
        with self._session() as s, s.begin():
            self._open(s, user_id)
            s.add(
                FeedbackRow(
                    user_id=user_id, item_id=item_id, sentiment=sentiment, source=source, at=_now()
                )
            )
            if sentiment == "positive":
                s.execute(
                    delete(ExclusionRow).where(
                        ExclusionRow.user_id == user_id, ExclusionRow.item_id == item_id
                    )
                )
                if self._append(s, user_id, [item_id], source):
                    self._enqueue(s, user_id, "feedback")
            elif s.get(ExclusionRow, (user_id, item_id)) is None:
                s.add(ExclusionRow(user_id=user_id, item_id=item_id, at=_now()))

    def feedback(self, user_id: str) -> list[FeedbackRecord]:
        """Every thumbs up or down of the user, oldest first."""
        return self._user_rows(user_id, FeedbackRow, FeedbackRow.id, FeedbackRecord)

    def exclude(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Never recommend these items again; returns the ones newly excluded."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            new = [i for i in ids if s.get(ExclusionRow, (user_id, i)) is None]
            s.add_all(ExclusionRow(user_id=user_id, item_id=i, at=_now()) for i in new)
            return new

    def unexclude(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Allow excluded items again; returns the ones that were excluded."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            present = set(
                s.scalars(select(ExclusionRow.item_id).where(ExclusionRow.user_id == user_id))
            )
            gone = [i for i in ids if i in present]
            s.execute(
                delete(ExclusionRow).where(
                    ExclusionRow.user_id == user_id, ExclusionRow.item_id.in_(gone)
                )
            )
            return gone

    def exclusions(self, user_id: str) -> list[str]:
        """Item ids never to recommend, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            rows = s.scalars(
                select(ExclusionRow.item_id)
                .where(ExclusionRow.user_id == user_id)
                .order_by(ExclusionRow.at, ExclusionRow.item_id)
            )
            return list(rows)

    # ----------------------------------------------------------------- conversations

    def new_conversation(self, user_id: str) -> str:
        """Start a conversation; returns its id. The oldest ones past the limit are dropped."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            conversation_id = str(uuid.uuid4())
            s.add(ConversationRow(id=conversation_id, user_id=user_id, created_at=_now()))
            s.flush()
            ids = list(
                s.scalars(
                    select(ConversationRow.id)
                    .where(ConversationRow.user_id == user_id)
                    .order_by(ConversationRow.created_at.desc(), ConversationRow.id)
                )
            )
            old = ids[self.max_conversations :]
            if old:
                s.execute(delete(MessageRow).where(MessageRow.conversation_id.in_(old)))
                s.execute(delete(ConversationRow).where(ConversationRow.id.in_(old)))
            return conversation_id

    def _owned(self, s: Session, user_id: str, conversation_id: str) -> ConversationRow:
        conv = s.get(ConversationRow, conversation_id)
        if conv is None or conv.user_id != user_id:
            raise UnknownConversationError(f"no conversation {conversation_id!r} of this user")
        return conv

    def has_conversation(self, user_id: str, conversation_id: str) -> bool:
        """Whether ``conversation_id`` exists and belongs to ``user_id``."""
        with self._session() as s:
            conv = s.get(ConversationRow, conversation_id)
            return conv is not None and conv.user_id == user_id

    def add_message(
        self,
        user_id: str,
        conversation_id: str,
        role: Role,
        content: str,
        items: Sequence[str] = (),
        kind: str = "",
    ) -> None:
        """Append a message to one of the user's conversations."""
        ids = self._check_items(items)
        with self._session() as s, s.begin():
            self._owned(s, user_id, conversation_id)
            s.add(
                MessageRow(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    role=role,
                    content=content,
                    items=ids,
                    kind=kind,
                    at=_now(),
                )
            )

    def messages(self, user_id: str, conversation_id: str) -> list[MessageRecord]:
        """The messages of one of the user's conversations, oldest first."""
        with self._session() as s, s.begin():
            self._owned(s, user_id, conversation_id)
            rows = s.scalars(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id)
                .order_by(MessageRow.id)
            )
            return [MessageRecord.model_validate(r) for r in rows]

    def find_conversation(self, user_id: str, transcript: Sequence[tuple[str, str]]) -> str | None:
        """The user's newest conversation whose messages are ``transcript`` exactly, as
        ``(role, content)`` pairs oldest first (whitespace at the ends aside), or None.
        This is how a client that keeps the conversation itself (OpenAI-style chat)
        continues one: it sends back what was said."""
        wanted = [(role, content.strip()) for role, content in transcript]
        for record in self.conversations(user_id):
            if record.messages != len(wanted):
                continue
            said = [(m.role, m.content.strip()) for m in self.messages(user_id, record.id)]
            if said == wanted:
                return record.id
        return None

    def conversations(self, user_id: str) -> list[ConversationRecord]:
        """The user's conversations, newest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            counts = (
                select(MessageRow.conversation_id, func.count().label("n"))
                .where(MessageRow.user_id == user_id)
                .group_by(MessageRow.conversation_id)
                .subquery()
            )
            rows = s.execute(
                select(ConversationRow, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.conversation_id == ConversationRow.id)
                .where(ConversationRow.user_id == user_id)
                .order_by(ConversationRow.created_at.desc())
            )
            return [
                ConversationRecord(id=c.id, created_at=c.created_at, messages=n) for c, n in rows
            ]

    # ----------------------------------------------------------------- refresh queue

    def queued(self) -> list[str]:
        """Users due for a personal-adapter refresh, longest waiting first."""
        with self._session() as s:
            return list(s.scalars(select(QueuedRow.user_id).order_by(QueuedRow.queued_at)))

    def queued_at(self, user_id: str) -> datetime | None:
        """When ``user_id`` was queued for a refresh, or None."""
        with self._session() as s:
            row = s.get(QueuedRow, user_id)
            return None if row is None else row.queued_at

    def dequeue(self, user_id: str, queued_before: datetime | None = None) -> bool:
        """Take a user off the refresh queue; False if they were not on it.

        With ``queued_before`` only an entry at most that old goes: a user queued again
        while their refresh ran stays queued for the next one.
        """
        query = delete(QueuedRow).where(QueuedRow.user_id == user_id)
        if queued_before is not None:
            query = query.where(QueuedRow.queued_at <= queued_before)
        with self._session() as s, s.begin():
            return s.execute(query).rowcount > 0

    # ----------------------------------------------------------------- erasure

    def erase(self, user_id: str) -> ErasureReport:
        """Delete everything the profile holds about ``user_id`` (see the module docstring
        for the one row that stays)."""
        validate_user_id(user_id)
        counts: dict[str, int] = {}
        with self._session() as s, s.begin():
            for table, name in USER_TABLES.items():
                counts[name] = s.execute(delete(table).where(table.user_id == user_id)).rowcount
            s.execute(delete(ProfileRow).where(ProfileRow.user_id == user_id))
            s.merge(ErasedRow(digest=erased_digest(user_id), erased_at=_now()))
        empty_wal(self.db)
        log.info("erased the profile of %s: %s", pseudonym(user_id), counts)
        return ErasureReport(**counts)
