"""Initial schema: images, models, embeddings, evaluation runs, embedding cache.

Revision ID: 0001
Revises:
Created: 2025-01-01

Written by hand to match app/models.py exactly; tests/app/test_migrations.py checks that
autogenerate finds no difference on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The portable types of app/models.py, spelled out so that this revision does not change
# when the models do.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
MODEL_ID = sa.String(71)
CONTENT_HASH = sa.String(64)
PATH = sa.String(512)


def _timestamp(name: str, *, index: bool = False) -> sa.Column[object]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.func.current_timestamp(),
        index=index,
    )


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column(
            "content_hash",
            CONTENT_HASH,
            nullable=False,
            comment="sha256 hex of the uploaded bytes",
        ),
        sa.Column("source_format", sa.String(16), nullable=False, comment="dicom, png or jpeg"),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bits", sa.SmallInteger(), nullable=True, comment="bits stored per pixel"),
        sa.Column("photometric", sa.String(32), nullable=True),
        sa.Column("view_position", sa.String(16), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column(
            "labels",
            JSON,
            nullable=False,
            comment="observation → 1 positive, 0 negative, -1 uncertain",
        ),
        sa.Column("report_text", sa.Text(), nullable=True),
        sa.Column(
            "study_ref",
            sa.String(128),
            nullable=True,
            comment="opaque external study reference, never an accession",
        ),
        sa.Column("image_path", PATH, nullable=False),
        sa.Column("thumbnail_path", PATH, nullable=False),
        sa.Column("original_path", PATH, nullable=True),
        _timestamp("updated_at"),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("content_hash", name=op.f("uq_images_content_hash")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_images_positive_size")),
        sa.CheckConstraint("length(content_hash) = 64", name=op.f("ck_images_content_hash_length")),
    )
    op.create_index(op.f("ix_images_view_position"), "images", ["view_position"])
    op.create_index(op.f("ix_images_study_ref"), "images", ["study_ref"])

    op.create_table(
        "models",
        sa.Column("id", MODEL_ID, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column(
            "is_active",
            sa.Boolean(),
            nullable=False,
            server_default=sa.false(),
            comment="the bundle the service serves",
        ),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.CheckConstraint("dim > 0", name=op.f("ck_models_positive_dim")),
    )

    op.create_table(
        "embeddings",
        sa.Column("image_id", BIG_ID, nullable=False),
        sa.Column("model_id", MODEL_ID, nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("image_id", "model_id", name=op.f("pk_embeddings")),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_embeddings_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_embeddings_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("length(vector) = 4 * dim", name=op.f("ck_embeddings_vector_length")),
    )
    op.create_index(op.f("ix_embeddings_model_id"), "embeddings", ["model_id"])

    op.create_table(
        "evaluation_runs",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("model_id", MODEL_ID, nullable=False),
        sa.Column("protocol", sa.String(64), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("results", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_runs")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')",
            name=op.f("ck_evaluation_runs_known_status"),
        ),
        sa.CheckConstraint(
            "progress >= 0 AND progress <= 1", name=op.f("ck_evaluation_runs_progress_range")
        ),
    )
    op.create_index(op.f("ix_evaluation_runs_model_id"), "evaluation_runs", ["model_id"])
    op.create_index(op.f("ix_evaluation_runs_status"), "evaluation_runs", ["status"])
    op.create_index(op.f("ix_evaluation_runs_created_at"), "evaluation_runs", ["created_at"])

    op.create_table(
        "embedding_cache",
        sa.Column("model_id", MODEL_ID, nullable=False),
        sa.Column("content_hash", CONTENT_HASH, nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("model_id", "content_hash", name=op.f("pk_embedding_cache")),
        sa.CheckConstraint(
            "length(vector) = 4 * dim", name=op.f("ck_embedding_cache_vector_length")
        ),
    )


def downgrade() -> None:
    op.drop_table("embedding_cache")
    op.drop_index(op.f("ix_evaluation_runs_created_at"), table_name="evaluation_runs")
    op.drop_index(op.f("ix_evaluation_runs_status"), table_name="evaluation_runs")
    op.drop_index(op.f("ix_evaluation_runs_model_id"), table_name="evaluation_runs")
    op.drop_table("evaluation_runs")
    op.drop_index(op.f("ix_embeddings_model_id"), table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_table("models")
    op.drop_index(op.f("ix_images_study_ref"), table_name="images")
    op.drop_index(op.f("ix_images_view_position"), table_name="images")
    op.drop_table("images")
