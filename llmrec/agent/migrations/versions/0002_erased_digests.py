"""Erasure markers hold a digest of the user id, not the id.

Revision ID: 0002
Revises: 0001

An erased user used to keep their ``profiles`` row (id and time of erasure), so that the data
set's history of that id is not imported again. The marker is now the SHA-256 of the id in
``erased_users``: enough to recognise the id if it comes back, and no id to read in the file.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from llmrec.agent.tables import erased_digest

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    erased = op.create_table(
        "erased_users",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
    )
    profiles = sa.table(
        "profiles", sa.column("user_id", sa.String), sa.column("erased_at", sa.DateTime)
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(profiles.c.user_id, profiles.c.erased_at).where(profiles.c.erased_at.is_not(None))
    ).all()
    if rows:
        op.bulk_insert(erased, [{"digest": erased_digest(u), "erased_at": at} for u, at in rows])
        bind.execute(sa.delete(profiles).where(profiles.c.erased_at.is_not(None)))
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("erased_at")


def downgrade() -> None:
    # The ids cannot be recovered from their digests: the markers are dropped.
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_table("erased_users")
