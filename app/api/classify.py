"""``/classify``: zero-shot findings of an image by prompt ensembles, with a k-NN vote.

The image comes as for ``/search/image``: ``multipart/form-data`` with a ``file`` (decoded
and embedded, never stored) or ``application/json`` ``{"image_id": N}`` for a stored
image (its stored vector; it does not vote on itself). Either may name a shipped
``prompt_set`` (default ``chexpert-14``); ``GET /classify/prompt-sets`` lists them.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from app.api.deps import RuntimeDep, SettingsDep
from app.api.problems import problem_responses
from app.api.search import embed_upload, stored_query_vector
from app.api.uploads import (
    field_problem,
    image_or_json_openapi,
    read_json_body,
    read_upload,
    require_content_type,
    validate_part,
)
from app.schemas import MAX_ID, RequestModel
from app.security import require_api_key
from app.services.classify import Classification
from app.services.runtime import Runtime
from app.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/classify", tags=["classify"], dependencies=[Depends(require_api_key)])

_JSON: Final = "application/json"
_MULTIPART: Final = "multipart/form-data"
PromptSetId = Annotated[str, Field(min_length=1, max_length=64)]


class ClassifyCreate(RequestModel):
    """``POST /classify`` as JSON: classify an image already stored."""

    image_id: int = Field(
        ge=1, le=MAX_ID, description="Id of a stored image; it does not vote on itself."
    )
    prompt_set: PromptSetId | None = Field(
        default=None, description="A shipped prompt set's id (default chexpert-14)."
    )


class PromptSetRef(BaseModel):
    id: str
    version: int


class NeighbourVote(BaseModel):
    positive_fraction: float | None = Field(
        description="Share of the voting neighbours labelled positive; null when none voted."
    )
    neighbours: int = Field(description="How many labelled neighbours voted on this finding.")


class FindingPublic(BaseModel):
    name: str
    probability: float = Field(description="Prompt-ensemble probability, 0 to 1.")
    knn: NeighbourVote


class ClassifyPublic(BaseModel):
    model_id: str
    prompt_set: PromptSetRef
    findings: list[FindingPublic]


class PromptSetPublic(BaseModel):
    id: str
    version: int
    description: str
    findings: list[str]


def _public(result: Classification) -> ClassifyPublic:
    return ClassifyPublic(
        model_id=result.model_id,
        prompt_set=PromptSetRef(id=result.prompt_set.id, version=result.prompt_set.version),
        findings=[
            FindingPublic(
                name=f.name,
                probability=f.probability,
                knn=NeighbourVote(positive_fraction=f.positive_fraction, neighbours=f.neighbours),
            )
            for f in result.findings
        ],
    )


def _classify_openapi() -> dict[str, Any]:
    return image_or_json_openapi(
        ClassifyCreate, {"prompt_set": {"type": "string", "maxLength": 64}}
    )


@router.get(
    "/prompt-sets",
    response_model=list[PromptSetPublic],
    summary="The prompt sets shipped with the service",
    responses=problem_responses(401, 503),
)
def list_prompt_sets(runtime: RuntimeDep) -> list[PromptSetPublic]:
    return [PromptSetPublic(**s.summary()) for s in runtime.classifier.prompt_sets()]


@router.post(
    "",
    response_model=ClassifyPublic,
    summary="Findings of an image by prompt ensembles, with a vote of labelled neighbours",
    openapi_extra=_classify_openapi(),
    responses=problem_responses(401, 404, 409, 413, 415, 422, 503),
)
async def classify_image(
    request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> ClassifyPublic:
    """Per finding of the prompt set, the probability from its positive and negative
    prompt ensembles (softmax of the two similarities over the model's temperature), and
    the vote of the nearest stored images that carry labels.

    Errors as for ``/search/image``: ``image_not_found`` (404), ``image_not_embedded``
    (409), image decode errors (415/422), ``unsupported_media_type`` (415); and
    ``unknown_prompt_set`` (422).
    """
    media_type = require_content_type(request, _JSON, _MULTIPART)
    if media_type == _JSON:
        return await _classify_by_id(request, runtime)
    return await _classify_upload(request, runtime, settings)


async def _classify_by_id(request: Request, runtime: Runtime) -> ClassifyPublic:
    payload = await read_json_body(request)
    body: ClassifyCreate = validate_part(ClassifyCreate, payload, ("body",))
    prompt_set = runtime.classifier.prompt_set(body.prompt_set)
    vector = await stored_query_vector(runtime, body.image_id)
    result = await runtime.infer(
        runtime.classifier.classify, vector, prompt_set, exclude_id=body.image_id
    )
    return _public(result)


async def _classify_upload(
    request: Request, runtime: Runtime, settings: Settings
) -> ClassifyPublic:
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise field_problem(["body", "file"], "a file field 'file' is required", "missing")
        raw_set = form.get("prompt_set")
        set_id = raw_set.strip() if isinstance(raw_set, str) and raw_set.strip() else None
        if set_id is not None and len(set_id) > 64:
            raise field_problem(
                ["body", "prompt_set"],
                "a prompt set id has at most 64 characters",
                "string_too_long",
            )
        # Before the upload is read or decoded: an unknown set costs nothing.
        prompt_set = runtime.classifier.prompt_set(set_id)
        data = await read_upload(upload, settings.max_upload_bytes)

    def embed_and_classify() -> Classification:
        return runtime.classifier.classify(embed_upload(runtime, data), prompt_set)

    return _public(await runtime.infer_image(embed_and_classify))
