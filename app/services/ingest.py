"""Ingest: uploaded bytes → decoded pixels → embedding → files, database rows, index.

The order is what keeps the three stores agreeing after any crash:

1. the de-identified PNG and thumbnail are written (named by content hash, atomically), so
   a committed row never points at a missing file; a crash here leaves at most an orphan
   file that the same upload overwrites later;
2. the image rows and their embeddings commit in **one** transaction, so a row never
   exists without its vector (the database is the source of truth), together with their
   change feed records, which every other process's index follows
   (:mod:`app.services.feed`);
3. the vectors go into the index; if that fails the rows stay and the index is marked for
   a rebuild from the database (:mod:`app.services.reconcile`), never the other way round.

Deduplication is by the sha256 of the uploaded bytes: the same bytes return the existing
id. Two uploads of the same bytes racing each other are settled by the unique constraint
on ``images.content_hash``.

The encoder sees the *stored* pixels (quantised to the PNG's 8 or 16 bits and back), not
the decoder's float array, so that ``convirt reindex`` re-embedding from the PNG later
reproduces the same vector.

Nothing here reads or keeps a DICOM's patient module: the decoder returns pixels and
technical metadata only, and the upload's file name is neither stored nor logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ProblemError
from app.models import (
    DICOM_UID_CHARS,
    MODALITY_CHARS,
    STUDY_REF_CHARS,
    VIEW_POSITION_CHARS,
    Embedding,
    EncoderModel,
    Image,
)
from app.services import feed
from app.services.budget import PixelBudget
from app.services.live_index import LiveIndex
from app.services.metrics import Metrics
from app.services.store import ImageStore, StoredFiles, dequantize, quantize
from model.bundle import EncoderBundle
from model.errors import ModelError
from model.inputs.decode import ImageMeta, ImageTooLargeError, decode_image, peek_size, sniff_format

logger = logging.getLogger(__name__)

Outcome = Literal["created", "existing", "failed"]

#: Most files decoded, embedded and stored together: a 64-file upload is processed in
#: steps of this many, so it never holds every decoded image at once.
INGEST_BATCH = 8
#: Seconds a client refused for a model switch is told to wait: the service loads the
#: new bundle within its maintenance round.
SWITCH_RETRY_AFTER_S = 10
#: The problem type of an upload refused for a model switch, and ``/ready``'s reason
#: while this process still serves the old model: one word for one state.
MODEL_SWITCHED = "model_switched"


class ModelSwitchedError(ProblemError):
    """This process embeds with a model that is no longer the active one.

    Its vectors would be of the old model: the images would be stored but missing from
    the active model's index. Nothing is stored; the client retries once the process has
    loaded the active model's bundle (``/ready`` says ``model_switched`` until then).
    """

    def __init__(self, model_id: str) -> None:
        super().__init__(
            503,
            MODEL_SWITCHED,
            f"model {model_id} is no longer the active model; nothing was stored. Retry "
            "once the service serves the active model (GET /ready)",
            headers={"Retry-After": str(SWITCH_RETRY_AFTER_S)},
        )


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[:limit] or None


def content_hash(data: bytes) -> str:
    """sha256 of the uploaded bytes, hex: the identity of an upload."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class IngestItem:
    """One file to ingest and what the caller says about it."""

    data: bytes
    report_text: str | None = None
    labels: dict[str, float | None] | None = None
    study_ref: str | None = None
    #: Used when the file itself names no view (PNG/JPEG, or a DICOM without the tag).
    view_position: str | None = None
    #: Set by the PACS connectors only: the study's DICOM StudyInstanceUID.
    study_instance_uid: str | None = None


@dataclass
class DecodedItem:
    """An item whose bytes decoded: its hash, stored pixel levels and metadata."""

    item: IngestItem
    content_hash: str
    levels: npt.NDArray[np.uint8 | np.uint16]  # (H, W)
    meta: ImageMeta

    def pixels(self) -> npt.NDArray[np.float32]:
        """(H, W) float32 in [0, 1]: exactly what a later re-embedding reads back."""
        return dequantize(self.levels)


@dataclass
class IngestResult:
    """The outcome for one item, in input order."""

    status: Outcome
    image_id: int | None = None
    content_hash: str | None = None
    error: ModelError | None = field(default=None, repr=False)


class IngestService:
    """Synchronous ingest steps; the API runs them in worker threads, the CLI directly."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        bundle: EncoderBundle,
        store: ImageStore,
        index: LiveIndex,
        metrics: Metrics,
        max_image_pixels: int,
        max_aspect_ratio: float | None = None,
        min_side: int | None = None,
        budget: PixelBudget | None = None,
        batch_size: int = INGEST_BATCH,
    ) -> None:
        self.sessions = sessions
        self.bundle = bundle
        self.store = store
        self.index = index
        self.metrics = metrics
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.min_side = min_side
        # Without a budget of its own (a command, a test), one as large as any image.
        self.budget = budget or PixelBudget(max_image_pixels, wait_s=float("inf"))
        self.batch_size = batch_size

    # -- steps -------------------------------------------------------------------------

    def find_existing(self, hashes: Sequence[str]) -> dict[str, int]:
        """Content hash → image id for the hashes already stored."""
        if not hashes:
            return {}
        with self.metrics.stage("database"), self.sessions() as session:
            rows = session.execute(
                select(Image.content_hash, Image.id).where(Image.content_hash.in_(set(hashes)))
            ).all()
        return {str(h): int(i) for h, i in rows}

    def decode(self, item: IngestItem, digest: str | None = None) -> DecodedItem:
        """Decode one item's bytes. Raises :class:`model.inputs.decode.ImageDecodeError`."""
        with self.metrics.stage("decode"):
            decoded = decode_image(
                item.data,
                max_pixels=self.max_image_pixels,
                max_aspect_ratio=self.max_aspect_ratio,
                min_side=self.min_side,
            )
            levels = quantize(decoded.pixels, decoded.meta.bits)  # (H, W)
        return DecodedItem(item, digest or content_hash(item.data), levels, decoded.meta)

    def encode(self, items: Sequence[DecodedItem]) -> npt.NDArray[np.float32]:
        """Embed decoded items: (N, D) float32, L2-normalised."""
        if not items:
            return np.zeros((0, self.bundle.dim), np.float32)
        with self.metrics.stage("encode"):
            vectors = self.bundle.encode_images([it.pixels() for it in items])  # (N, D)
        return np.asarray(vectors, dtype=np.float32)

    def persist(
        self, items: Sequence[DecodedItem], vectors: npt.NDArray[np.float32]
    ) -> list[IngestResult]:
        """Write files, commit rows with embeddings in one transaction, then index them.

        ``vectors`` is (N, D), row i for ``items[i]``. Hashes already stored come back as
        ``existing``; the rest as ``created``.
        """
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        if not items:
            return []
        # The hashes' locks span writing the files and committing the rows, so that a delete
        # of the same bytes cannot remove these files between the two.
        with self.store.lock(it.content_hash for it in items):
            with self.metrics.stage("store"):
                files = [
                    self.store.write(
                        it.content_hash,
                        it.levels,
                        original=it.item.data,
                        source_format=it.meta.source_format,
                    )
                    for it in items
                ]
            with self.index.change():
                try:
                    results = self._commit_all(items, vectors, files)
                except IntegrityError:
                    # Someone stored one of these hashes meanwhile: settle item by item.
                    logger.info("duplicate content hash in a batch of %d; one by one", len(items))
                    results = [
                        self._commit_one(it, vectors[i], files[i]) for i, it in enumerate(items)
                    ]
                except DBAPIError as exc:
                    if exc.connection_invalidated:
                        # The connection died during the commit, which may or may not have
                        # landed: only a rebuild from the database can tell the index.
                        self.index.mark_stale("the database connection was lost in a commit")
                    raise
                created = [i for i, r in enumerate(results) if r.status == "created"]
                if created:
                    ids = np.asarray([results[i].image_id for i in created], np.int64)  # (M,)
                    with self.metrics.stage("index"):
                        self.index.add(ids, vectors[created].astype(np.float32))  # (M, D)
        for result in results:
            self.metrics.ingested.labels(result.status).inc()
        return results

    def _row(self, it: DecodedItem, files: StoredFiles) -> Image:
        # The decoder's metadata and the store's paths carry the columns' own names; only
        # what the columns bound, or what the caller may add, is set here.
        meta = replace(
            it.meta,
            view_position=_clip(
                it.meta.view_position or it.item.view_position, VIEW_POSITION_CHARS
            ),
            modality=_clip(it.meta.modality, MODALITY_CHARS),
        )
        return Image(
            **asdict(meta),
            **asdict(files),
            content_hash=it.content_hash,
            labels=dict(it.item.labels or {}),
            report_text=it.item.report_text,
            study_ref=_clip(it.item.study_ref, STUDY_REF_CHARS),
            study_instance_uid=_clip(it.item.study_instance_uid, DICOM_UID_CHARS),
        )

    def _commit_all(
        self,
        items: Sequence[DecodedItem],
        vectors: npt.NDArray[np.float32],
        files: Sequence[StoredFiles],
    ) -> list[IngestResult]:
        model_id = self.bundle.model_id
        with self.metrics.stage("database"), self.sessions() as session, session.begin():
            rows = [self._row(it, files[i]) for i, it in enumerate(items)]
            session.add_all(rows)
            session.flush()
            session.add_all(
                Embedding.from_vector(row.id, model_id, vectors[i]) for i, row in enumerate(rows)
            )
            ids = [int(row.id) for row in rows]
            # Last before the commit: the feed's lock is held from here to the commit.
            session.flush()
            feed.record_adds(session, model_id, ids)
            # Under that lock a switch to another model (which records itself in the feed)
            # has either committed, and this refuses, or commits after these images, which
            # the switch's final embedding pass then covers (reconcile.reconcile).
            active = session.scalar(
                select(EncoderModel.is_active).where(EncoderModel.id == model_id)
            )
            if active is False:
                raise ModelSwitchedError(model_id)
        return [
            IngestResult("created", image_id, it.content_hash)
            for image_id, it in zip(ids, items, strict=True)
        ]

    def _commit_one(
        self, it: DecodedItem, vector: npt.NDArray[np.float32], files: StoredFiles
    ) -> IngestResult:
        try:
            return self._commit_all([it], vector[None, :], [files])[0]
        except IntegrityError:
            existing = self.find_existing([it.content_hash]).get(it.content_hash)
            if existing is None:
                raise
            return IngestResult("existing", existing, it.content_hash)

    # -- the whole pipeline ------------------------------------------------------------

    def pixel_cost(self, data: bytes) -> int:
        """Pixels to reserve before decoding ``data``, from its header.

        Bytes that are no image at all, or announce more than ``max_image_pixels`` or an
        aspect ratio beyond ``max_aspect_ratio``, are refused from the header without
        allocating anything: they cost nothing. A recognised image whose header cannot be
        read is charged the largest size allowed.
        """
        size = peek_size(data)
        if size is None:
            if sniff_format(data) is None:
                return 0
            return min(self.max_image_pixels, self.budget.total)
        width, height = size
        ratio = self.max_aspect_ratio
        if ratio is not None and max(width, height) > ratio * min(width, height):
            return 0
        pixels = width * height
        return pixels if pixels <= self.max_image_pixels else 0

    def check_cost(self, pixels: int) -> None:
        """Refuse an image that the whole pixel budget could never hold."""
        if pixels > self.budget.total:
            raise ImageTooLargeError(
                f"image has {pixels} pixels, more than the {self.budget.total} this service "
                "decodes at once (CONVIRT_DECODE_PIXEL_BUDGET)"
            )

    def embed_query(self, data: bytes) -> npt.NDArray[np.float32]:
        """Decode and embed one query image within the pixel budget: (D,) float32."""
        cost = self.pixel_cost(data)
        self.check_cost(cost)
        with self.budget.reserve(cost):
            decoded = self.decode(IngestItem(data=data))
            return self.encode([decoded])[0]  # (D,)

    def _batches(self, positions: list[int], costs: dict[int, int]) -> list[list[int]]:
        """Consecutive groups of at most ``batch_size`` items within the pixel budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        pixels = 0
        for position in positions:
            cost = costs[position]
            if current and (len(current) >= self.batch_size or pixels + cost > self.budget.total):
                batches.append(current)
                current, pixels = [], 0
            current.append(position)
            pixels += cost
        if current:
            batches.append(current)
        return batches

    def _ingest_batch(
        self,
        positions: list[int],
        items: Sequence[IngestItem],
        hashes: list[str],
        pixels: int,
        results: list[IngestResult | None],
    ) -> None:
        """Decode, embed and store one batch, holding its pixels of the budget."""
        with self.budget.reserve(pixels):
            todo: list[tuple[int, DecodedItem]] = []
            for position in positions:
                try:
                    todo.append((position, self.decode(items[position], hashes[position])))
                except ModelError as exc:
                    self._failed(position, hashes[position], exc, results)
            decoded = [d for _, d in todo]
            persisted = self.persist(decoded, self.encode(decoded))
        for (position, _), result in zip(todo, persisted, strict=True):
            results[position] = result

    def _failed(
        self, position: int, digest: str, exc: ModelError, results: list[IngestResult | None]
    ) -> None:
        logger.info("item %d not ingested: %s (%s)", position, exc.code, exc)
        self.metrics.ingested.labels("failed").inc()
        results[position] = IngestResult("failed", None, digest, exc)

    def ingest(self, items: Sequence[IngestItem]) -> list[IngestResult]:
        """Ingest a batch synchronously; one item's bad bytes do not fail the others.

        Items are decoded, embedded and stored in groups of at most ``batch_size`` whose
        pixels fit the budget, so memory stays bounded whatever the upload holds; a group
        that cannot get its pixels in time raises :class:`~app.services.budget.BusyError`
        (the groups before it are stored, and their bytes answer ``existing`` on a retry).
        Returns one result per item, in order. Within the batch, repeated bytes resolve to
        the first occurrence.
        """
        results: list[IngestResult | None] = [None] * len(items)
        hashes = [content_hash(it.data) for it in items]
        known = self.find_existing(hashes)
        first_of: dict[str, int] = {}
        costs: dict[int, int] = {}
        for position, (item, digest) in enumerate(zip(items, hashes, strict=True)):
            if digest in known:
                results[position] = IngestResult("existing", known[digest], digest)
            elif digest not in first_of:
                first_of[digest] = position
                costs[position] = self.pixel_cost(item.data)
                try:
                    self.check_cost(costs[position])
                except ModelError as exc:
                    self._failed(position, digest, exc, results)
                    del costs[position]
        for batch in self._batches(sorted(costs), costs):
            pixels = sum(costs[p] for p in batch)
            self._ingest_batch(batch, items, hashes, pixels, results)
        for position, digest in enumerate(hashes):
            if results[position] is None:
                # A repeat within the batch: the same outcome as its first occurrence.
                first = results[first_of[digest]]
                assert first is not None
                status: Outcome = "failed" if first.status == "failed" else "existing"
                results[position] = IngestResult(status, first.image_id, digest, first.error)
        return [r for r in results if r is not None]
