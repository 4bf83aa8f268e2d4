"""Dependencies of the routes, as ``Annotated`` aliases: ``SettingsDep``, ``RuntimeDep``…

Everything comes from ``request.app.state``, filled by the app's lifespan
(:func:`app.main.create_app`); nothing is a module-level singleton, so several apps with
different settings live side by side (the tests build many).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import ProblemError
from app.services.metrics import Metrics
from app.services.runtime import Runtime
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> Runtime:
    """The started runtime, or a 503 problem while it is not (yet) available."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        reason: str = getattr(request.app.state, "startup_error", None) or "still starting"
        raise ProblemError(
            503,
            "service_not_ready",
            f"the service is not ready: {reason}",
            headers={"Retry-After": "5"},
        )
    return runtime


def get_session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Iterator[Session]:
    """A database session for the request, closed after it (read-only use in routes)."""
    with runtime.sessions() as session:
        yield session


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_session)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
