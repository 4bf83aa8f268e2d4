"""``/images``: upload (ingest), read, thumbnail, delete."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Final

import anyio
from fastapi import APIRouter, Depends, File, Form, Path, Request, Response, UploadFile
from fastapi.responses import FileResponse

from app.api.deps import RuntimeDep, SessionDep, SettingsDep
from app.api.problems import MODEL_ERROR_STATUS, problem_responses, to_problem
from app.api.uploads import (
    StrictTextRoute,
    field_problem,
    parse_labels,
    read_upload,
    require_content_type,
)
from app.errors import ProblemError
from app.models import STUDY_REF_CHARS, VIEW_POSITION_CHARS, Image
from app.schemas import ImagePublic, ImageRecord, UploadResponse, UploadResult
from app.security import require_api_key
from app.services.ingest import IngestItem, IngestResult

logger = logging.getLogger(__name__)

#: Most files one upload may carry; bigger batches go through ``convirt ingest``.
MAX_FILES_PER_UPLOAD: Final = 64
#: Longest report text accepted with an upload.
MAX_REPORT_CHARS: Final = 100_000

# StrictTextRoute: a report (or other text field) that is not UTF-8 is refused, not stored.
router = APIRouter(
    prefix="/images",
    tags=["images"],
    dependencies=[Depends(require_api_key)],
    route_class=StrictTextRoute,
)

ImageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Image id.")]
UploadFiles = Annotated[
    list[UploadFile],
    File(
        description="One or more DICOM, PNG or JPEG files (field name ``files``).",
        # Documented here, checked in the route (a 422 naming the field).
        json_schema_extra={"minItems": 1, "maxItems": MAX_FILES_PER_UPLOAD},
    ),
]


def thumbnail_url(request: Request, image_id: int) -> str:
    """Path of an image's thumbnail, relative to the host (works behind a path prefix)."""
    path = request.app.url_path_for("get_thumbnail", image_id=str(image_id))
    return str(request.scope.get("root_path", "")) + str(path)


def _require_multipart(request: Request) -> None:
    require_content_type(request, "multipart/form-data")


def _per_file(values: list[str] | None, n_files: int, name: str) -> list[str | None]:
    """A form field given once (applies to every file) or once per file, in file order."""
    if not values:
        return [None] * n_files
    if len(values) == 1:
        return [values[0]] * n_files
    if len(values) == n_files:
        return list(values)
    raise field_problem(
        ["body", name],
        f"give {name} once for all files or once per file ({n_files}), not {len(values)} times",
        "value_error",
    )


def _result(index: int, result: IngestResult) -> UploadResult:
    if result.status != "failed":
        return UploadResult(
            index=index, status=result.status, id=result.image_id, content_hash=result.content_hash
        )
    assert result.error is not None
    status = MODEL_ERROR_STATUS.get(result.error.code, 422)
    problem = to_problem(ProblemError(status, result.error.code, result.error.message))
    return UploadResult(
        index=index, status="failed", content_hash=result.content_hash, problem=problem
    )


def _all_failed(results: list[UploadResult]) -> ProblemError:
    problems = [r.problem for r in results if r.problem is not None]
    codes = {p.code for p in problems}
    if len(problems) == 1 or len(codes) == 1:
        first = problems[0]
        detail = (
            first.detail if len(problems) == 1 else f"all {len(problems)} files: {first.detail}"
        )
        return ProblemError(first.status, first.code, detail)
    listing = "; ".join(f"file {r.index}: {r.problem.code}" for r in results if r.problem)
    return ProblemError(422, "upload_failed", f"no file could be ingested ({listing})")


@router.post(
    "",
    status_code=201,
    response_model=UploadResponse,
    dependencies=[Depends(_require_multipart)],
    summary="Upload one or more DICOM/PNG/JPEG images",
    response_description=(
        "At least one file was stored or found already stored. ``results`` has one entry "
        "per file, in order: ``created``, ``existing`` (the same bytes were uploaded "
        "before; its id is returned, nothing is duplicated) or ``failed`` with the problem."
    ),
    responses=problem_responses(401, 413, 415, 422, 503, 507),
)
async def upload_images(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    files: UploadFiles,
    report_text: Annotated[
        list[str] | None,
        Form(description="Report text: once for all files, or once per file in file order."),
    ] = None,
    labels: Annotated[
        list[str] | None,
        Form(
            description='Labels as a JSON object, e.g. {"Cardiomegaly": 1}: once for all '
            "files, or once per file."
        ),
    ] = None,
    study_ref: Annotated[
        list[str] | None,
        Form(description="Your study reference (never a patient identifier or accession)."),
    ] = None,
    view_position: Annotated[
        list[str] | None,
        Form(
            description="View (PA, AP, LATERAL…) for files that do not carry one (PNG/JPEG); "
            "a DICOM's own ViewPosition wins."
        ),
    ] = None,
) -> UploadResponse:
    """Decode, embed, store and index each file; the same bytes return the existing id.

    One bad file does not sink the others: the response is **201** when at least one file
    was created or already stored, with each file's outcome in ``results``. When every
    file failed the response is that failure as a problem (415 for a file that is not an
    image of a supported kind, 422 for a corrupt or unusable one), or ``upload_failed``
    (422) when the files failed differently. A body over the upload limit is **413**.
    """
    n_files = len(files)
    if n_files > MAX_FILES_PER_UPLOAD:
        raise field_problem(
            ["body", "files"], f"at most {MAX_FILES_PER_UPLOAD} files per upload", "too_long"
        )
    reports = _per_file(report_text, n_files, "report_text")
    _check_lengths(
        reports,
        "report_text",
        MAX_REPORT_CHARS,
        f"report text is longer than {MAX_REPORT_CHARS} characters",
    )
    raw_labels = _per_file(labels, n_files, "labels")
    parsed_labels = [
        parse_labels(raw, ["body", "labels", i]) if raw else None
        for i, raw in enumerate(raw_labels)
    ]
    refs = _per_file(study_ref, n_files, "study_ref")
    _check_lengths(refs, "study_ref", STUDY_REF_CHARS, f"at most {STUDY_REF_CHARS} characters")
    views = _per_file(view_position, n_files, "view_position")
    _check_lengths(
        views, "view_position", VIEW_POSITION_CHARS, f"at most {VIEW_POSITION_CHARS} characters"
    )
    items = [
        IngestItem(
            data=await read_upload(upload, settings.max_upload_bytes),
            report_text=reports[i] or None,
            labels=parsed_labels[i],
            study_ref=refs[i] or None,
            view_position=views[i] or None,
        )
        for i, upload in enumerate(files)
    ]
    # Decoding and encoding are CPU-bound: off the event loop, on the inference threads.
    outcomes = await runtime.infer_image(runtime.ingest.ingest, items)
    results = [_result(i, outcome) for i, outcome in enumerate(outcomes)]
    counts = {s: sum(r.status == s for r in results) for s in ("created", "existing", "failed")}
    logger.info("upload of %d files: %s", n_files, counts)
    if counts["failed"] == n_files:
        raise _all_failed(results)
    return UploadResponse(results=results, **counts)


def _check_lengths(values: Sequence[str | None], field: str, limit: int, message: str) -> None:
    """422 ``string_too_long`` naming the first per-file ``field`` value over ``limit``."""
    for position, value in enumerate(values):
        if value is not None and len(value) > limit:
            raise field_problem(["body", field, position], message, "string_too_long")


@router.get(
    "/{image_id}",
    response_model=ImagePublic,
    summary="An image's metadata, labels and report",
    responses=problem_responses(401, 404, 503),
)
def get_image(
    image_id: ImageId, request: Request, session: SessionDep, settings: SettingsDep
) -> ImagePublic:
    row = session.get(Image, image_id)
    if row is None:
        raise _not_found(image_id)
    record = ImageRecord.model_validate(row)
    return ImagePublic(
        **dict(record),
        thumbnail_url=thumbnail_url(request, row.id),
        viewer_url=settings.viewer_url(record.study_instance_uid),
    )


@router.get(
    "/{image_id}/thumbnail",
    name="get_thumbnail",
    response_class=FileResponse,
    summary="An image's thumbnail (8-bit greyscale PNG)",
    responses={
        200: {"content": {"image/png": {}}, "description": "The thumbnail."},
        **problem_responses(401, 404, 503),
    },
)
def get_thumbnail(image_id: ImageId, runtime: RuntimeDep, session: SessionDep) -> FileResponse:
    row = session.get(Image, image_id)
    if row is None:
        raise _not_found(image_id)
    path = runtime.store.path(row.thumbnail_path)
    if not path.is_file():
        raise ProblemError(404, "thumbnail_not_found", f"image {image_id} has no thumbnail file")
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.delete(
    "/{image_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an image from the database, the index and the files",
    responses=problem_responses(401, 404, 503),
)
async def delete_image(image_id: ImageId, runtime: RuntimeDep) -> Response:
    deleted = await anyio.to_thread.run_sync(runtime.delete_image, image_id)
    if not deleted:
        raise _not_found(image_id)
    return Response(status_code=204)


def _not_found(image_id: int) -> ProblemError:
    return ProblemError(404, "image_not_found", f"no image with id {image_id}")
