"""Request and response bodies of the API (pydantic): ``*Create`` in, ``*Public`` out.

No schema carries a patient identifier: what goes out is the image's technical metadata,
its labels, its report text, the caller's own study reference and the DICOM
StudyInstanceUID a PACS connector recorded (a technical UID, not a patient identifier).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.api.problems import Problem

LabelValue = float | None
Labels = dict[str, LabelValue]


class ImageRecord(BaseModel):
    """What the database holds about an image that may leave the service: technical
    metadata, labels and report; never patient identifiers, never file paths.

    Read straight off an :class:`app.models.Image` row (``model_validate(row)``), so the
    fields are listed here once; the response adds what the row cannot know.
    """

    model_config = ConfigDict(from_attributes=True)

    id: int
    content_hash: str = Field(description="sha256 of the uploaded bytes, hex.")
    source_format: str = Field(description="dicom, png or jpeg.")
    width: int
    height: int
    bits: int | None
    photometric: str | None
    view_position: str | None
    modality: str | None
    labels: Labels | None
    report_text: str | None
    study_ref: str | None
    study_instance_uid: str | None = Field(
        description="DICOM StudyInstanceUID, for images that came from a PACS connector."
    )
    created_at: datetime
    updated_at: datetime


class ImagePublic(ImageRecord):
    """One stored image, as ``GET /images/{id}`` returns it."""

    thumbnail_url: str
    viewer_url: str | None = Field(
        description="The study in the PACS viewer, when a viewer URL template is set."
    )


class UploadResult(BaseModel):
    """The outcome for one uploaded file, in the order the files were sent."""

    index: int = Field(description="Position of the file in the upload, from 0.")
    status: Literal["created", "existing", "failed"]
    id: int | None = Field(default=None, description="Image id (created or existing).")
    content_hash: str | None = None
    problem: Problem | None = Field(default=None, description="Why the file failed.")


class UploadResponse(BaseModel):
    """Body of ``201 Created`` for ``POST /images``: one result per file."""

    results: list[UploadResult]
    created: int
    existing: int
    failed: int


class SearchFilters(BaseModel):
    """Restrict hits to images whose metadata match every given condition."""

    model_config = ConfigDict(extra="forbid")

    view_position: list[Annotated[str, StringConstraints(min_length=1, max_length=32)]] | None = (
        Field(
            default=None,
            min_length=1,
            description="Keep images whose view position is one of these (e.g. PA, AP).",
            examples=[["PA", "AP"]],
        )
    )
    labels: dict[str, float] | None = Field(
        default=None,
        min_length=1,
        description="Keep images whose label equals the value for every name given.",
        examples=[{"Cardiomegaly": 1}],
    )


class TextSearchCreate(BaseModel):
    """``POST /search/text``: a free-text query."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="Free text, e.g. 'blunting of the costophrenic angles'.")
    k: int = Field(default=10, description="Number of hits wanted, 1 to the service's k_max.")
    filters: SearchFilters | None = None


class ImageSearchCreate(BaseModel):
    """``POST /search/image`` as JSON: search with an image already stored."""

    model_config = ConfigDict(extra="forbid")

    image_id: int = Field(description="Id of a stored image; it is left out of its own hits.")
    k: int = Field(default=10, description="Number of hits wanted, 1 to the service's k_max.")
    filters: SearchFilters | None = None


class SearchHit(BaseModel):
    image_id: int
    score: float = Field(description="Cosine similarity in the shared space (higher is closer).")
    rank: int = Field(description="1 for the best hit.")
    view_position: str | None
    labels: Labels | None
    study_ref: str | None
    study_instance_uid: str | None
    thumbnail_url: str
    viewer_url: str | None = Field(
        description="The study in the PACS viewer, when a viewer URL template is set."
    )


class SearchPublic(BaseModel):
    """Ranked hits, best first; fewer than k when fewer images satisfy the filters."""

    model_id: str
    took_ms: float = Field(description="Server-side time of the search, milliseconds.")
    k: int
    hits: list[SearchHit]


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    status: Literal["ready"]
    model_id: str
    images: int
    index_vectors: int
