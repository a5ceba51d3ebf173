"""The profile database's schema is Alembic's: a new database is built by the migrations, one
made by the release before migrations is upgraded in place, and the migrations build exactly
the tables the models describe."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from llmrec.agent import ProfileStore
from llmrec.agent.tables import Base, open_db

# What the release before migrations wrote (its `Base.metadata.create_all`, as SQLite got it).
BEFORE_MIGRATIONS = """
CREATE TABLE conversations (id VARCHAR(36) NOT NULL, user_id VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_conversations_user_id ON conversations (user_id);
CREATE TABLE exclusions (user_id VARCHAR(64) NOT NULL, item_id VARCHAR(128) NOT NULL,
    at DATETIME NOT NULL, PRIMARY KEY (user_id, item_id));
CREATE TABLE feedback (id INTEGER NOT NULL, user_id VARCHAR(64) NOT NULL,
    item_id VARCHAR(128) NOT NULL, sentiment VARCHAR(8) NOT NULL, source VARCHAR(8) NOT NULL,
    at DATETIME NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_feedback_user_id ON feedback (user_id);
CREATE TABLE history (user_id VARCHAR(64) NOT NULL, item_id VARCHAR(128) NOT NULL,
    seq INTEGER NOT NULL, added_at DATETIME NOT NULL, source VARCHAR(16) NOT NULL,
    PRIMARY KEY (user_id, item_id));
CREATE INDEX ix_history_seq ON history (seq);
CREATE TABLE profiles (user_id VARCHAR(64) NOT NULL, created_at DATETIME NOT NULL,
    erased_at DATETIME, PRIMARY KEY (user_id));
CREATE TABLE refresh_queue (user_id VARCHAR(64) NOT NULL, reason VARCHAR(64) NOT NULL,
    queued_at DATETIME NOT NULL, PRIMARY KEY (user_id));
CREATE TABLE messages (id INTEGER NOT NULL, conversation_id VARCHAR(36) NOT NULL,
    user_id VARCHAR(64) NOT NULL, role VARCHAR(16) NOT NULL, content TEXT NOT NULL,
    items JSON NOT NULL, kind VARCHAR(16) NOT NULL, at DATETIME NOT NULL, PRIMARY KEY (id),
    FOREIGN KEY(conversation_id) REFERENCES conversations (id) ON DELETE CASCADE);
CREATE INDEX ix_messages_user_id ON messages (user_id);
CREATE INDEX ix_messages_conversation_id ON messages (conversation_id);
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migrations_build_the_tables_the_models_describe(tmp_path, backend, request):
    if backend == "sqlite":
        db = open_db(f"sqlite:///{tmp_path / 'new.db'}")
    else:
        db = open_db(request.getfixturevalue("postgres")("migrated"))
    with db.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    db.dispose()


def test_a_database_of_the_release_before_migrations_is_upgraded(tmp_path, tiny_dataset):
    """Its rows stay; its erasure markers (the id in ``profiles``) become digests, so no id is
    left in the file while the data set's history of an erased id is still not imported."""
    path = tmp_path / "profiles.db"
    now = datetime.now(UTC).isoformat(sep=" ")
    erased, kept, other = sorted(tiny_dataset.histories)[:3]
    named = "zed-erased-77"  # an id to look for in the file's bytes
    item = tiny_dataset.histories[kept][0]
    with sqlite3.connect(path) as old:
        old.executescript(BEFORE_MIGRATIONS)
        old.execute("INSERT INTO profiles VALUES (?, ?, NULL)", (kept, now))
        old.execute("INSERT INTO history VALUES (?, ?, 0, ?, 'dataset')", (kept, item, now))
        for user_id in (erased, named):
            old.execute("INSERT INTO profiles VALUES (?, ?, ?)", (user_id, now, now))
    old.close()
    assert named.encode() in path.read_bytes()

    store = ProfileStore(f"sqlite:///{path}", tiny_dataset.catalog, tiny_dataset.histories)
    columns = {c["name"] for c in inspect(store.db).get_columns("profiles")}
    assert columns == {"user_id", "created_at"}
    assert store.history(kept) == [item]
    assert store.history(erased) == []  # not imported again
    assert store.history(other) == list(dict.fromkeys(tiny_dataset.histories[other]))
    store.close()
    for leftover in tmp_path.iterdir():  # the database, and its WAL if any
        assert named.encode() not in leftover.read_bytes(), leftover
