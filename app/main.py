"""The FastAPI application factory: ``create_app(settings) -> FastAPI``.

Nothing happens at import. ``create_app`` builds the app from the settings it is given
(tests inject their own data directory); the lifespan does the slow work:

- start-up: migrate the database, load the encoder bundle, reconcile the index with the
  database (:class:`app.services.runtime.Runtime`). If that fails (no bundle yet, database
  down) the app still answers: ``/health`` is 200, ``/ready`` and the API are 503
  ``service_not_ready``, and start-up is retried in the background;
- while running: every few seconds, save unsaved index changes, or rebuild an index that
  a failed change left stale;
- shutdown: save the index, close the database connections.

Run it with ``convirt serve`` (uvicorn).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from app.api import classify as classify_api
from app.api import docs as docs_page
from app.api import evaluations as evaluations_api
from app.api import health, images, search
from app.api import web as web_page
from app.api.problems import install_problem_handlers
from app.api.uploads import BodyLimitMiddleware
from app.security import (
    ApiKeyMiddleware,
    RequestGuardMiddleware,
    SecurityHeadersMiddleware,
    document_guards,
    encode_keys,
    require_api_key,
)
from app.services.evaluations import EvaluationJobs
from app.services.metrics import Metrics, MetricsMiddleware
from app.services.runtime import Runtime
from app.settings import Settings
from model.bundle import EncoderBundle

logger = logging.getLogger(__name__)

#: Routes open without an API key.
PUBLIC_PATHS: Final = ("/health", "/ready")
#: Seconds between maintenance rounds (index save or rebuild, start-up retry).
MAINTENANCE_INTERVAL_S: Final = 5.0
#: Longest wait between start-up retries.
MAX_RETRY_S: Final = 60.0

DESCRIPTION: Final = """
Zero-shot chest X-ray retrieval on ConVIRT image and text encoders.

* **Upload** DICOM, PNG or JPEG files to `POST /images`. The same bytes uploaded again
  return the existing id. A batch answers **201** when at least one file was stored (or
  found stored), with a per-file `results` list (`created`, `existing` or `failed` with its
  problem); when every file failed, the answer is a problem (415/422).
* **Search** by text (`POST /search/text`) or by example image (`POST /search/image`).
* Every error is `application/problem+json` (RFC 9457) with a stable `code`.
* When the service has API keys, every route except `/health` and `/ready` needs one:
  `X-API-Key: <key>` or `Authorization: Bearer <key>`.

Stored pixels are a de-identified PNG derivative; no patient identifier is stored,
logged or returned.
"""


def _start_runtime(app: FastAPI, settings: Settings, bundle: EncoderBundle | None) -> bool:
    """Build the runtime into ``app.state``; on failure record why and return False."""
    try:
        runtime = Runtime.start(settings, metrics=app.state.metrics, bundle=bundle)
    except Exception as exc:
        # /ready is public: it names the kind of failure; the log has the details.
        code = getattr(exc, "code", None)
        app.state.startup_error = type(exc).__name__ + (f" ({code})" if code else "")
        logger.exception("start-up failed; retrying in the background")
        return False
    app.state.runtime = runtime
    app.state.startup_error = None
    report = runtime.report
    logger.info(
        "ready: model %s, %d vectors (index %s)",
        report.model_id,
        report.vectors,
        f"rebuilt: {report.reason}" if report.rebuilt else "loaded",
    )
    return True


async def _maintenance_loop(app: FastAPI, settings: Settings, bundle: EncoderBundle | None) -> None:
    retry = MAINTENANCE_INTERVAL_S
    while True:
        runtime: Runtime | None = app.state.runtime
        if runtime is None:
            await anyio.sleep(retry)
            if not await anyio.to_thread.run_sync(_start_runtime, app, settings, bundle):
                retry = min(retry * 2, MAX_RETRY_S)
            continue
        await anyio.sleep(MAINTENANCE_INTERVAL_S)
        try:
            await anyio.to_thread.run_sync(runtime.maintain)
        except Exception:
            # Maintenance failing must not take the service down; /ready shows the state.
            logger.exception("index maintenance failed")


def _document_guards(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = generate()
        if first:
            document_guards(schema, PUBLIC_PATHS)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, bundle: EncoderBundle | None = None) -> FastAPI:
    """The service for ``settings`` (``Settings()`` from the environment when omitted).

    ``bundle`` hands in an already loaded encoder bundle instead of loading
    ``settings.bundle_dir`` (tests and benchmarks share one between apps).
    """
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(_start_runtime, app, settings, bundle)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_maintenance_loop, app, settings, bundle)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
        runtime: Runtime | None = app.state.runtime
        if runtime is not None:
            app.state.runtime = None
            await anyio.to_thread.run_sync(runtime.close)
            logger.info("shut down; index saved")

    app = FastAPI(
        title="ConVIRT chest X-ray retrieval",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served below behind the API key like every other route.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.api_keys = encode_keys(settings.api_keys)
    app.state.runtime = None
    app.state.startup_error = None
    app.state.evaluations = EvaluationJobs()  # one evaluation run at a time

    app.include_router(health.router)
    app.include_router(images.router)
    app.include_router(search.router)
    app.include_router(classify_api.router)
    app.include_router(evaluations_api.router)
    app.include_router(web_page.router)
    app.include_router(docs_page.router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    install_problem_handlers(app)
    _document_guards(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    # The web page and its assets are open: the page is where a user enters the key.
    public_paths = (*PUBLIC_PATHS, *web_page.PUBLIC_PATHS, *docs_page.PUBLIC_PATHS)
    app.add_middleware(ApiKeyMiddleware, keys=app.state.api_keys, public_paths=public_paths)
    # Outside the key check: a request for a foreign host name is refused before anything.
    app.add_middleware(
        RequestGuardMiddleware,
        allowed_hosts=settings.allowed_hosts,
        keys=app.state.api_keys,
        exempt_paths=PUBLIC_PATHS,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    # Added last, so outermost: it sees the final status of every response, errors included.
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
