"""Real ``convirt`` processes for the many-process tests: servers and commands as users run them.

Each server is ``python -m app.cli serve`` on a free loopback port, with the test's
settings passed as options; :class:`ServeProcess` waits for ``/ready`` and stops the
process it started (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Loading the bundle's towers on a busy 2-core machine can take a while.
START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child: offline, this checkout first on the path."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{path}" if path else str(PROJECT_ROOT),
        **extra,
    }


def settings_options(
    *, data_dir: Path, database_url: str, bundle_dir: Path, index_dir: Path
) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--database-url",
        database_url,
        "--bundle-dir",
        str(bundle_dir),
        "--index-dir",
        str(index_dir),
    ]


def run_command(argv: Sequence[str], *, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run ``convirt ARGV`` to completion and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=process_env(),
        cwd=PROJECT_ROOT,
    )


class ServeProcess:
    """One ``convirt serve`` child process and an HTTP client to it."""

    def __init__(self, options: Sequence[str], log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--port",
                str(self.port),
                *options,
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=process_env(),
            cwd=PROJECT_ROOT,
        )
        self.client = httpx.Client(base_url=self.base_url, timeout=30.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = self.client.get("/ready")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log()}")

    def search_ids(self, k: int = 200) -> set[int]:
        response = self.client.post("/search/text", json={"query": "effusion", "k": k})
        assert response.status_code == 200, response.text
        return {hit["image_id"] for hit in response.json()["hits"]}

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@contextmanager
def serving(options: Sequence[str], log_path: Path, *extra: str) -> Iterator[ServeProcess]:
    server = ServeProcess(options, log_path, *extra)
    try:
        yield server
    finally:
        server.stop()
