"""Engines, sessions and migrations.

Engines are made per settings (never at import). SQLite, the embedded default, gets WAL
journaling (readers do not block the writer), ``foreign_keys=ON`` (otherwise SQLite ignores
the cascades) and ``check_same_thread=False`` because FastAPI runs sync work in a thread
pool; PostgreSQL gets ``pool_pre_ping`` so that a restarted server does not fail the first
request of every pooled connection.

Migrations run through Alembic in code: :func:`alembic_config` builds the Config with
``script_location`` pointing at the ``migrations/`` folder of the project. That folder
is not a Python package and is not inside the installed packages: it is found beside the
``app`` package, i.e. at the root of the checkout. The service must therefore run from a
checkout installed with ``pip install -e .`` (what ``make`` and the Docker image do); a
plain wheel install would not carry it and fails with :class:`MigrationsNotFoundError`,
unless ``script_location=`` is passed explicitly. Keeping ``migrations/`` at the top level
keeps the layout every Alembic user knows (``alembic -c migrations/alembic.ini ...``).

Alembic keeps its migration context in module globals: run the migration functions from
one thread at a time (start-up, the ``convirt db`` command). Separate processes (the
service and a ``convirt ingest`` starting together, several replicas) may run them
concurrently: on PostgreSQL ``migrations/env.py`` serialises them with an advisory lock;
for a SQLite file, whose DDL Alembic runs outside a transaction, an exclusive ``flock`` on
``<database>.migrate.lock`` beside it does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.errors import AppError
from app.settings import Settings

logger = logging.getLogger(__name__)

#: Where the Alembic scripts are when running from a checkout (see the module docstring).
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

#: How long a SQLite writer waits for the lock before failing, in seconds.
SQLITE_BUSY_TIMEOUT_S = 30.0


class MigrationsNotFoundError(AppError):
    """The Alembic ``migrations/`` folder is not where the project expects it."""

    code = "migrations_not_found"


def _set_sqlite_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL loses no committed transaction when the process dies, only
        # (possibly) the last ones on power loss, and spares an fsync per commit.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _is_sqlite_file(url: URL) -> bool:
    """Whether ``url`` is SQLite on a plain file path (not memory, not a ``file:`` URI)."""
    database = url.database
    return (
        url.get_backend_name() == "sqlite"
        and bool(database)
        and database != ":memory:"
        and not (database or "").startswith("file:")
    )


def _ensure_sqlite_parent(url: URL) -> None:
    if _is_sqlite_file(url):
        Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)


def create_engine_for_url(url: str | URL, *, pooled: bool = True, echo: bool = False) -> Engine:
    """An engine for ``url`` with the per-backend settings of this module.

    ``pooled=False`` (one connection per use) suits short-lived commands and migrations.
    The parent directory of a SQLite file is created.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if not pooled:
        kwargs["poolclass"] = NullPool
    if parsed.get_backend_name() == "sqlite":
        _ensure_sqlite_parent(parsed)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    kwargs["pool_pre_ping"] = True
    return create_engine(parsed, **kwargs)


def create_engine_for(settings: Settings) -> Engine:
    """The service's engine for ``settings.database_url``."""
    engine = create_engine_for_url(settings.database_url)
    logger.info("database: %s", engine.url.render_as_string(hide_password=True))
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping(engine: Engine) -> bool:
    """Whether the database answers a trivial query; failures are logged, not raised."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        logger.warning("database ping failed: %s", type(exc).__name__)
        return False
    return True


def migrations_dir() -> Path:
    """The Alembic script folder of the checkout (see the module docstring)."""
    if not (DEFAULT_MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationsNotFoundError(
            f"no Alembic migrations at {DEFAULT_MIGRATIONS_DIR}: run the service from a "
            "checkout installed with `pip install -e .`"
        )
    return DEFAULT_MIGRATIONS_DIR


def alembic_config(url: str | URL, *, script_location: Path | None = None) -> Config:
    """An Alembic Config for ``url`` built in code (no ini file, logging left alone)."""
    location = script_location if script_location is not None else migrations_dir()
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("path_separator", "os")
    rendered = make_url(url).render_as_string(hide_password=False)
    # The Config is a ConfigParser: '%' (percent-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


@contextmanager
def _migration_lock(url: URL) -> Iterator[None]:
    if not _is_sqlite_file(url):
        yield
        return
    import fcntl  # POSIX only, and only needed here

    database = Path(url.database or "").expanduser()
    database.parent.mkdir(parents=True, exist_ok=True)
    with (database.parent / f"{database.name}.migrate.lock").open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade_database(
    url: str | URL, revision: str = "head", *, script_location: Path | None = None
) -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    parsed = make_url(url)
    logger.info("upgrading %s to %s", parsed.render_as_string(), revision)
    config = alembic_config(parsed, script_location=script_location)
    with _migration_lock(parsed):
        command.upgrade(config, revision)


def downgrade_database(
    url: str | URL, revision: str, *, script_location: Path | None = None
) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops everything)."""
    parsed = make_url(url)
    logger.info("downgrading %s to %s", parsed.render_as_string(), revision)
    config = alembic_config(parsed, script_location=script_location)
    with _migration_lock(parsed):
        command.downgrade(config, revision)


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at, or None when it was never migrated."""
    parsed = make_url(url)
    # Asking must not create an empty database file (and its directory) as a side effect.
    if _is_sqlite_file(parsed) and not Path(parsed.database or "").expanduser().exists():
        return None
    engine = create_engine_for_url(parsed, pooled=False)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision(*, script_location: Path | None = None) -> str | None:
    """The newest revision of the migration scripts."""
    config = alembic_config("sqlite://", script_location=script_location)
    return ScriptDirectory.from_config(config).get_current_head()
