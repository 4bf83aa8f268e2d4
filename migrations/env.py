"""Alembic environment of the service's database.

The URL comes from the Config (``sqlalchemy.url``, set by :func:`app.db.alembic_config`)
or, when Alembic is run by hand with ``alembic -c migrations/alembic.ini``, from the
service's settings (``CONVIRT_DATABASE_URL``, else the SQLite file under the data
directory). The target metadata is the service's models, so ``alembic revision
--autogenerate`` compares against them.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from app.db import create_engine_for_url
from app.models import Base
from app.settings import Settings

# Same number in every process: concurrent upgrades on PostgreSQL take turns on it.
PG_MIGRATION_LOCK_KEY = 0x636F6E76  # "conv"

config = context.config
logger = logging.getLogger("alembic.env")

# Only the alembic command line has an ini file; in-process runs keep the app's logging.
if config.config_file_name is not None and config.get_section("loggers") is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url if url else Settings().database_url


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def run_migrations_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``) without a connection."""
    url = _database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=_is_sqlite(url),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _database_url()
    engine = create_engine_for_url(url, pooled=False)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
