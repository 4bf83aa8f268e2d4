"""Request and response bodies of the API (pydantic): ``*Create`` in, ``*Public`` out.

No schema carries a patient identifier: what goes out is the image's technical metadata,
its labels, its report text, the caller's own study reference and the DICOM
StudyInstanceUID a PACS connector recorded (a technical UID, not a patient identifier).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.api.problems import Problem
from index import MAX_K

#: Longest label (observation) name; CheXpert's longest is 26 characters.
MAX_LABEL_NAME_CHARS: Final = 64
#: Most labels one image, or one label filter, may carry.
MAX_LABELS: Final = 64
#: Largest id of an image or a run: ids are signed 64-bit integers in the database.
MAX_ID: Final = 2**63 - 1

LabelValue = float | None
Labels = dict[str, LabelValue]
LabelName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_LABEL_NAME_CHARS, strict=True)
]


def is_label_value(value: Any) -> bool:
    """Whether a client's label value is the JSON number 1, 0 or -1, or null.

    ``true`` and ``"1"`` are not: pydantic's lax mode would read both as 1.0.
    """
    if value is None:
        return True
    return type(value) in (int, float) and value in (1, 0, -1)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included; iterative, so depth cannot overflow."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def has_unstorable_char(value: Any) -> bool:
    """Whether any string in ``value`` holds NUL or a UTF-16 surrogate (``"\\ud800"``).

    JSON may spell both as escapes, but PostgreSQL text and JSON refuse NUL, and no UTF-8
    text, tokenizer or database can hold a lone surrogate.
    """
    return any(
        "\x00" in text or any("\ud800" <= ch <= "\udfff" for ch in text)
        for text in _strings(value)
        if not text.isprintable()
    )


class RequestModel(BaseModel):
    """Base of the JSON request bodies: no unknown fields, no NUL or lone surrogate in text."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        if has_unstorable_char(data):
            raise ValueError("text holds a NUL character or a lone UTF-16 surrogate")
        return data


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


class SearchFilters(RequestModel):
    """Restrict hits to images whose metadata match every given condition."""

    view_position: list[Annotated[str, StringConstraints(min_length=1, max_length=32)]] | None = (
        Field(
            default=None,
            min_length=1,
            description="Keep images whose view position is one of these (e.g. PA, AP).",
            examples=[["PA", "AP"]],
        )
    )
    labels: dict[LabelName, float] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LABELS,
        description="Keep images whose label equals the value for every name given.",
        examples=[{"Cardiomegaly": 1}],
    )


class TextSearchCreate(RequestModel):
    """``POST /search/text``: a free-text query."""

    query: str = Field(description="Free text, e.g. 'blunting of the costophrenic angles'.")
    k: int = Field(
        default=10,
        # Documented, not validated here: the route checks it against k_max (invalid_k).
        json_schema_extra={"minimum": 1, "maximum": MAX_K},
        description="Number of hits wanted, 1 to the service's k_max.",
    )
    filters: SearchFilters | None = None


class ImageSearchCreate(RequestModel):
    """``POST /search/image`` as JSON: search with an image already stored."""

    image_id: int = Field(
        ge=1, le=MAX_ID, description="Id of a stored image; it is left out of its own hits."
    )
    k: int = Field(
        default=10,
        # Documented, not validated here: the route checks it against k_max (invalid_k).
        json_schema_extra={"minimum": 1, "maximum": MAX_K},
        description="Number of hits wanted, 1 to the service's k_max.",
    )
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


class ServingModelPublic(BaseModel):
    """The model that answers searches: who it is, where it comes from, what it learned on."""

    name: str
    model_id: str
    dim: int = Field(description="Size of its embedding space (512 for ConVIRT).")
    origin: Literal["trained", "imported"] = Field(
        description="Trained by this project's trainer, or a published model imported."
    )
    source: str | None = Field(description="What it was imported or fine-tuned from, if so.")
    training_data: str = Field(description="What it was trained on, as the bundle records it.")
    synthetic_data: bool = Field(description="Trained on generated images (the demo model).")
    warning: str | None = Field(description="A plain warning to show with its results, if any.")


class ReadyPublic(BaseModel):
    status: Literal["ready"]
    model_id: str
    images: int
    index_vectors: int
    notes: list[str] = Field(
        default_factory=list,
        description="conditions that do not stop serving, e.g. an index not yet saved to disk",
    )
    model: ServingModelPublic
    feed_sequence: int = Field(description="change feed position the index is complete up to")
    feed_lag_changes: int = Field(description="committed changes not yet applied to the index")
    feed_lag_seconds: float = Field(description="seconds since the index last caught up")
