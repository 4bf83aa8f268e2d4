"""``convirt serve``'s HTTP server: uvicorn, with bounds on connections and slow clients.

uvicorn alone closes idle keep-alive connections, but has no timeout for a request that
is still arriving: a client that trickles its headers (or its body) one byte at a time
holds a connection, and a task, for as long as it likes. Twenty such clients kept their
connections for minutes. So the server runs :class:`BoundedReadProtocol`, uvicorn's h11
protocol with two deadlines per request:

- the headers must be complete within ``header_timeout_s`` of the first byte of the
  request (of the connection, for its first request);
- the body must be complete within ``body_timeout_s`` after the headers.

A request that misses its deadline has its connection closed (the app sees a
disconnect). And at most ``max_connections`` connections are open at once: one more is
closed as soon as it is accepted, and uvicorn's ``limit_concurrency`` answers 503 to
requests beyond the same number.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection stays open between requests (uvicorn's own).
KEEP_ALIVE_S: Final = 5
#: h11 states in which the client has nothing more to send for the current request.
_REQUEST_DONE: Final = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class BoundedReadProtocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap (module docstring).

    The bounds are class attributes: :func:`bounded_protocol` makes a subclass with the
    service's settings, since uvicorn builds one protocol object per connection itself.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "headers"

    # -- deadlines -----------------------------------------------------------------------

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        limit = self.header_timeout_s if self._phase == "headers" else self.body_timeout_s
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info(
            "closed the connection of %s: request %s not received within %g s",
            peer,
            self._phase,
            limit,
        )
        self.transport.close()

    def _follow_request(self) -> None:
        """Move the deadline along with the request: headers → body → done."""
        state = self.conn.their_state
        if state in _REQUEST_DONE:
            self._disarm()
        elif state is h11.SEND_BODY and self._phase == "headers":
            self._arm("body", self.body_timeout_s)

    # -- uvicorn's protocol hooks --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning(
                "refused a connection: %d are open, the limit is %d",
                len(self.connections) - 1,
                self.max_connections,
            )
            transport.close()
            return
        self._arm("headers", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            # The first bytes of the next request on a kept-alive connection.
            self._arm("headers", self.header_timeout_s)
        super().data_received(data)
        if not self.transport.is_closing():
            self._follow_request()

    def on_response_complete(self) -> None:
        # Answered (possibly before its body was read): nothing left to wait for.
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def bounded_protocol(
    *, header_timeout_s: float, body_timeout_s: float, max_connections: int
) -> type[BoundedReadProtocol]:
    """A :class:`BoundedReadProtocol` subclass carrying these bounds."""
    return type(
        "ConfiguredBoundedReadProtocol",
        (BoundedReadProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
        },
    )


def build_server(app: Any, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``settings.host:port`` with the service's bounds."""
    protocol = bounded_protocol(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=KEEP_ALIVE_S,
        log_level=settings.log_level.lower(),
        # The root logger is already configured by the CLI; keep uvicorn from replacing it.
        log_config=None,
    )
    return uvicorn.Server(config)
