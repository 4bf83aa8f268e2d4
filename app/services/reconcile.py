"""Reconcile: make the vector index agree with the database, the source of truth.

Run at start-up (the service and ``convirt ingest``) and by ``convirt reindex``:

1. the bundle's model is registered in ``models`` (and marked active);
2. stored images without an embedding for that model are embedded from their stored
   de-identified PNG (after a model change, or rows a crash left half done);
3. the saved index is loaded and checked: model id, dimension, factory, checksum (by
   :meth:`index.VectorIndex.load`), then its count and its ids against the embeddings of
   the model. Anything off — or no saved index at all — and it is rebuilt from the stored
   embeddings and saved atomically. A saved index is never trusted over the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import AppError
from app.models import Embedding, EncoderModel, Image, bytes_to_vector
from app.services import feed
from app.services.snapshot import read_position, save_snapshot
from app.services.store import ImageStore, StoreError
from index import VectorIndex, VectorIndexError
from model.bundle import EncoderBundle

logger = logging.getLogger(__name__)

#: Embeddings read from the database per step when rebuilding the index.
REBUILD_BATCH: Final = 4096
#: Images embedded per forward pass when filling in missing embeddings.
EMBED_BATCH: Final = 32
#: Tries to register a model row that concurrent processes may be inserting too.
REGISTER_ATTEMPTS: Final = 3

ProgressCallback = Callable[[int], None]


@dataclass
class ReconcileReport:
    """What a reconcile found and did."""

    model_id: str
    embedded: int = 0
    unembeddable: list[int] = field(default_factory=list)
    rebuilt: bool = False
    reason: str | None = None
    vectors: int = 0
    #: The change feed position the index is complete up to.
    sequence: int = 0
    #: Why the rebuilt index could not be saved (it is served from memory meanwhile).
    save_error: str | None = None


class ModelNotActiveError(AppError):
    """Another model is active: serving this bundle needs an explicit switch."""

    code = "model_not_active"


def register_model(
    sessions: sessionmaker[Session], bundle: EncoderBundle, *, switch: bool = True
) -> bool:
    """Insert the bundle's model row if missing; make it active when no other model is.

    Returns whether the row is new. When another model is active: with ``switch`` the
    bundle's model stays inactive for now (the caller embeds every image with it, then
    calls :func:`activate_model`, so that no process switches to a half-embedded model);
    without it :class:`ModelNotActiveError` is raised, because a process starting with an
    old bundle must not switch every other process back.
    """
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            active, created = _insert_model(sessions, bundle, switch=switch)
            break
        except IntegrityError:
            # Another process (a second worker starting on a fresh database) inserted
            # the same row first: the next attempt finds it.
            if attempt == REGISTER_ATTEMPTS - 1:
                raise
            logger.info("model %s was registered concurrently; reading it", bundle.model_id)
    if created:
        logger.info("registered model %s (dim %d)", bundle.model_id, bundle.dim)
    if active is None or active == bundle.model_id:
        activate_model(sessions, bundle.model_id)
    return created


def _insert_model(
    sessions: sessionmaker[Session], bundle: EncoderBundle, *, switch: bool
) -> tuple[str | None, bool]:
    """One attempt of :func:`register_model`: (the active model id, whether the row is new)."""
    with sessions() as session, session.begin():
        active = session.scalar(select(EncoderModel.id).where(EncoderModel.is_active))
        if active is not None and active != bundle.model_id and not switch:
            raise ModelNotActiveError(
                f"the active model is {active}, not this bundle's {bundle.model_id}: "
                "run `convirt reindex` with this bundle to switch to it"
            )
        if session.get(EncoderModel, bundle.model_id) is not None:
            return active, False
        name = bundle.name or bundle.model_id[:19]
        session.add(
            EncoderModel(
                id=bundle.model_id,
                name=name[:200],
                dim=bundle.dim,
                config=dict(bundle.config),
                is_active=False,
            )
        )
    return active, True


def activate_model(sessions: sessionmaker[Session], model_id: str) -> bool:
    """Make ``model_id`` the active model; True when that is a switch.

    A switch is recorded in the change feed: every process serving another model learns
    of it there.
    """
    with sessions() as session, session.begin():
        row = session.get(EncoderModel, model_id)
        if row is None:
            raise ModelNotActiveError(f"model {model_id} is not registered")
        if row.is_active:
            return False
        row.is_active = True
        session.execute(
            update(EncoderModel)
            .where(EncoderModel.id != model_id, EncoderModel.is_active.is_(True))
            .values(is_active=False)
        )
        session.flush()
        feed.record_switch(session, model_id)
    logger.info("model %s is now the active model", model_id)
    return True


def count_embeddings(sessions: sessionmaker[Session], model_id: str) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Embedding).where(Embedding.model_id == model_id)
            )
            or 0
        )


def embedded_ids(sessions: sessionmaker[Session], model_id: str) -> npt.NDArray[np.int64]:
    """Ids of the images with an embedding under ``model_id``, sorted: (N,) int64."""
    with sessions() as session:
        ids = session.scalars(
            select(Embedding.image_id)
            .where(Embedding.model_id == model_id)
            .order_by(Embedding.image_id)
        ).all()
    return np.asarray(ids, dtype=np.int64)


def iter_embeddings(
    sessions: sessionmaker[Session], model_id: str, batch_size: int = REBUILD_BATCH
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """The stored vectors of ``model_id`` in id order: batches of ids (B,) and vectors (B, D).

    Keyset pagination (``image_id > last``) keeps each query cheap at any table size.
    """
    last = -1
    while True:
        with sessions() as session:
            rows = session.execute(
                select(Embedding.image_id, Embedding.dim, Embedding.vector)
                .where(Embedding.model_id == model_id, Embedding.image_id > last)
                .order_by(Embedding.image_id)
                .limit(batch_size)
            ).all()
        if not rows:
            return
        ids = np.asarray([int(r[0]) for r in rows], dtype=np.int64)  # (B,)
        vectors = np.stack([bytes_to_vector(r[2], int(r[1])) for r in rows])  # (B, D)
        yield ids, vectors
        last = int(ids[-1])


def feed_head(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return feed.head(session)


def feed_floor(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return feed.floor(session)


def rebuild_index(
    sessions: sessionmaker[Session], *, model_id: str, dim: int, factory: str
) -> tuple[VectorIndex, int]:
    """A new index of the stored embeddings of ``model_id``, and its feed position.

    The feed's head is read *before* the embeddings: every change committed up to it is
    in what the rebuild reads, and replaying the feed past it (which may repeat changes
    the rebuild already saw) brings the index up to date while writers go on.
    """
    sequence = feed_head(sessions)
    index = VectorIndex.rebuild(
        iter_embeddings(sessions, model_id),
        factory=factory,
        dim=dim,
        model_id=model_id,
        progress=False,
        total=count_embeddings(sessions, model_id),
    )
    logger.info("rebuilt index (%s) with %d vectors of %s", factory, index.ntotal, model_id)
    return index, sequence


def _embed_rows(
    rows: list[tuple[int, str]],
    bundle: EncoderBundle,
    store: ImageStore,
    report: ReconcileReport,
) -> tuple[list[int], npt.NDArray[np.float32]]:
    """Embed stored images from their PNGs; unreadable ones go into the report."""
    ids: list[int] = []
    pixels: list[npt.NDArray[np.float32]] = []
    for image_id, image_path in rows:
        try:
            pixels.append(store.read_pixels(image_path))  # (H, W)
        except StoreError as exc:
            logger.warning("image %d cannot be embedded: %s", image_id, exc)
            report.unembeddable.append(image_id)
            continue
        ids.append(image_id)
    if not ids:
        return ids, np.zeros((0, bundle.dim), np.float32)
    vectors = np.asarray(bundle.encode_images(pixels), dtype=np.float32)  # (B, D)
    return ids, vectors


def embed_images(
    sessions: sessionmaker[Session],
    bundle: EncoderBundle,
    store: ImageStore,
    *,
    only_missing: bool,
    report: ReconcileReport,
    batch_size: int = EMBED_BATCH,
    progress: ProgressCallback | None = None,
) -> int:
    """Embed stored images with ``bundle`` from their stored PNGs, committing per batch.

    ``only_missing`` embeds the images without a vector for the bundle's model; otherwise
    every image is embedded again and its vector replaced (``convirt reindex``).
    ``progress`` is called with the number of images handled in each batch.
    """
    model_id = bundle.model_id
    last = -1
    done = 0
    while True:
        stmt = select(Image.id, Image.image_path).where(Image.id > last)
        if only_missing:
            has_vector = exists().where(
                Embedding.image_id == Image.id, Embedding.model_id == model_id
            )
            stmt = stmt.where(~has_vector)
        with sessions() as session:
            rows = [
                (int(i), str(p))
                for i, p in session.execute(stmt.order_by(Image.id).limit(batch_size)).all()
            ]
        if not rows:
            return done
        last = rows[-1][0]
        ids, vectors = _embed_rows(rows, bundle, store, report)
        with sessions() as session, session.begin():
            still_there = set(session.scalars(select(Image.id).where(Image.id.in_(ids))).all())
            stored: list[int] = []
            for image_id, vector in zip(ids, vectors, strict=True):
                # An image deleted while it was being embedded keeps no orphan vector.
                if image_id in still_there:
                    session.merge(Embedding.from_vector(image_id, model_id, vector))
                    stored.append(image_id)
            session.flush()
            feed.record_adds(session, model_id, stored)
        done += len(ids)
        if progress is not None:
            progress(len(rows))


def _inconsistency(
    index: VectorIndex, sessions: sessionmaker[Session], *, model_id: str, factory: str
) -> str | None:
    """Why a loaded index does not mirror the database, or None when it does."""
    if index.factory != factory:
        return f"factory {index.factory!r} is not the configured {factory!r}"
    expected = embedded_ids(sessions, model_id)
    if index.ntotal != len(expected):
        return f"index holds {index.ntotal} vectors, the database {len(expected)}"
    if not np.array_equal(index.ids(), expected):
        return "index ids differ from the database's"
    return None


def open_index(
    sessions: sessionmaker[Session],
    *,
    index_dir: Path,
    model_id: str,
    dim: int,
    factory: str,
) -> tuple[VectorIndex, str | None, int, str | None]:
    """Load the saved index if it can be trusted, else rebuild and save it.

    A snapshot with a known feed position is trusted as it is: the caller replays the
    feed past the position. Without one (a save that predates the feed, or died halfway),
    or with one below the pruned floor (the records past it are gone), its ids are
    compared with the database's. Returns the index, the reason it was
    rebuilt (None when the saved one was good), its feed position, and why saving the
    rebuilt index failed (None when saved). A rebuilt index that cannot be saved
    (``OSError``: a full disk) is returned all the same: the caller serves it and retries
    the save.
    """
    reason: str | None
    try:
        index = VectorIndex.load(index_dir, expected_model_id=model_id, expected_dim=dim)
    except VectorIndexError as exc:
        reason = f"saved index rejected ({exc.code})"
    else:
        sequence = read_position(index_dir, index)
        # A position below the pruned floor cannot be replayed from: the records past it
        # are gone. Such a snapshot is compared with the database like one without.
        if sequence is not None and sequence >= feed_floor(sessions) and index.factory == factory:
            logger.info("index snapshot at %s holds the feed up to %d", index_dir, sequence)
            return index, None, sequence, None
        # Read before the comparison, like a rebuild: what commits later is replayed.
        sequence = feed_head(sessions)
        reason = _inconsistency(index, sessions, model_id=model_id, factory=factory)
        if reason is None:
            logger.info(
                "index at %s agrees with the database (%d vectors)", index_dir, index.ntotal
            )
            return index, None, sequence, None
    logger.warning("rebuilding the index from the database: %s", reason)
    index, sequence = rebuild_index(sessions, model_id=model_id, dim=dim, factory=factory)
    try:
        save_snapshot(index, index_dir, sequence)
    except OSError as exc:
        # A full or read-only disk must not keep the service down: the rebuilt index
        # serves from memory, and the service keeps retrying the save (the caller sees
        # the reason and keeps the index marked unsaved).
        logger.warning("the rebuilt index could not be saved (%s); serving it from memory", exc)
        return index, reason, sequence, f"{type(exc).__name__}: {exc.strerror or exc}"
    return index, reason, sequence, None


def reconcile(
    sessions: sessionmaker[Session],
    bundle: EncoderBundle,
    store: ImageStore,
    *,
    index_dir: Path,
    factory: str,
    reembed_all: bool = False,
    switch_model: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[VectorIndex, ReconcileReport]:
    """Register the model, embed what lacks a vector, and return an index that agrees.

    ``reembed_all`` re-embeds every stored image (``convirt reindex``) and always rebuilds.
    ``switch_model`` makes the bundle's model the active one even when another is (see
    :func:`register_model`).
    """
    report = ReconcileReport(model_id=bundle.model_id)
    register_model(sessions, bundle, switch=switch_model)
    report.embedded = embed_images(
        sessions,
        bundle,
        store,
        only_missing=not reembed_all,
        report=report,
        progress=progress,
    )
    if report.embedded:
        logger.info("embedded %d stored images with %s", report.embedded, bundle.model_id)
    if report.unembeddable:
        logger.warning(
            "%d stored images have no readable PNG and stay out of the index",
            len(report.unembeddable),
        )
    if switch_model and activate_model(sessions, bundle.model_id):
        # Images stored by processes of the old model after the pass above and before the
        # switch committed have no vector of this model yet; after it, those processes'
        # stores are refused (ingest.ModelSwitchedError), so one more pass completes it.
        late = embed_images(
            sessions, bundle, store, only_missing=True, report=report, progress=progress
        )
        if late:
            logger.info("embedded %d images stored during the switch", late)
        report.embedded += late
        # The second pass meets the unreadable images of the first again.
        report.unembeddable = sorted(set(report.unembeddable))
    if reembed_all:
        index, report.sequence = rebuild_index(
            sessions, model_id=bundle.model_id, dim=bundle.dim, factory=factory
        )
        save_snapshot(index, index_dir, report.sequence)
        report.rebuilt, report.reason = True, "re-embedded every image"
    else:
        index, report.reason, report.sequence, report.save_error = open_index(
            sessions,
            index_dir=index_dir,
            model_id=bundle.model_id,
            dim=bundle.dim,
            factory=factory,
        )
        report.rebuilt = report.reason is not None
    report.vectors = index.ntotal
    return index, report
