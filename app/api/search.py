"""``/search``: ranked images for a text query or an example image."""

from __future__ import annotations

import time
import unicodedata
from typing import Any, Final

import anyio
import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from app.api.deps import RuntimeDep, SettingsDep
from app.api.images import thumbnail_url
from app.api.problems import problem_responses
from app.api.uploads import (
    field_problem,
    image_or_json_openapi,
    inline_refs,
    json_body,
    parse_json_field,
    read_json_body,
    read_upload,
    require_content_type,
    validate_part,
)
from app.errors import ProblemError
from app.schemas import (
    ImageSearchCreate,
    SearchFilters,
    SearchHit,
    SearchPublic,
    TextSearchCreate,
)
from app.security import require_api_key
from app.services.retrieval import Filters, Hit
from app.services.runtime import Runtime
from app.settings import Settings
from index import MAX_K

router = APIRouter(prefix="/search", tags=["search"], dependencies=[Depends(require_api_key)])

_JSON: Final = "application/json"
_MULTIPART: Final = "multipart/form-data"


def visible_text(query: str) -> str:
    """``query`` without surrounding white space and without invisible format characters.

    Zero-width spaces, joiners, byte-order marks and direction marks (Unicode category Cf)
    carry no meaning for the text encoder; a query made only of them is empty.
    """
    return "".join(ch for ch in query if unicodedata.category(ch) != "Cf").strip()


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
    responses=problem_responses(401, 413, 415, 422, 503),
    dependencies=[Depends(json_body)],
)
async def search_text(
    body: TextSearchCreate,
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> SearchPublic:
    """Up to ``k`` images ranked by similarity to the query, best first.

    With ``filters``, every hit satisfies them (fewer than ``k`` when fewer images do).
    Errors: ``empty_query``, ``query_too_long``, ``invalid_k`` (all 422);
    ``unsupported_media_type`` (415) for a body not sent as ``application/json``.
    """
    start = time.perf_counter()
    if len(body.query) > settings.max_query_chars:
        raise ProblemError(
            422,
            "query_too_long",
            f"the query has {len(body.query)} characters; at most {settings.max_query_chars}",
        )
    query = visible_text(body.query)
    if not query:
        raise ProblemError(422, "empty_query", "the query is empty or only invisible characters")
    k = _check_k(body.k, settings)
    filters = _filters(body.filters)

    def encode_and_search() -> list[Hit]:
        return runtime.retrieval.search(_encode_text(runtime, query), k, filters=filters)

    hits = await runtime.infer(encode_and_search)
    return _response(request, runtime, k, hits, start)


def _image_search_openapi() -> dict[str, Any]:
    filters_schema = inline_refs(SearchFilters.model_json_schema())
    return image_or_json_openapi(
        ImageSearchCreate,
        {
            "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": MAX_K},
            "filters": {**filters_schema, "description": "SearchFilters as a JSON string."},
        },
    )


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
    payload = await read_json_body(request)
    body: ImageSearchCreate = validate_part(ImageSearchCreate, payload, ("body",))
    k = _check_k(body.k, settings)
    filters = _filters(body.filters)
    # A stored image needs no inference: its vector is read, the search needs no model.
    stored = await stored_query_vector(runtime, body.image_id)
    hits = await anyio.to_thread.run_sync(
        lambda: runtime.retrieval.search(stored, k, filters=filters, exclude_id=body.image_id)
    )
    return k, hits


async def stored_query_vector(runtime: Runtime, image_id: int) -> npt.NDArray[np.float32]:
    """The current model's vector of a stored image: 404 ``image_not_found`` when there is
    no such image, 409 ``image_not_embedded`` when it has no vector under this model yet."""
    stored = await anyio.to_thread.run_sync(runtime.retrieval.stored_vector, image_id)
    if stored is None:
        exists = await anyio.to_thread.run_sync(runtime.retrieval.image_exists, image_id)
        if not exists:
            raise ProblemError(404, "image_not_found", f"no image with id {image_id}")
        raise ProblemError(
            409,
            "image_not_embedded",
            f"image {image_id} has no vector under the current model yet",
        )
    return stored


def embed_upload(runtime: Runtime, data: bytes) -> npt.NDArray[np.float32]:
    """Decode and embed an uploaded image without storing it, within the decoded-pixel budget.

    Typed decode errors, 503 ``busy`` past the budget's wait; returns (D,).
    """
    return runtime.ingest.embed_query(data)


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
            filters = _filters(validate_part(SearchFilters, parsed, ("body", "filters")))
        data = await read_upload(upload, settings.max_upload_bytes)

    def embed_and_search() -> list[Hit]:
        return runtime.retrieval.search(embed_upload(runtime, data), k, filters=filters)

    return k, await runtime.infer_image(embed_and_search)
