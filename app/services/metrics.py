"""Prometheus metrics of one app: request counts and latencies per route, and per stage.

Each app owns its :class:`~prometheus_client.CollectorRegistry`, so that several apps in one
process (the tests build many) never collide on metric names and ``/metrics`` shows only the
app it is served by.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        )
        self.feed_sequence = Gauge(
            "convirt_feed_sequence",
            "The change feed position the index is complete up to.",
            registry=self.registry,
        )
        self.feed_lag_changes = Gauge(
            "convirt_feed_lag_changes",
            "Committed changes the index had not applied at the follower's last round.",
            registry=self.registry,
        )
        self.feed_lag_seconds = Gauge(
            "convirt_feed_lag_seconds",
            "Seconds since the index last caught up with the change feed's head.",
            registry=self.registry,
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

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware that counts and times every HTTP request.

    The route label is the matched route's template (``/images/{image_id}``), read from the
    scope after routing; requests that match no route share the label ``unmatched`` so that
    scanners probing random paths cannot blow up the number of series.
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
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(
                time.perf_counter() - start
            )
