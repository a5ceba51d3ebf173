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

:meth:`ProfileStore.erase` deletes all of it. What stays is one ``profiles`` row holding the
user id and the time of erasure and nothing else, so that the data set's original history
of that id is not imported again on the next access (docs/privacy.md).

This module knows nothing about models, adapters or HTTP; every method is synchronous
(the gateway calls it from a worker thread).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from llmrec.adapters import validate_user_id
from llmrec.data import Catalog

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


# --------------------------------------------------------------------------- tables


class _Base(DeclarativeBase):
    pass


class _Profile(_Base):
    __tablename__ = "profiles"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class _History(_Base):
    __tablename__ = "history"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    """Position in the user's history (larger = later); gaps are fine."""
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(16))


class _Feedback(_Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    item_id: Mapped[str] = mapped_column(String(128))
    sentiment: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(8))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Exclusion(_Base):
    __tablename__ = "exclusions"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Conversation(_Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Message(_Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    items: Mapped[list] = mapped_column(JSON)
    """Item ids the message showed, in the order shown (assistant answers only)."""
    kind: Mapped[str] = mapped_column(String(16), default="")
    """What the answer was (the agent's act: ``recommend``, ``why``, ...); "" for users."""
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Queued(_Base):
    __tablename__ = "refresh_queue"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


_USER_TABLES = (_History, _Feedback, _Exclusion, _Message, _Conversation, _Queued)
"""Every table holding a user's data (messages before conversations: foreign key)."""


# --------------------------------------------------------------------------- records


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


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


def _engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite gets its folder created, foreign keys and WAL."""
    parsed = make_url(url)
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            # One shared connection, or every thread would see its own empty database.
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:
            connection.isolation_level = None  # transactions are begun below, not by pysqlite
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL: the gateway and a CLI edit can open the file at the same time.
            if parsed.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:
            # Take the write lock up front: a deferred transaction that reads then writes
            # fails at once (no busy wait) when another writer got in between, and every
            # transaction here reads before it writes (e.g. "first access imports the
            # history"). Transactions are milliseconds long, so serializing them is cheap.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


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
        self.engine = _engine(url)
        _Base.metadata.create_all(self.engine)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # ----------------------------------------------------------------- internals

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _check_items(self, item_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(item_ids))  # keep order, drop repeats
        unknown = [i for i in ids if i not in self.catalog]
        if unknown:
            raise UnknownItemError(unknown)
        return ids

    def _open(self, s: Session, user_id: str) -> None:
        """Create the user's profile on first access, importing the data set's history."""
        validate_user_id(user_id)
        if s.get(_Profile, user_id) is not None:
            return
        now = _now()
        s.add(_Profile(user_id=user_id, created_at=now))
        base = [i for i in dict.fromkeys(self.base_histories.get(user_id, ())) if i in self.catalog]
        s.add_all(
            _History(user_id=user_id, item_id=i, seq=n, added_at=now, source="dataset")
            for n, i in enumerate(base)
        )
        s.flush()

    def _history_ids(self, s: Session, user_id: str) -> list[str]:
        rows = s.scalars(
            select(_History.item_id).where(_History.user_id == user_id).order_by(_History.seq)
        )
        return list(rows)

    def _append(self, s: Session, user_id: str, item_ids: list[str], source: str) -> list[str]:
        have = set(self._history_ids(s, user_id))
        new = [i for i in item_ids if i not in have]
        top = s.scalar(select(func.max(_History.seq)).where(_History.user_id == user_id))
        start = -1 if top is None else top
        now = _now()
        s.add_all(
            _History(user_id=user_id, item_id=i, seq=start + 1 + n, added_at=now, source=source)
            for n, i in enumerate(new)
        )
        return new

    def _enqueue(self, s: Session, user_id: str, reason: str) -> None:
        if s.get(_Queued, user_id) is None:
            s.add(_Queued(user_id=user_id, reason=reason, queued_at=_now()))

    # ----------------------------------------------------------------- history

    def history(self, user_id: str) -> list[str]:
        """The user's history as item ids, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            return self._history_ids(s, user_id)

    def history_entries(self, user_id: str) -> list[HistoryEntry]:
        """The user's history with when and how each item was added, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            rows = s.scalars(
                select(_History).where(_History.user_id == user_id).order_by(_History.seq)
            )
            return [HistoryEntry.model_validate(r) for r in rows]

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
                    delete(_History).where(_History.user_id == user_id, _History.item_id.in_(gone))
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
                _Feedback(
                    user_id=user_id, item_id=item_id, sentiment=sentiment, source=source, at=_now()
                )
            )
            if sentiment == "positive":
                s.execute(
                    delete(_Exclusion).where(
                        _Exclusion.user_id == user_id, _Exclusion.item_id == item_id
                    )
                )
                if self._append(s, user_id, [item_id], source):
                    self._enqueue(s, user_id, "feedback")
            elif s.get(_Exclusion, (user_id, item_id)) is None:
                s.add(_Exclusion(user_id=user_id, item_id=item_id, at=_now()))

    def feedback(self, user_id: str) -> list[FeedbackRecord]:
        """Every thumbs up or down of the user, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            rows = s.scalars(
                select(_Feedback).where(_Feedback.user_id == user_id).order_by(_Feedback.id)
            )
            return [FeedbackRecord.model_validate(r) for r in rows]

    def exclude(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Never recommend these items again; returns the ones newly excluded."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            new = [i for i in ids if s.get(_Exclusion, (user_id, i)) is None]
            s.add_all(_Exclusion(user_id=user_id, item_id=i, at=_now()) for i in new)
            return new

    def unexclude(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Allow excluded items again; returns the ones that were excluded."""
        ids = self._check_items(item_ids)
        with self._session() as s, s.begin():
            self._open(s, user_id)
            present = set(
                s.scalars(select(_Exclusion.item_id).where(_Exclusion.user_id == user_id))
            )
            gone = [i for i in ids if i in present]
            s.execute(
                delete(_Exclusion).where(
                    _Exclusion.user_id == user_id, _Exclusion.item_id.in_(gone)
                )
            )
            return gone

    def exclusions(self, user_id: str) -> list[str]:
        """Item ids never to recommend, oldest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            rows = s.scalars(
                select(_Exclusion.item_id)
                .where(_Exclusion.user_id == user_id)
                .order_by(_Exclusion.at, _Exclusion.item_id)
            )
            return list(rows)

    # ----------------------------------------------------------------- conversations

    def new_conversation(self, user_id: str) -> str:
        """Start a conversation; returns its id. The oldest ones past the limit are dropped."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            conversation_id = str(uuid.uuid4())
            s.add(_Conversation(id=conversation_id, user_id=user_id, created_at=_now()))
            s.flush()
            ids = list(
                s.scalars(
                    select(_Conversation.id)
                    .where(_Conversation.user_id == user_id)
                    .order_by(_Conversation.created_at.desc(), _Conversation.id)
                )
            )
            old = ids[self.max_conversations :]
            if old:
                s.execute(delete(_Message).where(_Message.conversation_id.in_(old)))
                s.execute(delete(_Conversation).where(_Conversation.id.in_(old)))
            return conversation_id

    def _owned(self, s: Session, user_id: str, conversation_id: str) -> _Conversation:
        conv = s.get(_Conversation, conversation_id)
        if conv is None or conv.user_id != user_id:
            raise UnknownConversationError(f"no conversation {conversation_id!r} of this user")
        return conv

    def has_conversation(self, user_id: str, conversation_id: str) -> bool:
        """Whether ``conversation_id`` exists and belongs to ``user_id``."""
        with self._session() as s:
            conv = s.get(_Conversation, conversation_id)
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
                _Message(
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
                select(_Message)
                .where(_Message.conversation_id == conversation_id)
                .order_by(_Message.id)
            )
            return [MessageRecord.model_validate(r) for r in rows]

    def conversations(self, user_id: str) -> list[ConversationRecord]:
        """The user's conversations, newest first."""
        with self._session() as s, s.begin():
            self._open(s, user_id)
            counts = (
                select(_Message.conversation_id, func.count().label("n"))
                .where(_Message.user_id == user_id)
                .group_by(_Message.conversation_id)
                .subquery()
            )
            rows = s.execute(
                select(_Conversation, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.conversation_id == _Conversation.id)
                .where(_Conversation.user_id == user_id)
                .order_by(_Conversation.created_at.desc())
            )
            return [
                ConversationRecord(id=c.id, created_at=c.created_at, messages=n) for c, n in rows
            ]

    # ----------------------------------------------------------------- refresh queue

    def queued(self) -> list[str]:
        """Users due for a personal-adapter refresh, longest waiting first."""
        with self._session() as s:
            return list(s.scalars(select(_Queued.user_id).order_by(_Queued.queued_at)))

    def queued_at(self, user_id: str) -> datetime | None:
        """When ``user_id`` was queued for a refresh, or None."""
        with self._session() as s:
            row = s.get(_Queued, user_id)
            return None if row is None else row.queued_at

    def dequeue(self, user_id: str, queued_before: datetime | None = None) -> bool:
        """Take a user off the refresh queue; False if they were not on it.

        With ``queued_before`` only an entry at most that old goes: a user queued again
        while their refresh ran stays queued for the next one.
        """
        query = delete(_Queued).where(_Queued.user_id == user_id)
        if queued_before is not None:
            query = query.where(_Queued.queued_at <= queued_before)
        with self._session() as s, s.begin():
            return s.execute(query).rowcount > 0

    # ----------------------------------------------------------------- erasure

    def erase(self, user_id: str) -> ErasureReport:
        """Delete everything the profile holds about ``user_id`` (see the module docstring
        for the one row that stays)."""
        validate_user_id(user_id)
        counts: dict[str, int] = {}
        names = {
            _History: "history",
            _Feedback: "feedback",
            _Exclusion: "exclusions",
            _Message: "messages",
            _Conversation: "conversations",
            _Queued: "queued",
        }
        with self._session() as s, s.begin():
            for table in _USER_TABLES:
                result = s.execute(delete(table).where(table.user_id == user_id))
                counts[names[table]] = result.rowcount
            profile = s.get(_Profile, user_id)
            if profile is None:
                s.add(_Profile(user_id=user_id, created_at=_now(), erased_at=_now()))
            else:
                profile.erased_at = _now()
        log.info("erased the profile of %s: %s", user_id, counts)
        return ErasureReport(**counts)
