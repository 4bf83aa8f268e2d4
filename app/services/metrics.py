"""Prometheus metrics of one app: request counts and latencies per route, and per stage.

Each app owns its :class:`~prometheus_client.CollectorRegistry`, so that several apps in one
process (the tests build many) never collide on metric names and ``/metrics`` shows only the
app it is served by.

Several worker processes (``convirt serve --workers N``) use prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names a directory where every process
writes its values, and ``/metrics``, whichever worker answers, adds up the counters and
histograms of all of them. Gauges there are per process (a ``pid`` label, live processes
only) and cannot be computed at scrape time in the process that owns them, so each
process sets them itself after every follower round (:meth:`Metrics.refresh`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: HTTP methods counted under their own name; any other method (``FOO``, ``get``…) is
#: counted as :data:`OTHER_METHOD`, so a client cannot mint new series by inventing methods.
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD: Final = "other"
#: Route label of requests that matched no route.
UNMATCHED_ROUTE: Final = "unmatched"
#: The variable prometheus_client reads, at import, to switch to multiprocess mode.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: The stages a request goes through; a fixed set keeps the label's cardinality bounded.
STAGES: Final[tuple[str, ...]] = ("decode", "encode", "search", "database", "store", "index")

_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """The collectors of one app, on a registry of its own."""

    content_type: Final = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        # Keyed by the gauge: a new runtime (after a model switch) rebinds, not adds.
        self._sources: dict[int, tuple[Gauge, Callable[[], float]]] = {}
        self.requests = Counter(
            "convirt_http_requests",
            "HTTP requests by method, route template and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "convirt_http_request_duration_seconds",
            "Latency of HTTP requests by method and route template.",
            ("method", "route"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "convirt_stage_duration_seconds",
            "Time spent per stage: decode, encode, search, database, store, index.",
            ("stage",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ingested = Counter(
            "convirt_ingested_images",
            "Uploaded files by outcome: created, existing or failed.",
            ("outcome",),
            registry=self.registry,
        )
        self.index_vectors = Gauge(
            "convirt_index_vectors",
            "Vectors in the loaded index.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.feed_sequence = Gauge(
            "convirt_feed_sequence",
            "The change feed position the index is complete up to.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.feed_lag_changes = Gauge(
            "convirt_feed_lag_changes",
            "Committed changes the index had not applied at the follower's last round.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.feed_lag_seconds = Gauge(
            "convirt_feed_lag_seconds",
            "Seconds since the index last caught up with the change feed's head.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        # Zero-valued series from the start, so a dashboard sees every stage before traffic.
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as one observation of ``name`` (one of :data:`STAGES`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - start)

    def bind(self, gauge: Gauge, source: Callable[[], float]) -> None:
        """Make ``gauge`` show ``source()``: read at scrape time, or at each refresh in
        multiprocess mode."""
        if self.multiprocess:
            self._sources[id(gauge)] = (gauge, source)
            gauge.set(source())
        else:
            gauge.set_function(source)

    def refresh(self) -> None:
        """Write the bound gauges' current values (multiprocess mode; else a no-op)."""
        for gauge, source in self._sources.values():
            gauge.set(source())

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (all workers' together
        in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """This process is going: its live gauges leave the multiprocess totals."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, when this process is one of several."""
    return os.environ.get(MULTIPROC_ENV) or None


class MetricsMiddleware:
    """Pure ASGI middleware that counts and times every HTTP request.

    The route label is the matched route's template (``/images/{image_id}``), read from the
    scope after routing; requests that match no route share the label ``unmatched`` and
    methods outside :data:`KNOWN_METHODS` share ``other``, so that scanners probing random
    paths or methods cannot blow up the number of series.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = str(scope.get("method", ""))
            if method not in KNOWN_METHODS:
                method = OTHER_METHOD
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(
                time.perf_counter() - start
            )
