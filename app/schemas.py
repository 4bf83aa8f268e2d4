"""Request and response bodies of the API (pydantic): ``*Create`` in, ``*Public`` out.

No schema carries a patient identifier: what goes out is the image's technical metadata,
its labels, its report text and the caller's own study reference.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.api.problems import Problem

LabelValue = float | None
Labels = dict[str, LabelValue]


class ImageCreate(BaseModel):
    """What an upload may say about its images besides the files (the multipart fields)."""

    model_config = ConfigDict(extra="forbid")

    report_text: str | None = Field(default=None, description="Free-text radiology report.")
    labels: Labels | None = Field(
        default=None,
        description="Observation name → 1 (positive), 0 (negative), -1 (uncertain) or null.",
        examples=[{"Cardiomegaly": 1, "Pleural Effusion": 0}],
    )
    study_ref: str | None = Field(
        default=None,
        max_length=256,
        description="The caller's own study reference. Do not put patient identifiers here.",
    )


class ImagePublic(BaseModel):
    """One stored image: technical metadata, labels and report; never patient identifiers."""

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
    thumbnail_url: str
    created_at: datetime
    updated_at: datetime


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
    thumbnail_url: str


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
    feed_sequence: int = Field(description="change feed position the index is complete up to")
    feed_lag_changes: int = Field(description="committed changes not yet applied to the index")
    feed_lag_seconds: float = Field(description="seconds since the index last caught up")
