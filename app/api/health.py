"""``/health`` (alive), ``/ready`` (able to serve) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import MetricsDep
from app.api.problems import problem_responses
from app.errors import ProblemError
from app.schemas import HealthPublic, ReadyPublic, ServingModelPublic
from app.security import require_api_key
from app.services.provenance import serving_model
from app.services.runtime import Runtime

router = APIRouter(tags=["operations"])


# HEAD too, because load balancers and uptime checkers often probe with it; it is left out
# of the OpenAPI document, where it would repeat the GET operation.
@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=HealthPublic, summary="The process is alive")
async def health() -> HealthPublic:
    """Always 200 while the process serves requests; says nothing about its dependencies."""
    return HealthPublic(status="ok")


@router.head("/ready", include_in_schema=False)
@router.get(
    "/ready",
    response_model=ReadyPublic,
    summary="The service can serve searches and uploads",
    responses=problem_responses(503),
)
async def ready(request: Request) -> ReadyPublic:
    """200 when the encoder bundle is loaded, the database answers and the index holds
    the stored vectors of the current model, following the change feed; otherwise a 503
    problem whose code says which: ``service_not_ready``, ``database_unavailable``,
    ``index_inconsistent``, ``index_lagging`` (the index has not caught up with the
    feed for ``CONVIRT_FEED_MAX_LAG_S``) or ``model_switched`` (another model became active
    and this process is loading it). The body reports the feed lag in changes and seconds.
    ``notes`` lists what does not stop serving; ``model`` names the serving model, where
    it comes from and what it was trained on.
    """
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        reason = getattr(request.app.state, "startup_error", None) or "still starting"
        raise ProblemError(503, "service_not_ready", f"the service is not ready: {reason}")
    state = await anyio.to_thread.run_sync(runtime.readiness)
    if not state.ready:
        raise ProblemError(503, state.code or "service_not_ready", state.detail)
    return ReadyPublic(
        status="ready",
        model_id=runtime.bundle.model_id,
        images=state.images,
        index_vectors=state.vectors,
        notes=list(state.notes),
        model=ServingModelPublic(**serving_model(runtime.bundle)),
        feed_sequence=runtime.index.sequence,
        feed_lag_changes=state.lag_changes,
        feed_lag_seconds=round(state.lag_seconds, 3),
    )


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    dependencies=[Depends(require_api_key)],
    responses={
        200: {"content": {"text/plain": {}}, "description": "Text exposition format."},
        **problem_responses(401),
    },
)
async def metrics(registry: MetricsDep) -> Response:
    """Request counts and latency histograms per route, and latency per stage."""
    return Response(registry.render(), media_type=registry.content_type)
