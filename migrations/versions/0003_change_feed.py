"""Many processes: the ``changes`` feed every index follows; evaluation runs as a job queue.

Revision ID: 0003
Revises: 0002
Created: 2026-11-30

Written by hand to match app/models.py. Existing databases start with an empty feed: a
process that finds no snapshot of the feed's position rebuilds its index from the stored
embeddings once, then follows the feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


#: SQLite rebuilds a table for some batch changes: it keeps AUTOINCREMENT (revision 0002),
#: so ids are never handed out twice.
KEEP_AUTOINCREMENT: dict[str, object] = {"sqlite_autoincrement": True}


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("seq", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("model_id", sa.String(71), nullable=True),
        sa.Column("image_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_changes")),
        sa.CheckConstraint(
            "op IN ('add', 'remove', 'switch')", name=op.f("ck_changes_known_op")
        ),
        # A deleted newest row must not let SQLite hand its number out again.
        sqlite_autoincrement=True,
    )


    # Evaluation runs become jobs any worker process can claim, with a lease.
    with op.batch_alter_table("evaluation_runs", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.add_column(
            sa.Column(
                "worker",
                sa.String(128),
                nullable=True,
                comment="the process running it (host:pid:thread)",
            )
        )
        batch.add_column(
            sa.Column(
                "lease_expires_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="a running run whose lease passed lost its worker",
            )
        )
        batch.add_column(
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("evaluation_runs", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.drop_column("attempts")
        batch.drop_column("lease_expires_at")
        batch.drop_column("worker")
    op.drop_table("changes")
