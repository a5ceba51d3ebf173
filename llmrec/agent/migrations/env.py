"""Alembic's entry point: migrate the connection ``upgrade`` hands over (never a URL of its own)."""

from __future__ import annotations

from alembic import context

from llmrec.agent.tables import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which batch mode does for us.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
