"""``convirt db upgrade|downgrade|current``: the database schema, through Alembic.

The database is the one of the settings (``CONVIRT_DATABASE_URL``, else SQLite under
``CONVIRT_DATA_DIR``) unless ``--database-url`` names another.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.db import current_revision, downgrade_database, head_revision, upgrade_database
from app.errors import AppError
from app.settings import Settings

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``db`` and its actions to the ``convirt`` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        help="database to act on (default: the settings' CONVIRT_DATABASE_URL or SQLite file)",
    )
    parser = subparsers.add_parser(
        "db", help="create, migrate or inspect the database schema", description=__doc__
    )
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)

    upgrade = actions.add_parser(
        "upgrade", parents=[common], help="migrate up (creates the schema on an empty database)"
    )
    upgrade.add_argument("revision", nargs="?", default="head", help="target (default: head)")
    upgrade.set_defaults(func=_upgrade)

    downgrade = actions.add_parser("downgrade", parents=[common], help="migrate down")
    downgrade.add_argument("revision", help="target revision, e.g. 0001, -1, or base (drops all)")
    downgrade.set_defaults(func=_downgrade)

    current = actions.add_parser(
        "current", parents=[common], help="print the database's revision and the newest one"
    )
    current.add_argument(
        "--check", action="store_true", help="exit with status 1 unless the database is at head"
    )
    current.set_defaults(func=_current)


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return Settings(database_url=args.database_url).database_url
    return Settings().database_url


def _guarded(action: str, args: argparse.Namespace) -> int:
    try:
        url = _database_url(args)
        if action == "upgrade":
            upgrade_database(url, args.revision)
        elif action == "downgrade":
            downgrade_database(url, args.revision)
        else:
            return _report_current(url, check=args.check)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    except (AppError, SQLAlchemyError) as exc:
        logger.error("db %s failed: %s", action, exc)
        return 1
    return 0


def _report_current(url: str, *, check: bool) -> int:
    current = current_revision(url)
    head = head_revision()
    if current is None:
        state = "not migrated"
    elif current == head:
        state = "head"
    else:
        state = f"head is {head}"
    sys.stdout.write(f"{current or 'none'} ({state})\n")
    return 1 if check and current != head else 0


def _upgrade(args: argparse.Namespace) -> int:
    return _guarded("upgrade", args)


def _downgrade(args: argparse.Namespace) -> int:
    return _guarded("downgrade", args)


def _current(args: argparse.Namespace) -> int:
    return _guarded("current", args)
