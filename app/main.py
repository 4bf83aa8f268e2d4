"""The FastAPI application factory: ``create_app(settings) -> FastAPI``.

Nothing happens at import. ``create_app`` builds the app from the settings it is given
(tests inject their own data directory); the lifespan does the slow work:

- start-up: migrate the database, load the encoder bundle, reconcile the index with the
  database (:class:`app.services.runtime.Runtime`). If that fails (no bundle yet, database
  down) the app still answers: ``/health`` is 200, ``/ready`` and the API are 503
  ``service_not_ready``, and start-up is retried in the background;
- while running: a follower thread applies the database's change feed to the index
  (changes by other processes); every few seconds, save unsaved index changes, rebuild an
  index that a failed change left stale, or move to the model another process switched
  to (``convirt reindex``) once its bundle is in the bundle directory;
- shutdown: save the index, close the database connections.

Run it with ``convirt serve`` (uvicorn).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
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
from app.services.job_worker import JobWorker
from app.services.metrics import Metrics, MetricsMiddleware
from app.services.runtime import Runtime
from app.settings import Settings
from model.bundle import EncoderBundle, read_bundle_manifest
from model.errors import ModelError

logger = logging.getLogger(__name__)


def read_bundle_model_id(bundle_dir: Path) -> str:
    """The model id a bundle directory's manifest names (its files are not hashed)."""
    return str(read_bundle_manifest(bundle_dir)["model_id"])


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
    # Changes made by other processes reach this index from here on.
    runtime.follower.start()
    report = runtime.report
    logger.info(
        "ready: model %s, %d vectors (index %s)",
        report.model_id,
        report.vectors,
        f"rebuilt: {report.reason}" if report.rebuilt else "loaded",
    )
    return True


def _follow_switch(app: FastAPI, settings: Settings, runtime: Runtime) -> bool:
    """Another process made another model active: serve it if our bundle directory has it.

    The new runtime starts (and catches up) beside the old one, which serves meanwhile
    (``/ready`` says ``model_switched``), then takes its place. Returns False when the
    bundle directory still holds another model (the operator has yet to install it).
    """
    target = runtime.follower.switched_to
    try:
        on_disk = read_bundle_model_id(settings.bundle_dir)
    except ModelError as exc:
        logger.warning("cannot read the bundle at %s: %s", settings.bundle_dir, exc)
        return False
    if on_disk != target:
        if getattr(app.state, "switch_warned", None) != target:
            app.state.switch_warned = target
            logger.warning(
                "model %s is active but %s holds %s; install its bundle there",
                target,
                settings.bundle_dir,
                on_disk,
            )
        return False
    successor = Runtime.start(settings, metrics=app.state.metrics)
    successor.follower.start()
    app.state.runtime = successor
    runtime.close()
    logger.info("now serving model %s", successor.bundle.model_id)
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
            if runtime.follower.switched_to is not None:
                # Cheap until the bundle is there: only its manifest is read.
                await anyio.to_thread.run_sync(_follow_switch, app, settings, runtime)
                continue
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
        worker: JobWorker | None = None
        if settings.evaluation_worker:
            worker = JobWorker(app.state.evaluations, lambda: app.state.runtime)
            worker.start()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_maintenance_loop, app, settings, bundle)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
        if worker is not None:
            await anyio.to_thread.run_sync(worker.stop, 60.0)
        runtime: Runtime | None = app.state.runtime
        if runtime is not None:
            app.state.runtime = None
            await anyio.to_thread.run_sync(runtime.close)
            logger.info("shut down; index saved")
        app.state.metrics.close()

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
    # Evaluation jobs: a queue in the database, one run at a time across processes.
    app.state.evaluations = EvaluationJobs(lease_s=settings.evaluation_lease_s)

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


def create_worker_app() -> FastAPI:
    """The app of one ``convirt serve --workers N`` worker: settings from the environment
    (the parent exported them), logging set up in this fresh process."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    return create_app(settings)
