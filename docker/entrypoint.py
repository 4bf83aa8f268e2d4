"""Entrypoint of the service image: prepare the data volume, then serve.

    docker run IMAGE                  # same as `serve`
    docker run IMAGE serve            # wait for the database, migrate, demo if needed, serve
    docker run IMAGE init             # the same preparation, then exit 0 (compose `init`)
    docker run IMAGE ingest /data/x   # any other word: that `convirt` command, run as is

``serve`` runs, in order (``init`` steps 0-3 and exits):

0. on a start with neither ``CONVIRT_API_KEYS`` nor ``CONVIRT_ALLOW_ANONYMOUS=true``, use
   the key kept in the data volume (``{data_dir}/api-key``, mode 0600), generating it on
   the first start and printing it once in the log, as Jupyter prints its token: so a
   bare ``docker compose up`` serves, and never without a key. ``CONVIRT_API_KEYS``
   overrides the file;
1. wait until the database answers (``CONVIRT_DB_WAIT_S`` seconds at most, default 120);
   compose already waits for the db healthcheck, but a plain ``docker run`` or a database
   restarting under us does not;
2. ``convirt db upgrade`` (Alembic to head; concurrent replicas take turns on a lock);
3. the demo, unless ``CONVIRT_DEMO=0`` or the volume holds a bundle of the user's own (a
   bundle but no ``demo/`` folder): ``convirt demo --no-serve`` writes the synthetic
   corpus, trains, exports the bundle and ingests the corpus. Each of its steps skips
   what the volume already holds, so a later start only checks (seconds) and a first
   start that was interrupted resumes. ``CONVIRT_DEMO_N``, ``CONVIRT_DEMO_TIME_BUDGET``
   and ``CONVIRT_DEMO_MAX_STEPS`` become its ``--n``, ``--time-budget`` and
   ``--max-steps`` (a smaller, faster demo for tests); unset, its defaults apply;
4. ``exec convirt serve``: the server replaces this process, so it is PID 1 and receives
   ``docker stop``'s SIGTERM itself.

With ``CONVIRT_INIT=0``, ``serve`` skips steps 2 and 3: the compose stack's one-shot
``init`` service has run them before any replica starts, so N replicas do not each check
the demo, and a replica restarted after a crash serves again in seconds.

While a step runs as a child process, SIGTERM and SIGINT are passed on to it (PID 1 has
no default signal handling, so without this ``docker stop`` would wait for its timeout).
Settings come from the ``CONVIRT_*`` environment (:mod:`app.settings`).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from pydantic import ValidationError

from app.commands.serve import serving_settings
from app.errors import AppError
from app.logsafe import configure_logging
from app.settings import MIN_API_KEY_CHARS, Settings

logger = logging.getLogger("convirt.entrypoint")

DEFAULT_DB_WAIT_S: Final = 120.0
#: Pause between connection attempts while waiting for the database.
DB_RETRY_S: Final = 1.0
#: The ``convirt`` console script of this interpreter's venv. Not ``python -m app.cli``:
#: that puts the working directory (the data volume) first on sys.path, where the vector
#: index folder ``index/`` would shadow the ``index`` package of the editable install.
CONVIRT: Final = (str(Path(sys.executable).with_name("convirt")),)
#: Environment variables of the demo and the ``convirt demo`` options they become.
DEMO_OPTIONS: Final = (
    ("CONVIRT_DEMO_N", "--n"),
    ("CONVIRT_DEMO_TIME_BUDGET", "--time-budget"),
    ("CONVIRT_DEMO_MAX_STEPS", "--max-steps"),
)
#: File under the data directory that keeps the generated API key.
KEY_FILE: Final = "api-key"
#: Random bytes of a generated key (43 URL-safe characters).
KEY_BYTES: Final = 32
#: Folder of ``convirt demo`` under the data directory (corpus and training run).
DEMO_DIR: Final = "demo"


class EntrypointError(AppError):
    """A start-up step failed; the container exits with a non-zero status."""

    code = "entrypoint_failed"


class StepInterruptedError(EntrypointError):
    """A step ended because the container was asked to stop (its state is saved)."""

    code = "interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class DatabaseUnavailableError(EntrypointError):
    """The database did not answer within the wait."""

    code = "database_unavailable"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise EntrypointError(
            f"{name}={raw!r} is not a number", code="invalid_environment"
        ) from None
    if value < 0:
        raise EntrypointError(f"{name} must be >= 0, got {raw!r}", code="invalid_environment")
    return value


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, atomically (never half a key)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def volume_api_key(settings: Settings) -> str | None:
    """The key to serve with when none is configured (step 0), or None when one is.

    Read from ``{data_dir}/api-key``; on the first start it is generated, written there
    (mode 0600) and logged once.

    Raises:
        EntrypointError: the file exists but holds no usable key.
    """
    if settings.api_keys or settings.allow_anonymous:
        return None
    path = settings.data_dir / KEY_FILE
    if path.exists():
        key = path.read_text(encoding="ascii", errors="replace").strip()
        if len(key) < MIN_API_KEY_CHARS or any(ch.isspace() or ch == "," for ch in key):
            raise EntrypointError(
                f"{path} holds no usable API key; delete it to have a new one generated",
                code="invalid_key_file",
            )
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            logger.warning("%s was readable by others; it is now private (0600)", path)
        logger.info("API key: the one kept in %s (shown in the log of the first start)", path)
        return key
    key = secrets.token_urlsafe(KEY_BYTES)
    _write_private(path, key + "\n")
    # The one time the key is shown: the operator needs it for the web page and clients.
    logger.warning(
        "no CONVIRT_API_KEYS set: generated an API key, kept in %s (mode 0600); send it "
        "as 'X-API-Key: <key>' or enter it on the web page. API key: %s",
        path,
        key,
    )
    return key


def _env_flag(name: str) -> bool:
    """A switch variable: on unless it is 0/false/no/off (unset: on)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def demo_enabled() -> bool:
    """``CONVIRT_DEMO`` (default on)."""
    return _env_flag("CONVIRT_DEMO")


def demo_arguments() -> list[str]:
    """``convirt demo`` options from the ``CONVIRT_DEMO_*`` variables that are set."""
    args: list[str] = []
    for name, option in DEMO_OPTIONS:
        value = os.environ.get(name, "").strip()
        if value:
            args += [option, value]
    return args


def has_bundle(bundle_dir: Path) -> bool:
    """Whether ``bundle_dir`` holds an encoder bundle (its manifest is checked, not hashed)."""
    from model.bundle import read_bundle_manifest
    from model.errors import ModelError

    try:
        read_bundle_manifest(bundle_dir)
    except ModelError:
        return False
    return True


def wait_for_database(url: str, timeout_s: float) -> None:
    """Return once ``url`` answers ``SELECT 1``; raise after ``timeout_s`` seconds.

    Raises:
        DatabaseUnavailableError: no answer within the wait (the last error is in the log).
    """
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import create_engine_for_url

    engine = create_engine_for_url(url, pooled=False)
    shown = engine.url.render_as_string(hide_password=True)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except SQLAlchemyError as exc:
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailableError(
                        f"database {shown} did not answer within {timeout_s:.0f} s "
                        f"({attempt} attempts; last error: {type(exc).__name__})"
                    ) from exc
                if attempt == 1:
                    logger.info("waiting for database %s", shown)
                time.sleep(DB_RETRY_S)
                continue
            logger.info("database %s answers (attempt %d)", shown, attempt)
            return
    finally:
        engine.dispose()


def run_step(argv: Sequence[str]) -> None:
    """Run one ``convirt`` command as a child, passing on SIGTERM/SIGINT; raise if it fails.

    Raises:
        StepInterruptedError: a signal was passed on and the child stopped (``docker stop``).
        EntrypointError: the child failed.
    """
    command = [*CONVIRT, *argv]
    logger.info("running: convirt %s", " ".join(argv))
    child = subprocess.Popen(command)
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise StepInterruptedError(
            f"`convirt {' '.join(argv)}` stopped by signal {received[0]} (status {status})",
            received[0],
        )
    if status != 0:
        raise EntrypointError(f"`convirt {' '.join(argv)}` exited with status {status}")


def wants_demo(settings: Settings) -> bool:
    """Whether to run ``convirt demo`` (see step 3 of the module docstring)."""
    if not demo_enabled():
        if not has_bundle(settings.bundle_dir):
            logger.warning(
                "no encoder bundle at %s and CONVIRT_DEMO=0: the service answers 503 "
                "until one is there",
                settings.bundle_dir,
            )
        return False
    if has_bundle(settings.bundle_dir) and not (settings.data_dir / DEMO_DIR).is_dir():
        logger.info("encoder bundle of your own at %s: no demo", settings.bundle_dir)
        return False
    return True


def init_enabled() -> bool:
    """``CONVIRT_INIT`` (default on); see the module docstring."""
    return _env_flag("CONVIRT_INIT")


def prepare(settings: Settings, *, initialise: bool = True) -> None:
    """Steps 1-3 of the module docstring: database, then (``initialise``) migrations and demo."""
    if not settings.is_sqlite:
        wait_for_database(settings.database_url, _env_float("CONVIRT_DB_WAIT_S", DEFAULT_DB_WAIT_S))
    if not initialise:
        logger.info("CONVIRT_INIT=0: migrations and demo are left to the init service")
        return
    run_step(["db", "upgrade"])
    if wants_demo(settings):
        run_step(["demo", "--no-serve", "--no-progress", *demo_arguments()])


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    """Serve (``argv`` empty or ``serve ...``), prepare (``init``) or run another command."""
    configure_logging(logging.INFO)
    command = argv[0] if argv else "serve"
    if command not in ("serve", "init"):
        os.execv(CONVIRT[0], [*CONVIRT, *argv])
    # As PID 1 a signal without a handler is ignored: make `docker stop` end the wait at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        initial = Settings()
        initial.data_dir.mkdir(parents=True, exist_ok=True)
        key = volume_api_key(initial)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    except EntrypointError as exc:
        logger.error("start-up failed (%s): %s", exc.code, exc)
        return 1
    if key is not None:
        # The steps and `convirt serve` (exec'd below) read it from the environment.
        os.environ["CONVIRT_API_KEYS"] = key
    # Checked before minutes of demo, not after: `convirt serve` would refuse at the end.
    settings = serving_settings()
    if settings is None:
        return 2
    try:
        prepare(settings, initialise=command == "init" or init_enabled())
    except StepInterruptedError as exc:
        logger.warning("%s; the next start continues from there", exc)
        return 128 + exc.signum
    except EntrypointError as exc:
        logger.error("start-up failed (%s): %s", exc.code, exc)
        return 1
    if command == "init":
        logger.info("data volume and database prepared")
        return 0
    serve_args = list(argv[1:])
    logger.info("starting the service on %s:%d", settings.host, settings.port)
    os.execv(CONVIRT[0], [*CONVIRT, "serve", *serve_args])
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
