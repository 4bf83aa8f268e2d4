"""PACS connectors: images.study_instance_uid and the DICOMweb follower's cursors.

Revision ID: 0004
Revises: 0003
Created: 2026-11-30

Written by hand to match app/models.py exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DICOM_UID = sa.String(64)
SOURCE_URL = sa.String(512)


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=False, server_default=sa.func.current_timestamp()
    )


#: SQLite rebuilds a table for some batch changes: it keeps AUTOINCREMENT (revision 0002),
#: so ids are never handed out twice.
KEEP_AUTOINCREMENT: dict[str, object] = {"sqlite_autoincrement": True}


def upgrade() -> None:
    # batch mode: SQLite cannot add an indexed column to a table in place on every version.
    with op.batch_alter_table("images", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.add_column(
            sa.Column(
                "study_instance_uid",
                DICOM_UID,
                nullable=True,
                comment="DICOM StudyInstanceUID from a PACS connector, for the viewer link",
            )
        )
        batch.create_index(op.f("ix_images_study_instance_uid"), ["study_instance_uid"])

    op.create_table(
        "dicomweb_cursors",
        sa.Column(
            "source", SOURCE_URL, nullable=False, comment="DICOMweb URL, no credentials"
        ),
        sa.Column(
            "last_change",
            sa.BigInteger(),
            nullable=False,
            comment="last Orthanc /changes sequence number handled",
        ),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_dicomweb_cursors")),
    )
    op.create_table(
        "dicomweb_series",
        sa.Column("source", SOURCE_URL, nullable=False),
        sa.Column("series_instance_uid", DICOM_UID, nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False, comment="instances fetched"),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint(
            "source", "series_instance_uid", name=op.f("pk_dicomweb_series")
        ),
    )


def downgrade() -> None:
    op.drop_table("dicomweb_series")
    op.drop_table("dicomweb_cursors")
    with op.batch_alter_table("images", table_kwargs=KEEP_AUTOINCREMENT) as batch:
        batch.drop_index(op.f("ix_images_study_instance_uid"))
        batch.drop_column("study_instance_uid")
