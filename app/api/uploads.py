"""Request size limits, reading uploaded files within them, and checks uploads share."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Annotated, Any, Final

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import json_invalid, problem_response, to_problem
from app.errors import ProblemError, ProblemFieldError
from app.schemas import (
    MAX_LABEL_NAME_CHARS,
    MAX_LABELS,
    LabelName,
    has_unstorable_char,
    is_label_value,
)

#: Bytes read from an upload per step: bounded memory whatever the file's size.
CHUNK_BYTES: Final = 1024 * 1024

_labels_adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(
    Annotated[dict[LabelName, Any], Field(max_length=MAX_LABELS)]
)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The whole file, read in chunks; a 413 problem as soon as it passes ``limit`` bytes."""
    if upload.size is not None and upload.size > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(CHUNK_BYTES):
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a body passes the limit.

    An ``HTTPException`` on purpose: FastAPI re-raises those from its body parsing (any
    other exception there becomes a generic 400), and the problem handlers turn it into a
    413 ``payload_too_large`` problem.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Limits request bodies to ``max_bytes``: by Content-Length before anything is read,
    and by counting the bytes as they arrive (chunked uploads declare no length).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            problem = to_problem(too_large(self.max_bytes), scope["path"])
            # The body is never read; the connection closes so the client stops sending.
            await problem_response(problem, {"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, "payload_too_large", f"the upload exceeds the limit of {limit} bytes")


def require_content_type(request: Request, *allowed: str) -> str:
    """The request's media type if it is one of ``allowed``; else a 415 problem."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in allowed:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"send the request as {' or '.join(allowed)}, not {media_type or 'no content type'}",
        )
    return media_type


def json_body(request: Request) -> None:
    """A route dependency for JSON bodies: any other media type, or none, is a 415.

    Without it, a JSON route reads a form post (``curl -d``'s default), ``text/plain`` or
    an untyped body as raw bytes and answers a 422 about the body's fields, which hides
    the real mistake.
    """
    require_content_type(request, "application/json")


async def read_json_body(request: Request) -> Any:
    """The request's JSON body, or a 422 ``validation_error`` for one that does not parse.

    The caller has checked the content type (``require_content_type``); nesting deeper
    than the parser's recursion allows is a malformed body too, not a server error.
    """
    try:
        return await request.json()
    except (ValueError, RecursionError) as exc:
        raise json_invalid() from exc


def field_problem(loc: list[str | int], msg: str, kind: str) -> ProblemError:
    """A 422 ``validation_error`` problem for one form field."""
    return ProblemError(
        422,
        "validation_error",
        "1 field error(s) in the request",
        title="Request validation failed",
        errors=[ProblemFieldError(loc=loc, msg=msg, type=kind)],
    )


def parse_labels(raw: str, loc: list[str | int]) -> dict[str, float | None]:
    """A labels form field: a JSON object of up to 64 names (1 to 64 characters each) → the
    numbers 1, 0, -1 or null. ``true`` and ``"1"`` are refused, not read as 1.
    """
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise field_problem(loc, "labels must be valid JSON", "json_invalid") from exc
    if has_unstorable_char(parsed):
        raise field_problem(
            loc, "labels hold a NUL character or a lone UTF-16 surrogate", "string_unicode"
        )
    message = (
        f"labels must be a JSON object of at most {MAX_LABELS} names of 1 to "
        f"{MAX_LABEL_NAME_CHARS} characters, each → the number 1, 0 or -1, or null"
    )
    try:
        labels = _labels_adapter.validate_python(parsed)
    except ValidationError as exc:
        raise field_problem(loc, message, "value_error") from exc
    if not all(is_label_value(value) for value in labels.values()):
        raise field_problem(loc, message, "value_error")
    return {name: None if value is None else float(value) for name, value in labels.items()}


def parse_json_field(raw: str, loc: list[str | int]) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the parser's recursion allows.
        raise field_problem(loc, "not valid JSON", "json_invalid") from exc


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` references inlined (for openapi_extra)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def image_or_json_openapi(
    json_model: type[BaseModel], form_fields: dict[str, Any]
) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes either JSON (``json_model``) or a multipart
    form with an image ``file`` and the text ``form_fields`` (name → JSON schema)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_refs(json_model.model_json_schema())},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "A DICOM, PNG or JPEG image (not stored).",
                            },
                            **form_fields,
                        },
                    }
                },
            },
        }
    }


def validate_part(model: type[BaseModel], data: Any, loc_prefix: tuple[str, ...]) -> Any:
    """``model`` validated from ``data``; errors located under ``loc_prefix`` (a 422)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**err, "loc": (*loc_prefix, *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from exc


class InvalidTextEncodingError(HTTPException):
    """A text form field that is not valid UTF-8, or holds NUL: 422 ``invalid_text_encoding``.

    An ``HTTPException`` because FastAPI turns any other exception raised while it parses
    a form into a plain 400; ``code`` is read by the problem handler.
    """

    code = "invalid_text_encoding"

    def __init__(self, field: str, why: str = "is not valid UTF-8 text") -> None:
        super().__init__(422, f"form field {field!r} {why}; send text encoded as UTF-8")


class _StrictTextParser(MultiPartParser):
    """Starlette's multipart parser, but a text field that is not valid UTF-8 is refused.

    Starlette decodes such a field as Latin-1 instead, so a report in another encoding
    would be stored as mojibake that no one can tell from real text later. NUL is refused
    too: PostgreSQL cannot store it in text.
    """

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                text = bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise InvalidTextEncodingError(part.field_name) from None
            if "\x00" in text:
                raise InvalidTextEncodingError(part.field_name, "holds a NUL character")
        super().on_part_end()


class StrictTextRequest(Request):
    """A request whose multipart form refuses text fields that are not valid UTF-8."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        # Starlette keeps the parsed form in _form; filling it first makes its own parsing
        # (and cleanup) use this parser's result.
        if self._form is None and content_type == "multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _StrictTextParser(
                        self.headers,
                        stream,
                        max_files=max_files,
                        max_fields=max_fields,
                        max_part_size=max_part_size,
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(400, detail=exc.message) from exc
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class StrictTextRoute(APIRoute):
    """Routes whose handlers see a :class:`StrictTextRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictTextRequest(request.scope, request.receive))

        return strict_handler
