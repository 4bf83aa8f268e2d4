"""The HTTP side of errors: ``application/problem+json`` (RFC 9457) documents and handlers.

Every error response of the service has the media type ``application/problem+json`` and a
body with the RFC 9457 members (``type``, ``title``, ``status``, ``detail``, ``instance``)
plus two extensions: ``code``, a stable snake_case identifier that clients branch on, and
``errors``, the list of field errors of a request that failed validation.

How exceptions become problems (:func:`install_problem_handlers`):

- :class:`app.errors.ProblemError`, raised by routes and services, carries its own status and code.
- :class:`model.errors.ModelError` is mapped by its ``code`` (:data:`MODEL_ERROR_STATUS`).
  The decision on image errors:

  * **415** when the *kind* of upload is not one the service reads at all:
    ``not_an_image`` (empty, or neither DICOM, PNG nor JPEG).
  * **422** when the upload is of a supported kind but its content cannot be used:
    ``corrupt_image``, ``no_pixel_data``, ``multi_frame``, ``color_dicom``,
    ``unsupported_transfer_syntax``. A DICOM in a transfer syntax no decoder handles is
    still a DICOM, the media type the client declared is right: 422, not 415.
  * **422** for ``aspect_ratio_out_of_range``: one side is more than
    ``max_aspect_ratio`` times the other; such a strip is no radiograph. The same for
    ``image_too_small``, a side under ``min_image_side`` pixels.
  * **422** for ``image_too_large``: the pixel count exceeds the limit. 413 is kept for
    request bodies over the upload byte limit (``payload_too_large``); a small compressed
    file that decodes to a huge image is a property of its content, not of the request size.

  Errors of the service's own bundle, weights or configuration (``bundle_*``,
  ``checkpoint_invalid``, ``invalid_config``, ``weights_unavailable``) are 500s with the
  message hidden. A ModelError whose code is not in the table is treated as a problem with
  the input (422) unless ``install_problem_handlers(status_by_code=...)`` says otherwise:
  ModelErrors are raised on purpose with a message written for people, so it is shown.
- Errors of the ``index`` package are recognised by duck typing (an exception defined
  under ``index`` with a string ``code``, i.e. ``index.errors.VectorIndexError``, without
  importing it) and mapped by :data:`INDEX_ERROR_STATUS`, defaulting to 500: during a
  request an index error is mostly a fault of the service. The message is shown for 4xx
  and hidden (logged) for 5xx, where it may name files and internals; the code is kept.
- ``RequestValidationError`` → 422 ``validation_error`` with the field errors.
- ``HTTPException`` (routing 404/405 included) → its status, with the code from
  :data:`HTTP_STATUS_CODES` and its headers kept (``Allow``, ``WWW-Authenticate``…).
- Faults of the machine, not of the request (:func:`fault_problem`): a database that
  cannot be reached or lost the connection → 503 ``database_unavailable`` with
  ``Retry-After``; a full disk (``ENOSPC``/``EDQUOT`` from a file write, SQLite's "database
  or disk is full", PostgreSQL's SQLSTATE 53100) → 507 ``insufficient_storage``.
- Anything else → 500 ``internal_error``: logged with a reference, and only that reference
  goes back to the client, never the message or a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ProblemError, ProblemFieldError, status_phrase
from model.errors import ModelError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

#: Prefix of the ``type`` URI of every problem; the code completes it.
PROBLEM_TYPE_PREFIX = "urn:convirt:problem:"

#: ModelError code → HTTP status (see the module docstring for the 415/422/413 decision).
MODEL_ERROR_STATUS: Mapping[str, int] = {
    # model.inputs.decode: what the client uploaded.
    "not_an_image": 415,
    "image_decode_error": 422,
    "corrupt_image": 422,
    "no_pixel_data": 422,
    "multi_frame": 422,
    "color_dicom": 422,
    "unsupported_transfer_syntax": 422,
    "image_too_large": 422,
    "aspect_ratio_out_of_range": 422,
    "image_too_small": 422,
    # Text and files the client supplied.
    "invalid_report": 422,
    "invalid_manifest": 422,
    # The service's own bundle, weights and configuration: not the client's fault.
    "bundle_error": 500,
    "bundle_invalid": 500,
    "bundle_corrupt": 500,
    "checkpoint_invalid": 500,
    "invalid_config": 500,
    "weights_unavailable": 500,
}

#: Index error code → HTTP status (codes of ``index.errors``). Only a bad ``k`` or search
#: parameter can come from the client; a saved index that cannot be trusted makes the
#: service unavailable until it is rebuilt; every other code is a fault of the service (500).
INDEX_ERROR_STATUS: Mapping[str, int] = {
    "k_out_of_range": 422,
    "bad_search_param": 422,
    "not_trained": 503,
    "manifest_missing": 503,
    "manifest_invalid": 503,
    "file_missing": 503,
    "checksum_mismatch": 503,
    "content_mismatch": 503,
    "model_mismatch": 503,
}

#: HTTP status → code of the problems made from ``HTTPException``.
HTTP_STATUS_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_content",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}

#: Seconds a client is told to wait (``Retry-After``) before retrying after a database fault.
DATABASE_RETRY_AFTER_S = 5
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PG_DISK_FULL = "53100"


def json_invalid() -> RequestValidationError:
    """The 422 ``validation_error`` for a body sent as JSON that is not JSON text."""
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]
    )


#: What FastAPI's 400 says when decoding a body failed other than by a JSON syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _is_json_media(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def fault_problem(exc: BaseException) -> ProblemError | None:
    """The 503 or 507 problem when ``exc`` is a database outage or a full disk, else None.

    These are states of the machine that pass, so the client is told so (and when to retry)
    rather than given a 500. A SQLite "database is locked" past the busy timeout is a
    503 too: retrying later is the right thing for the client to do.
    """
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return _insufficient_storage()
        if isinstance(cause, sa_exc.DBAPIError):
            original = cause.orig
            if getattr(original, "sqlstate", None) == _PG_DISK_FULL or (
                "database or disk is full" in str(original)
            ):
                return _insufficient_storage()
            if cause.connection_invalidated or isinstance(
                cause, sa_exc.OperationalError | sa_exc.InterfaceError
            ):
                return _database_unavailable()
        if isinstance(cause, sa_exc.DisconnectionError | sa_exc.TimeoutError):
            return _database_unavailable()
    return None


def _database_unavailable() -> ProblemError:
    return ProblemError(
        503,
        "database_unavailable",
        "the database cannot be reached; retry shortly",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def _insufficient_storage() -> ProblemError:
    return ProblemError(
        507,
        "insufficient_storage",
        "the service's storage is full; deleting images still works",
    )


class Problem(BaseModel):
    """An RFC 9457 problem details object with the service's ``code`` extension."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="URI of the problem type: urn:convirt:problem:<code>")
    title: str = Field(description="short summary of the problem type")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(default=None, description="this occurrence, for people")
    instance: str | None = Field(default=None, description="this occurrence, as a URI")
    code: str = Field(description="stable snake_case identifier to branch on")
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="field errors of a request that failed validation"
    )


def to_problem(error: ProblemError, instance: str | None = None) -> Problem:
    """The problem document of ``error``."""
    return Problem(
        type=PROBLEM_TYPE_PREFIX + error.code,
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=instance,
        code=error.code,
        errors=error.errors,
    )


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The response for ``problem``: its status, ``application/problem+json``, no null members."""
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=problem.status,
        headers=dict(headers) if headers else None,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem bodies for ``statuses``.

    The app's OpenAPI document (see :func:`install_problem_handlers`) declares the
    ``Problem`` schema and describes every 4xx/5xx response as ``application/problem+json``.
    """
    return {
        status: {
            "description": status_phrase(status),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}},
        }
        for status in statuses
    }


_PROBLEM_REF = "#/components/schemas/Problem"


def _describe_problems(schema: dict[str, Any]) -> None:
    """Rewrite an OpenAPI document in place: every error response is a Problem."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in problem.pop("$defs", {}).items():
        components[name] = definition
    components["Problem"] = problem
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                if str(status)[:1] in ("4", "5"):
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}}
    # FastAPI's own validation error schemas now describe nothing the service sends.
    paths = json.dumps(schema.get("paths", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        if json.dumps(f"#/components/schemas/{name}") not in paths:
            components.pop(name, None)


def _install_problem_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _describe_problems(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _instance(request: Request) -> str:
    return request.url.path


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _field_errors(raw: Sequence[Any]) -> list[ProblemFieldError]:
    # The submitted value (pydantic's "input") is left out on purpose: it may be a large
    # upload or text that must not be echoed into logs and proxies.
    out: list[ProblemFieldError] = []
    for err in raw:
        ctx = err.get("ctx")
        out.append(
            ProblemFieldError(
                loc=[p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
                msg=str(err.get("msg", "")),
                type=str(err.get("type", "")),
                ctx=_json_safe(ctx) if isinstance(ctx, dict) else None,
            )
        )
    return out


def _internal_error(request: Request | None, exc: BaseException) -> JSONResponse:
    reference = uuid.uuid4().hex
    path = request.url.path if request is not None else "?"
    logger.error(
        "unhandled %s on %s (reference %s)",
        type(exc).__name__,
        path,
        reference,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return problem_response(
        Problem(
            type=PROBLEM_TYPE_PREFIX + "internal_error",
            title=status_phrase(500),
            status=500,
            detail=f"The service failed to handle the request; reference {reference}.",
            instance=f"urn:uuid:{uuid.UUID(reference)}",
            code="internal_error",
        )
    )


def _index_error_code(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    module = type(exc).__module__
    if isinstance(code, str) and (module == "index" or module.startswith("index.")):
        return code
    return None


class _ProblemHandlers:
    """The exception handlers, closed over the code → status overrides of one app."""

    def __init__(self, status_by_code: Mapping[str, int]) -> None:
        self._status_by_code = dict(status_by_code)

    async def problem_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        if exc.status >= 500:
            logger.warning("%s %s on %s: %s", exc.status, exc.code, request.url.path, exc)
        return problem_response(to_problem(exc, _instance(request)), exc.headers)

    async def model_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ModelError)
        status = self._status_by_code.get(exc.code, MODEL_ERROR_STATUS.get(exc.code, 422))
        if status >= 500:
            return _internal_error(request, exc)
        logger.info("%s %s on %s: %s", status, exc.code, request.url.path, exc)
        return problem_response(
            Problem(
                type=PROBLEM_TYPE_PREFIX + exc.code,
                title=status_phrase(status),
                status=status,
                detail=exc.message,
                instance=_instance(request),
                code=exc.code,
            )
        )

    async def validation_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = _field_errors(exc.errors())
        return problem_response(
            Problem(
                type=PROBLEM_TYPE_PREFIX + "validation_error",
                title="Request validation failed",
                status=422,
                detail=f"{len(errors)} field error(s) in the request",
                instance=_instance(request),
                code="validation_error",
                errors=errors,
            )
        )

    async def http_exception(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 400 and exc.detail == _FASTAPI_BODY_ERROR and _is_json_media(request):
            # FastAPI answers a JSON syntax error with a 422 but bytes that are not UTF-8,
            # or nesting past the parser's recursion, with this 400: one mistake, one answer.
            return await self.validation_error(request, json_invalid())
        # An HTTPException raised on purpose may carry its own code (a string attribute).
        own_code = getattr(exc, "code", None)
        code = (
            own_code
            if isinstance(own_code, str)
            else HTTP_STATUS_CODES.get(status, f"http_{status}")
        )
        title = status_phrase(status)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return problem_response(
            Problem(
                type=PROBLEM_TYPE_PREFIX + code,
                title=title,
                status=status,
                detail=detail,
                instance=_instance(request),
                code=code,
            ),
            exc.headers,
        )

    def other(self, request: Request | None, exc: BaseException) -> JSONResponse:
        fault = fault_problem(exc)
        if fault is not None:
            path = request.url.path if request is not None else "?"
            logger.warning("%d %s on %s: %s", fault.status, fault.code, path, type(exc).__name__)
            instance = _instance(request) if request is not None else None
            return problem_response(to_problem(fault, instance), fault.headers)
        index_code = _index_error_code(exc)
        if index_code is None:
            return _internal_error(request, exc)
        status = self._status_by_code.get(index_code, INDEX_ERROR_STATUS.get(index_code, 500))
        path = request.url.path if request is not None else "?"
        if status >= 500:
            logger.error(
                "index error %s on %s",
                index_code,
                path,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            detail = "The vector index could not serve the request."
        else:
            logger.info("%s %s on %s: %s", status, index_code, path, exc)
            detail = str(exc)
        return problem_response(
            Problem(
                type=PROBLEM_TYPE_PREFIX + index_code,
                title=status_phrase(status),
                status=status,
                detail=detail,
                instance=_instance(request) if request is not None else None,
                code=index_code,
            )
        )

    async def server_error(self, request: Request, exc: Exception) -> JSONResponse:
        return self.other(request, exc)


class _CatchAllMiddleware:
    """Turns exceptions no handler took into problems.

    Starlette's own last-resort handler re-raises after responding, which logs every
    failure twice and makes test clients raise; this one answers and stops there. It
    can only answer while the response has not started.
    """

    def __init__(self, app: ASGIApp, handlers: _ProblemHandlers) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            response = self.handlers.other(Request(scope), exc)
            await response(scope, receive, send)


def install_problem_handlers(
    app: FastAPI, *, status_by_code: Mapping[str, int] | None = None
) -> None:
    """Make every error response of ``app`` an ``application/problem+json`` problem.

    The OpenAPI document follows: its 4xx/5xx responses (FastAPI's automatic 422
    included) are described as ``application/problem+json`` bodies of the ``Problem`` schema.

    ``status_by_code`` overrides the HTTP status of ModelError and index error codes
    (e.g. ``{"bundle_mismatch": 500}``). Call it before the app starts serving.
    """
    handlers = _ProblemHandlers(status_by_code or {})
    app.add_exception_handler(ProblemError, handlers.problem_error)
    app.add_exception_handler(ModelError, handlers.model_error)
    app.add_exception_handler(RequestValidationError, handlers.validation_error)
    app.add_exception_handler(StarletteHTTPException, handlers.http_exception)
    # Reached only by exceptions raised in middleware outside the catch-all below.
    app.add_exception_handler(Exception, handlers.server_error)
    app.add_middleware(_CatchAllMiddleware, handlers=handlers)
    _install_problem_openapi(app)
