"""SQLAlchemy models: the service's tables, the source of truth the vector index follows.

Tables:

- ``images``: one row per distinct uploaded image (``content_hash`` = sha256 of the
  uploaded bytes, so the same bytes uploaded again find their row). Pixels live in files
  under the data directory, as a de-identified normalised grayscale PNG and a thumbnail;
  the paths stored are relative to ``Settings.data_dir``. Naming the files after the
  content hash lets them be written before the row exists.
- ``models``: encoder bundles the service has used, keyed by the bundle's model id.
- ``embeddings``: one vector per (image, model), so that a new model can be rolled out
  beside the old one; deleted with their image.
- ``evaluation_runs``: background evaluation runs and their results.
- ``dicomweb_cursors`` and ``dicomweb_series``: how far ``convirt follow-dicomweb`` has
  read each DICOMweb server (an Orthanc change sequence, or the series already fetched),
  so that a restart resumes where it stopped.
- ``embedding_cache``: vectors of the evaluation's images keyed by (model id, image
  content hash); these images need not be stored in ``images``.
- ``changes``: the change feed. One row per embedding added or removed, and one per
  switch of the active model, written in the same transaction as the change itself; its
  ``seq`` orders them. Every process's index follows it (:mod:`app.services.feed`).
- ``feed_floor``: one row, how far the feed's oldest records have been pruned.

No column holds a patient identifier (name, patient id, birth date, accession number):
``study_ref`` is an opaque reference chosen by the uploading system and must not be one of
those. ``study_instance_uid`` is the DICOM StudyInstanceUID that the PACS connectors
(``convirt dicom-node``, ``convirt follow-dicomweb``) record so a hit links back to its
study in the PACS viewer: a random technical UID, not a patient identifier. Vectors are
stored as raw little-endian float32 bytes with their dimension, checked by the database
(``length(vector) = 4 * dim``).

The schema is created by the Alembic migrations in ``migrations/``, which must match these
models exactly (a test runs autogenerate against a migrated database and expects nothing).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from app.errors import AppError

#: Length of ``sha256:<64 hex digits>``, the form of bundle model ids.
MODEL_ID_CHARS: Final = 71
#: Length of a hex sha256 digest.
CONTENT_HASH_CHARS: Final = 64
#: Relative paths of stored files.
PATH_CHARS: Final = 512
#: Free-form metadata (a file's own or the caller's) is clipped to these column widths.
VIEW_POSITION_CHARS: Final = 16
MODALITY_CHARS: Final = 16
STUDY_REF_CHARS: Final = 128
#: Names of the processes that run evaluation jobs.
WORKER_CHARS: Final = 128
#: DICOM UIDs are at most 64 characters (PS3.5 9.1).
DICOM_UID_CHARS: Final = 64
#: A DICOMweb server's URL, as the follower's cursor key.
SOURCE_URL_CHARS: Final = 512

EVALUATION_STATUSES: Final[tuple[str, ...]] = ("queued", "running", "succeeded", "failed")
#: Kinds of change feed records: an embedding added, an image's embeddings removed, the
#: active model switched.
CHANGE_OPS: Final[tuple[str, ...]] = ("add", "remove", "switch")

# Deterministic constraint names: Alembic needs them to drop or alter constraints, and
# SQLite's batch mode rebuilds tables by name.
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid); BIGINT would not.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL (compact, indexable); JSON text elsewhere.
# none_as_null: a Python None is SQL NULL, not the JSON text 'null'.
PortableJSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class NaiveDatetimeError(AppError, ValueError):
    """A datetime without a timezone was about to be stored."""

    code = "naive_datetime"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware timestamp, stored and returned in UTC on every backend.

    SQLite keeps no offset, so values read back from it would be naive; they are read as
    UTC, which is what was written.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise NaiveDatetimeError(f"refusing to store naive datetime {value.isoformat()}")
        utc = value.astimezone(dt.UTC)
        # SQLite compares timestamps as text: keep one format, without the offset.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    @property
    def python_type(self) -> type[dt.datetime]:
        return dt.datetime


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: PortableJSON,
    }


class InvalidVectorError(AppError, ValueError):
    """A vector is not a finite 1-D float array of the expected dimension."""

    code = "invalid_vector"


def vector_to_bytes(vector: npt.ArrayLike) -> tuple[bytes, int]:
    """Pack a vector of shape (dim,) as little-endian float32 bytes; returns (bytes, dim)."""
    array = np.asarray(vector, dtype="<f4")  # (dim,)
    if array.ndim != 1 or array.size == 0:
        raise InvalidVectorError(f"expected a non-empty 1-D vector, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InvalidVectorError("the vector holds NaN or infinite values")
    return array.tobytes(), int(array.size)


def bytes_to_vector(data: bytes, dim: int) -> npt.NDArray[np.float32]:
    """Unpack little-endian float32 bytes into a native float32 array of shape (dim,)."""
    if len(data) != 4 * dim:
        raise InvalidVectorError(f"{len(data)} bytes cannot hold {dim} float32 values")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)  # (dim,)


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )


class Image(TimestampMixin, Base):
    """A stored radiograph: its metadata and where its de-identified pixels are."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    content_hash: Mapped[str] = mapped_column(
        String(CONTENT_HASH_CHARS), unique=True, comment="sha256 hex of the uploaded bytes"
    )
    source_format: Mapped[str] = mapped_column(String(16), comment="dicom, png or jpeg")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bits: Mapped[int | None] = mapped_column(SmallInteger, comment="bits stored per pixel")
    photometric: Mapped[str | None] = mapped_column(String(32))
    view_position: Mapped[str | None] = mapped_column(String(VIEW_POSITION_CHARS), index=True)
    modality: Mapped[str | None] = mapped_column(String(MODALITY_CHARS))
    labels: Mapped[dict[str, Any]] = mapped_column(
        default=dict, comment="observation → 1 positive, 0 negative, -1 uncertain"
    )
    report_text: Mapped[str | None] = mapped_column(Text)
    study_ref: Mapped[str | None] = mapped_column(
        String(STUDY_REF_CHARS),
        index=True,
        comment="opaque external study reference, never an accession",
    )
    study_instance_uid: Mapped[str | None] = mapped_column(
        String(DICOM_UID_CHARS),
        index=True,
        comment="DICOM StudyInstanceUID from a PACS connector, for the viewer link",
    )
    image_path: Mapped[str] = mapped_column(String(PATH_CHARS))
    thumbnail_path: Mapped[str] = mapped_column(String(PATH_CHARS))
    original_path: Mapped[str | None] = mapped_column(String(PATH_CHARS))
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.current_timestamp()
    )

    embeddings: Mapped[list[Embedding]] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
        CheckConstraint("length(content_hash) = 64", name="content_hash_length"),
        # SQLite would otherwise hand the id of a deleted newest row to the next one.
        {"sqlite_autoincrement": True},
    )


class EncoderModel(TimestampMixin, Base):
    """An encoder bundle, identified by its model id (``sha256:…``)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(MODEL_ID_CHARS), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_active: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), comment="the bundle the service serves"
    )

    embeddings: Mapped[list[Embedding]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (CheckConstraint("dim > 0", name="positive_dim"),)


class Embedding(TimestampMixin, Base):
    """The vector of one image under one model: float32 little-endian, shape (dim,)."""

    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(
        String(MODEL_ID_CHARS),
        ForeignKey("models.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    )
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)

    image: Mapped[Image] = relationship(back_populates="embeddings")
    model: Mapped[EncoderModel] = relationship(back_populates="embeddings")

    __table_args__ = (CheckConstraint("length(vector) = 4 * dim", name="vector_length"),)

    @classmethod
    def from_vector(cls, image_id: int, model_id: str, vector: npt.ArrayLike) -> Embedding:
        """Build the row for a vector of shape (dim,)."""
        data, dim = vector_to_bytes(vector)
        return cls(image_id=image_id, model_id=model_id, dim=dim, vector=data)

    def as_array(self) -> npt.NDArray[np.float32]:
        """The vector, shape (dim,)."""
        return bytes_to_vector(self.vector, self.dim)


class EvaluationRun(Base):
    """One evaluation of a model under a protocol, run in the background.

    A job queue: a worker claims a ``queued`` run (``worker``, ``lease_expires_at``,
    ``attempts`` + 1), renews the lease while it runs, and records the outcome; a run
    whose lease expired is queued again once, then failed (:mod:`app.services.jobs`).

    ``model_id`` is not a foreign key: a run's record outlives the model row.
    """

    __tablename__ = "evaluation_runs"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(MODEL_ID_CHARS), index=True)
    protocol: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    results: Mapped[dict[str, Any] | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp(), index=True
    )
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    worker: Mapped[str | None] = mapped_column(
        String(WORKER_CHARS), comment="the process running it (host:pid:thread)"
    )
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(
        comment="a running run whose lease passed lost its worker"
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in EVALUATION_STATUSES) + ")",
            name="known_status",
        ),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        {"sqlite_autoincrement": True},
    )


class CachedEmbedding(TimestampMixin, Base):
    """An evaluation image's vector, keyed by (model id, content hash); shape (dim,)."""

    __tablename__ = "embedding_cache"

    model_id: Mapped[str] = mapped_column(String(MODEL_ID_CHARS), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(CONTENT_HASH_CHARS), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (CheckConstraint("length(vector) = 4 * dim", name="vector_length"),)

    @classmethod
    def from_vector(
        cls, model_id: str, content_hash: str, vector: npt.ArrayLike
    ) -> CachedEmbedding:
        """Build the row for a vector of shape (dim,)."""
        data, dim = vector_to_bytes(vector)
        return cls(model_id=model_id, content_hash=content_hash, dim=dim, vector=data)

    def as_array(self) -> npt.NDArray[np.float32]:
        """The vector, shape (dim,)."""
        return bytes_to_vector(self.vector, self.dim)


class Change(Base):
    """One record of the change feed, ordered by ``seq``.

    ``add``: the embedding of ``image_id`` under ``model_id`` was stored. ``remove``: the
    image ``image_id`` was deleted with all its embeddings (``model_id`` is NULL).
    ``switch``: ``model_id`` became the active model (``image_id`` is NULL). A record holds
    no vector: a follower reads the current embedding, so replaying a record twice, or
    one whose image was deleted since, is harmless.

    ``seq`` never goes back, not even after the newest rows are deleted (AUTOINCREMENT on
    SQLite, a sequence on PostgreSQL); writers take a lock so that rows commit in ``seq``
    order (:func:`app.services.feed.record`).
    """

    __tablename__ = "changes"

    seq: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(8))
    model_id: Mapped[str | None] = mapped_column(String(MODEL_ID_CHARS))
    image_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )

    __table_args__ = (
        CheckConstraint("op IN (" + ", ".join(f"'{s}'" for s in CHANGE_OPS) + ")", name="known_op"),
        {"sqlite_autoincrement": True},
    )


class FeedFloor(Base):
    """How far the change feed has been pruned: records up to ``seq`` may be gone.

    One row (``id`` 1), written by :func:`app.services.feed.prune` in the transaction
    that deletes the records. An index whose feed position is below ``seq`` cannot
    replay what it missed and is rebuilt from the stored embeddings instead.
    """

    __tablename__ = "feed_floor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, comment="records up to this seq may be deleted")

    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)


class DicomwebCursor(Base):
    """How far ``convirt follow-dicomweb`` has read one server's Orthanc change feed."""

    __tablename__ = "dicomweb_cursors"

    source: Mapped[str] = mapped_column(
        String(SOURCE_URL_CHARS), primary_key=True, comment="DICOMweb URL, no credentials"
    )
    last_change: Mapped[int] = mapped_column(
        BigInteger, default=0, comment="last Orthanc /changes sequence number handled"
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.current_timestamp()
    )


class DicomwebSeries(TimestampMixin, Base):
    """A series that ``convirt follow-dicomweb`` has fetched from a server (QIDO-RS mode)."""

    __tablename__ = "dicomweb_series"

    source: Mapped[str] = mapped_column(String(SOURCE_URL_CHARS), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(DICOM_UID_CHARS), primary_key=True)
    instances: Mapped[int] = mapped_column(Integer, comment="instances fetched")
