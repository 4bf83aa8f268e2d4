"""``convirt serve``: run the retrieval service (uvicorn).

``--workers N`` runs N uvicorn worker processes on the one port; each loads the bundle,
keeps its own copy of the index and follows the database's change feed, so any worker
answers any request alike, and ``/metrics`` adds up all of them.

Refuses to listen beyond loopback without API keys unless anonymous access is intended
(``--allow-anonymous`` or ``CONVIRT_ALLOW_ANONYMOUS=true``).

Also home of the settings options the service commands share (``--data-dir`` …), of
the settings check of every process that listens (:func:`serving_settings`), and of the
start and stop of the commands that run a runtime of their own (:func:`start_runtime`,
:func:`stop_on_signals`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.errors import AppError
from app.settings import InsecureExposureError, Settings
from model.errors import ModelError

if TYPE_CHECKING:
    from app.services.runtime import Runtime

logger = logging.getLogger(__name__)

#: Options that override the matching ``CONVIRT_*`` settings, by attribute name.
_SETTINGS_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--data-dir", "data_dir", "root of the stored images, database and index"),
    ("--database-url", "database_url", "SQLAlchemy URL (default: SQLite under the data dir)"),
    ("--bundle-dir", "bundle_dir", "encoder bundle to load (default: DATA_DIR/bundle)"),
    ("--index-dir", "index_dir", "vector index directory (default: DATA_DIR/index)"),
    ("--index-factory", "index_factory", "FAISS factory string (default: Flat)"),
)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that override the ``CONVIRT_*`` environment for one run."""
    group = parser.add_argument_group("settings (override CONVIRT_* variables)")
    for flag, dest, text in _SETTINGS_OPTIONS:
        group.add_argument(flag, dest=dest, metavar=dest.split("_")[-1].upper(), help=text)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The values actually given (``None`` = option left out, the environment decides)."""
    return {key: value for key, value in values.items() if value is not None}


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    overrides = {dest: getattr(args, dest) for _, dest, _ in _SETTINGS_OPTIONS}
    overrides.update(extra)
    return Settings(**_given(overrides))


def command_settings(args: argparse.Namespace, **extra: Any) -> Settings | None:
    """:func:`settings_from_args`, or ``None`` with the reason logged (the caller exits 2)."""
    try:
        return settings_from_args(args, **extra)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return None


def start_runtime(settings: Settings) -> Runtime | None:
    """The database, bundle and index of a command, or ``None`` with the reason logged
    (the caller exits 1). Imported here, not at the top: it loads torch."""
    from app.services.runtime import Runtime

    try:
        return Runtime.start(settings)
    except (AppError, ModelError) as exc:
        logger.error("cannot start: %s", exc)
        return None


def stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets: what a command that runs until told waits on."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def serving_settings(**overrides: Any) -> Settings | None:
    """Settings for a process about to listen (``serve``, ``demo``, the container).

    The ``CONVIRT_*`` environment, overridden by the ``overrides`` given (``None`` values
    are left out), must validate and must not expose the service beyond loopback without
    API keys or consent. Otherwise the reason is logged and ``None`` returned, and the
    caller exits with status 2 before doing any work.
    """
    try:
        settings = Settings(**_given(overrides))
        settings.ensure_safe_exposure()
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return None
    except InsecureExposureError as exc:
        logger.error("%s", exc)
        return None
    return settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the retrieval service (HTTP API)", description=__doc__
    )
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 8000)")
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        default=None,
        help="serve without API keys on a non-loopback address (anonymous access intended)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes, each following the database (default: 1)",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def _export_settings(settings: Settings) -> None:
    """Hand the effective settings to worker processes, which build them from the env."""
    for name in ("data_dir", "database_url", "bundle_dir", "index_dir", "index_factory"):
        os.environ[f"CONVIRT_{name.upper()}"] = str(getattr(settings, name))
    os.environ["CONVIRT_HOST"] = settings.host
    os.environ["CONVIRT_PORT"] = str(settings.port)
    os.environ["CONVIRT_ALLOW_ANONYMOUS"] = "true" if settings.allow_anonymous else "false"


def _run_workers(settings: Settings, workers: int) -> None:
    """N uvicorn workers; prometheus_client's multiprocess mode adds their metrics up."""
    import uvicorn

    from app.services.metrics import MULTIPROC_ENV

    _export_settings(settings)
    # A fresh directory per run: files left by a previous run would count again.
    metrics_dir = tempfile.mkdtemp(prefix="convirt-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run(
            "app.main:create_worker_app",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            log_config=None,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    settings = serving_settings(
        **{dest: getattr(args, dest) for _, dest, _ in _SETTINGS_OPTIONS},
        host=args.host,
        port=args.port,
        allow_anonymous=args.allow_anonymous,
    )
    if settings is None:
        return 2
    if args.workers < 1:
        logger.error("--workers must be at least 1")
        return 2
    logging.getLogger().setLevel(settings.log_level)
    if args.workers > 1:
        # uvicorn's own worker processes: connection bounds and slow-client deadlines come
        # from the proxy in front (the compose stack's nginx), not from app.serving.
        _run_workers(settings, args.workers)
        return 0

    from app.main import create_app
    from app.serving import build_server

    app = create_app(settings)
    # Bounded connections, and deadlines for slow clients (app.serving).
    build_server(app, settings).run()
    return 0
