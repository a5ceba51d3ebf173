"""The profile database's schema and how it is opened: SQLAlchemy tables, one per kind of data.

Only :class:`llmrec.agent.profile.ProfileStore` reads and writes these rows (callers get its
frozen records), so the package does not re-export them. The on-disk layout (table and
column names) is what docs/privacy.md describes; renaming a table or a column changes it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool


class Base(DeclarativeBase):
    pass


class ProfileRow(Base):
    __tablename__ = "profiles"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ErasedRow(Base):
    """An erased user: the digest of their id (:func:`erased_digest`), never the id."""

    __tablename__ = "erased_users"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def erased_digest(user_id: str) -> str:
    """The erasure marker of ``user_id``: a SHA-256, part of the file format (migration 0002
    computes it too), so it never changes."""
    return hashlib.sha256(b"llmrec-erased\0" + user_id.encode()).hexdigest()


class HistoryRow(Base):
    __tablename__ = "history"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    """Position in the user's history (larger = later); gaps are fine."""
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(16))


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    item_id: Mapped[str] = mapped_column(String(128))
    sentiment: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(8))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExclusionRow(Base):
    __tablename__ = "exclusions"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConversationRow(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MessageRow(Base):
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


class QueuedRow(Base):
    __tablename__ = "refresh_queue"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


USER_TABLES: dict[type[Base], str] = {
    HistoryRow: "history",
    FeedbackRow: "feedback",
    ExclusionRow: "exclusions",
    MessageRow: "messages",
    ConversationRow: "conversations",
    QueuedRow: "queued",
}
"""Every table holding a user's data, to the ``ErasureReport`` field counting its rows
(messages before conversations: the foreign key)."""


_LOCK_KEY = 0x6C6C6D726563  # "llmrec": the advisory lock every transaction takes on PostgreSQL


def open_db(url: str) -> Engine:
    """The database at ``url``, migrated to the newest schema (``llmrec.agent.migrations``);
    SQLite gets its folder created, foreign keys, ``secure_delete`` and WAL; SQLite and
    PostgreSQL (``postgresql+psycopg://``) run one transaction at a time."""
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict = {}
    if sqlite:
        database = parsed.database or ""
        if database in ("", ":memory:"):
            # One shared connection, or every thread would see its own empty database.
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    db = create_engine(url, **kwargs)
    if sqlite:

        @event.listens_for(db, "connect")
        def _pragmas(connection, _record) -> None:
            connection.isolation_level = None  # transactions are begun below, not by pysqlite
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # Deleted rows are overwritten with zeros, not left in free pages: an erased
            # user's data is gone from the file (ProfileStore.erase also empties the WAL).
            cursor.execute("PRAGMA secure_delete=ON")
            # WAL: the gateway and a CLI edit can open the file at the same time. FULL: a
            # commit is on disk before it returns, so an acknowledged write survives a power
            # loss too, not only a killed process (bench/crash.py checks the latter).
            if parsed.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        @event.listens_for(db, "begin")
        def _begin(connection) -> None:
            # Take the write lock up front: a deferred transaction that reads then writes
            # fails at once (no busy wait) when another writer got in between, and every
            # transaction here reads before it writes (e.g. "first access imports the
            # history"). Transactions here are short, so serializing them is cheap.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    if parsed.get_backend_name() == "postgresql":

        @event.listens_for(db, "begin")
        def _one_writer(connection) -> None:
            # As SQLite's BEGIN IMMEDIATE above: one transaction at a time, across every
            # process on the database (e.g. two gateways), so "first access imports the
            # history" and read-then-write transactions never race. Released at commit.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")

    upgrade(db)
    empty_wal(db)  # a migration may have deleted ids (0002): no old page image stays
    return db


def empty_wal(db: Engine) -> None:
    """A SQLite file in WAL mode: copy the log into the database and truncate it, so that no
    old page image of deleted rows stays in the log (``secure_delete`` zeroes them in place).
    Nothing to do for other databases or an in-memory one."""
    if db.dialect.name != "sqlite" or db.url.database in (None, "", ":memory:"):
        return
    raw = db.raw_connection()  # autocommit (see the pragmas): a checkpoint needs that
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
"""Alembic's folder for this database: ``env.py`` and ``versions/`` (a new schema change is a
new file there, made with ``alembic -c llmrec/agent/migrations/alembic.ini revision -m ...``,
never an edit of an old one). Not a package: its ``env.py`` only runs under Alembic."""
FIRST_REVISION = "0001"
"""The schema the releases before migrations made with ``create_all`` (no version table)."""


def upgrade(db: Engine) -> None:
    """Bring ``db`` to the newest revision: a new database is created, one made by a release
    before migrations is stamped with the first revision and then upgraded. One transaction
    (on SQLite ``BEGIN IMMEDIATE``, see :func:`open_db`), so two processes opening a database
    at once migrate it once."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.begin() as connection:
        cfg.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "profiles" in tables and "alembic_version" not in tables:
            command.stamp(cfg, FIRST_REVISION)
        command.upgrade(cfg, "head")
