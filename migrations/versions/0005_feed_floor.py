"""The change feed can be pruned: ``feed_floor`` says how far.

Revision ID: 0005
Revises: 0004
Created: 2026-11-30

Written by hand to match app/models.py. No row means nothing was ever pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feed_floor",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column(
            "seq",
            sa.BigInteger(),
            nullable=False,
            comment="records up to this seq may be deleted",
        ),
        sa.CheckConstraint("id = 1", name=op.f("ck_feed_floor_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feed_floor")),
    )


def downgrade() -> None:
    op.drop_table("feed_floor")
