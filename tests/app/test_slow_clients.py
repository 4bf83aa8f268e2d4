"""Slow clients against the real server of ``convirt serve`` (uvicorn on 127.0.0.1).

A client that trickles its headers or its body must lose its connection within the
configured bound, while a normal request on another connection is answered; connections
beyond the limit are closed at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.serving import build_server
from app.settings import Settings
from tests.app.process_support import free_port

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 6
#: Scheduling slack on a loaded 2-core machine.
SLACK_S = 2.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """``convirt serve``'s server, in a thread, on an app with no bundle (/health answers)."""
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS,
    )
    server = build_server(create_app(settings), settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def _connect(address: str) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(0.2)
    return sock


def _trickle(sock: socket.socket, data: bytes, limit_s: float) -> float | None:
    """Send ``data`` a byte every 0.1 s; seconds until the server closed, None if it never did."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit_s:
            return None
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except OSError:  # reset by the server
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _health(address: str) -> int:
    return httpx.get(f"http://{address}/health", timeout=5).status_code


def test_trickled_headers_are_cut_off_and_others_are_served(server: str) -> None:
    sock = _connect(server)
    closed_after: list[float | None] = []
    headers = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 500 + b"\r\n\r\n"
    slow = threading.Thread(target=lambda: closed_after.append(_trickle(sock, headers, 20)))
    slow.start()
    time.sleep(0.3)
    # Meanwhile, on another connection, a normal request is answered.
    assert _health(server) == 200
    slow.join()
    sock.close()
    (seconds,) = closed_after
    assert seconds is not None, "the trickling client was never cut off"
    assert HEADER_TIMEOUT_S - 0.2 <= seconds <= HEADER_TIMEOUT_S + SLACK_S


def test_a_trickled_body_is_cut_off(server: str) -> None:
    sock = _connect(server)
    head = (
        b"POST /search/text HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    )
    sock.sendall(head)
    seconds = _trickle(sock, b"x" * 400, 20)
    sock.close()
    assert seconds is not None, "the trickling body was never cut off"
    assert seconds <= BODY_TIMEOUT_S + SLACK_S
    assert _health(server) == 200


def test_an_idle_connection_does_not_hold_the_server(server: str) -> None:
    sock = _connect(server)
    start = time.monotonic()
    sock.settimeout(HEADER_TIMEOUT_S + SLACK_S + 5)
    assert sock.recv(10) == b""  # closed by the server, not by our timeout
    assert time.monotonic() - start <= HEADER_TIMEOUT_S + SLACK_S
    sock.close()


def test_connections_beyond_the_limit_are_closed(server: str) -> None:
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    extra = _connect(server)
    extra.settimeout(1.0)
    try:
        assert extra.recv(10) == b""  # closed at once, long before the header deadline
    finally:
        extra.close()
    for sock in held:
        sock.close()
    # Once they are gone, requests are served again.
    time.sleep(0.2)
    assert _health(server) == 200


def test_keep_alive_requests_each_get_a_fresh_deadline(server: str) -> None:
    # One connection, several requests spread over more than one header deadline.
    sock = _connect(server)
    sock.settimeout(5)
    try:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = b""
            while b'{"status":"ok"}' not in reply:
                chunk = sock.recv(4096)
                assert chunk, f"closed after {reply!r}"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply
            time.sleep(HEADER_TIMEOUT_S * 0.6)
    finally:
        sock.close()
