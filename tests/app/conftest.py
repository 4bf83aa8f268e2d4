"""Database fixtures of the app tests: a SQLite file per test and a throwaway PostgreSQL.

PostgreSQL: one cluster per test session, made with the server's own ``initdb`` and
``pg_ctl`` (Debian's ``postgresql`` package: /usr/lib/postgresql/<version>/bin) in a
temporary directory, listening on a free loopback port with trust authentication, and
removed at the end. Each test that asks for ``postgres_url`` gets a fresh database in it.
The server refuses to run as root, so when the tests run as root it runs as the
``postgres`` user. Without initdb the PostgreSQL tests are skipped, except on CI
(``CI=true``), where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.app.process_support import free_port
from tests.environment import missing_tool

PG_USER = "postgres"
START_ATTEMPTS = 3


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster."""

    port: int
    base_dir: Path
    bin_dir: Path

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def admin_connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``: ``immediate`` is a crash (no shutdown checkpoint)."""
        _run(_as_server_user(self._pg_ctl("-m", mode, "stop")), "pg_ctl stop")

    def start(self) -> None:
        """Start the stopped cluster again on the same port."""
        done = subprocess.run(
            _as_server_user(
                self._pg_ctl(
                    "-l",
                    str(self.base_dir / "server.log"),
                    "-o",
                    _server_options(self.port, self.base_dir),
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
            ),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}")

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(self.bin_dir / "pg_ctl"), "-D", str(self.base_dir / "data"), *args]


def _server_options(port: int, base: Path) -> str:
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base}"
    if (base / "durable").exists():
        return options
    # Fast but not crash-safe: an acknowledged commit can be lost to an immediate stop.
    return options + " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def _find_pg_bin() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *argv]
    return argv


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr or done.stdout}")


@contextlib.contextmanager
def throwaway_cluster(*, durable: bool = False) -> Iterator[PostgresServer]:
    """A new PostgreSQL cluster in a temporary directory, stopped and removed afterwards.

    The session's cluster serves many tests; a test that stops its server makes its own,
    ``durable`` (fsync and synchronous commits on) when it crashes the server and expects
    every acknowledged commit to survive, as in production.
    """
    bin_dir = _find_pg_bin()
    if bin_dir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) not found under "
            "/usr/lib/postgresql/*/bin or on PATH; install them with "
            "`apt-get install -y postgresql`"
        )
        missing_tool(reason)

    base = Path(tempfile.mkdtemp(prefix="convirt-pg-"))
    data = base / "data"
    log = base / "server.log"
    if durable:
        (base / "durable").touch()
    if os.geteuid() == 0:
        shutil.chown(base, user=PG_USER)
    try:
        _run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        port = 0
        for attempt in range(1, START_ATTEMPTS + 1):
            # The port is free when asked but could be taken before the server binds it.
            port = free_port()
            start = _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    _server_options(port, base),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
            done = subprocess.run(start, capture_output=True, text=True, timeout=90, check=False)
            if done.returncode == 0:
                break
            if attempt == START_ATTEMPTS:
                server_log = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeError(f"pg_ctl start failed: {done.stderr}\n{server_log}")
        server = PostgresServer(port=port, base_dir=base, bin_dir=bin_dir)
        try:
            yield server
        finally:
            with contextlib.suppress(RuntimeError):  # already stopped by the test
                server.stop("fast")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with throwaway_cluster() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database in the session's cluster, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres_server.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.url(name)
    with postgres_server.admin_connect() as conn, contextlib.suppress(psycopg.Error):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file URL in the test's temporary directory (the file does not exist yet)."""
    return f"sqlite:///{tmp_path / 'db' / 'convirt.db'}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend the service supports."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("postgres_url")
    return url
