"""Ids are never handed out twice: SQLite tables rebuilt with AUTOINCREMENT.

Revision ID: 0002
Revises: 0001
Created: 2026-11-30

Without AUTOINCREMENT SQLite gives a new row ``max(id) + 1``, so deleting the newest image
made its id come back for the next upload: ``GET /images/{id}`` then answered another
study's report, and clients (and caches of thumbnails) holding the old id got the wrong
image. With AUTOINCREMENT SQLite keeps the highest id ever used (``sqlite_sequence``).

SQLite cannot add AUTOINCREMENT in place, so ``images`` and ``evaluation_runs`` are
rebuilt (batch mode: new table, copy, drop, rename) keeping every row and id. Dropping
``images`` with foreign keys on cascades to ``embeddings``: its rows are set aside in a
temporary table and put back once the new ``images`` is in place.

PostgreSQL: a no-op. Its id columns draw from sequences, which never go back.
An id freed *before* this upgrade (the newest row deleted earlier) cannot be known and is
handed out once more; from then on none is.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("images", "evaluation_runs")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP TABLE IF EXISTS temp._kept_embeddings")
    op.execute("CREATE TEMP TABLE _kept_embeddings AS SELECT * FROM embeddings")
    for table in _TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass
    # The cascade of the drop emptied embeddings (when foreign keys are on): restore it.
    op.execute("DELETE FROM embeddings")
    op.execute("INSERT INTO embeddings SELECT * FROM temp._kept_embeddings")
    op.execute("DROP TABLE temp._kept_embeddings")


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)
