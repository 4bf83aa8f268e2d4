"""``/search``: ranked images for a text query or an example image."""

from __future__ import annotations

import time
from typing import Any, Final

import anyio
import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.api.deps import RuntimeDep, SettingsDep
from app.api.images import thumbnail_url
from app.api.problems import problem_responses
from app.api.uploads import field_problem, parse_json_field, read_upload, require_content_type
from app.errors import ProblemError
from app.schemas import (
    ImageSearchCreate,
    SearchFilters,
    SearchHit,
    SearchPublic,
    TextSearchCreate,
)
from app.security import require_api_key
from app.services.ingest import IngestItem
from app.services.retrieval import Filters, Hit
from app.services.runtime import Runtime
from app.settings import Settings
from index import MAX_K

router = APIRouter(prefix="/search", tags=["search"], dependencies=[Depends(require_api_key)])

_JSON: Final = "application/json"
_MULTIPART: Final = "multipart/form-data"


def _check_k(k: int, settings: Settings) -> int:
    # The index answers at most MAX_K hits per query, whatever k_max says.
    limit = min(settings.k_max, MAX_K)
    if not 1 <= k <= limit:
        raise ProblemError(422, "invalid_k", f"k must be between 1 and {limit}, not {k}")
    return k


def _filters(model: SearchFilters | None) -> Filters | None:
    if model is None:
        return None
    views = tuple(model.view_position) if model.view_position else None
    return Filters(view_positions=views, labels=dict(model.labels) if model.labels else None)


def _response(
    request: Request, runtime: Runtime, k: int, hits: list[Hit], start: float
) -> SearchPublic:
    return SearchPublic(
        model_id=runtime.bundle.model_id,
        took_ms=round((time.perf_counter() - start) * 1000.0, 3),
        k=k,
        hits=[
            SearchHit(
                image_id=hit.image_id,
                score=hit.score,
                rank=rank,
                view_position=hit.view_position,
                labels=hit.labels,
                study_ref=hit.study_ref,
                study_instance_uid=hit.study_instance_uid,
                thumbnail_url=thumbnail_url(request, hit.image_id),
                viewer_url=runtime.settings.viewer_url(hit.study_instance_uid),
            )
            for rank, hit in enumerate(hits, start=1)
        ],
    )


def _encode_text(runtime: Runtime, query: str) -> npt.NDArray[np.float32]:
    with runtime.metrics.stage("encode"):
        return np.asarray(runtime.bundle.encode_texts([query]), dtype=np.float32)[0]  # (D,)


@router.post(
    "/text",
    response_model=SearchPublic,
    summary="Images closest to a free-text query",
    responses=problem_responses(401, 413, 422, 503),
)
async def search_text(
    body: TextSearchCreate,
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> SearchPublic:
    """Up to ``k`` images ranked by similarity to the query, best first.

    With ``filters``, every hit satisfies them (fewer than ``k`` when fewer images do).
    Errors: ``empty_query``, ``query_too_long``, ``invalid_k`` (all 422).
    """
    start = time.perf_counter()
    if len(body.query) > settings.max_query_chars:
        raise ProblemError(
            422,
            "query_too_long",
            f"the query has {len(body.query)} characters; at most {settings.max_query_chars}",
        )
    query = body.query.strip()
    if not query:
        raise ProblemError(422, "empty_query", "the query is empty")
    k = _check_k(body.k, settings)
    filters = _filters(body.filters)

    def encode_and_search() -> list[Hit]:
        return runtime.retrieval.search(_encode_text(runtime, query), k, filters=filters)

    hits = await runtime.infer(encode_and_search)
    return _response(request, runtime, k, hits, start)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
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


def _image_search_openapi() -> dict[str, Any]:
    filters_schema = _inline_refs(SearchFilters.model_json_schema())
    return {
        "requestBody": {
            "required": True,
            "content": {
                _JSON: {"schema": _inline_refs(ImageSearchCreate.model_json_schema())},
                _MULTIPART: {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "A DICOM, PNG or JPEG image (not stored).",
                            },
                            "k": {"type": "integer", "default": 10},
                            "filters": {
                                **filters_schema,
                                "description": "SearchFilters as a JSON string.",
                            },
                        },
                    }
                },
            },
        }
    }


def _validated(model: type[BaseModel], data: Any, loc_prefix: tuple[str, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**err, "loc": (*loc_prefix, *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from exc


@router.post(
    "/image",
    response_model=SearchPublic,
    summary="Images closest to an example image (uploaded, or stored by id)",
    openapi_extra=_image_search_openapi(),
    responses=problem_responses(401, 404, 409, 413, 415, 422, 503),
)
async def search_image(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> SearchPublic:
    """Up to ``k`` images ranked by similarity to an example image, best first.

    Send either ``multipart/form-data`` with a ``file`` (decoded and embedded, not stored),
    optional ``k`` and ``filters`` (JSON), or ``application/json`` ``{"image_id": N, "k":
    10}`` for a stored image, whose stored vector is used and which is left out of its own
    hits. Errors: ``image_not_found`` (404), ``image_not_embedded`` (409), image decode
    errors (415/422), ``invalid_k`` (422), ``unsupported_media_type`` (415).
    """
    start = time.perf_counter()
    media_type = require_content_type(request, _JSON, _MULTIPART)
    if media_type == _JSON:
        k, hits = await _search_by_id(request, runtime, settings)
    else:
        k, hits = await _search_by_upload(request, runtime, settings)
    return _response(request, runtime, k, hits, start)


async def _search_by_id(
    request: Request, runtime: Runtime, settings: Settings
) -> tuple[int, list[Hit]]:
    try:
        payload = await request.json()
    except ValueError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]
        ) from exc
    body: ImageSearchCreate = _validated(ImageSearchCreate, payload, ("body",))
    k = _check_k(body.k, settings)
    filters = _filters(body.filters)
    # A stored image needs no inference: its vector is read, the search needs no model.
    stored = await anyio.to_thread.run_sync(runtime.retrieval.stored_vector, body.image_id)
    if stored is None:
        exists = await anyio.to_thread.run_sync(runtime.retrieval.image_exists, body.image_id)
        if not exists:
            raise ProblemError(404, "image_not_found", f"no image with id {body.image_id}")
        raise ProblemError(
            409,
            "image_not_embedded",
            f"image {body.image_id} has no vector under the current model yet",
        )
    hits = await anyio.to_thread.run_sync(
        lambda: runtime.retrieval.search(stored, k, filters=filters, exclude_id=body.image_id)
    )
    return k, hits


async def _search_by_upload(
    request: Request, runtime: Runtime, settings: Settings
) -> tuple[int, list[Hit]]:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise field_problem(["body", "file"], "a file field 'file' is required", "missing")
        raw_k = form.get("k")
        raw_filters = form.get("filters")
        try:
            k = int(raw_k) if isinstance(raw_k, str) and raw_k.strip() else 10
        except ValueError as exc:
            raise field_problem(["body", "k"], "k must be an integer", "int_parsing") from exc
        k = _check_k(k, settings)
        filters = None
        if isinstance(raw_filters, str) and raw_filters.strip():
            parsed = parse_json_field(raw_filters, ["body", "filters"])
            filters = _filters(_validated(SearchFilters, parsed, ("body", "filters")))
        data = await read_upload(upload, settings.max_upload_bytes)

    def embed_and_search() -> list[Hit]:
        decoded = runtime.ingest.decode(IngestItem(data=data))
        vector = runtime.ingest.encode([decoded])[0]  # (D,)
        return runtime.retrieval.search(vector, k, filters=filters)

    return k, await runtime.infer(embed_and_search)
