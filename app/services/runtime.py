"""The running service's parts, built once from the settings: database, bundle, store, index.

Each runtime's index follows the database's change feed (:mod:`app.services.follower`):
start-up loads the index snapshot and replays the feed past it; the app then runs the
follower in the background, so changes made by any process (other workers, replicas,
``convirt ingest``) become searchable here too.

:meth:`Runtime.start` is what the app's lifespan (and ``convirt ingest``/``reindex``) run:
migrate the database, load the encoder bundle, reconcile the index with the database. It
is synchronous and slow (seconds: the bundle's towers load), so the app runs it in a
worker thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, ParamSpec, TypeVar

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db import create_engine_for, ping, session_factory, upgrade_database
from app.models import Image, utcnow
from app.services import feed
from app.services.budget import BusyError, PixelBudget
from app.services.classify import ClassifyService
from app.services.follower import FeedFollower
from app.services.ingest import MODEL_SWITCHED, IngestService
from app.services.live_index import LiveIndex
from app.services.metrics import Metrics
from app.services.reconcile import (
    ProgressCallback,
    ReconcileReport,
    open_index,
    reconcile,
)
from app.services.reconcile import rebuild_index as rebuild_from_database
from app.services.retrieval import RetrievalService
from app.services.snapshot import save_snapshot
from app.services.store import ImageStore
from app.services.sweep import SweepReport, sweep_orphans
from app.settings import Settings
from model.bundle import EncoderBundle

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: How much lower the CPU priority (nice) of the image threads is than the process's.
IMAGE_WORK_NICE: Final = 5

#: Readiness outcomes that are not "ready", with their problem codes.
NOT_READY_DATABASE: Final = "database_unavailable"
NOT_READY_INDEX: Final = "index_inconsistent"
NOT_READY_LAGGING: Final = "index_lagging"
NOT_READY_SWITCHED: Final = MODEL_SWITCHED


@dataclass(frozen=True)
class Readiness:
    ready: bool
    code: str | None = None
    detail: str | None = None
    images: int = 0
    vectors: int = 0
    lag_changes: int = 0
    lag_seconds: float = 0.0
    notes: tuple[str, ...] = ()


def _lower_thread_priority() -> None:
    """Raise the calling thread's nice value by :data:`IMAGE_WORK_NICE` (Linux: per thread)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + IMAGE_WORK_NICE)
    except (OSError, AttributeError) as exc:  # not Linux, or not permitted: same priority
        logger.debug("image threads keep the normal priority: %s", exc)


class Runtime:
    """Everything a request needs; one per app (or per command)."""

    @property
    def _image_threads(self) -> int:
        # All but one of the inference threads' worth: text searches always keep one.
        return max(1, self.settings.encode_concurrency - 1)

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        sessions: sessionmaker[Session],
        bundle: EncoderBundle,
        store: ImageStore,
        index: LiveIndex,
        metrics: Metrics,
        report: ReconcileReport,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.bundle = bundle
        self.store = store
        self.index = index
        self.metrics = metrics
        self.report = report
        self.ingest = IngestService(
            sessions=sessions,
            bundle=bundle,
            store=store,
            index=index,
            metrics=metrics,
            max_image_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_aspect_ratio,
            min_side=settings.min_image_side,
            budget=PixelBudget(settings.decode_pixel_budget, wait_s=settings.decode_wait_s),
        )
        # At most this many image jobs run at once; more wait (a bounded time) for a turn.
        self._image_lane = asyncio.Semaphore(self._image_threads)
        self._last_sweep: float | None = None
        self.retrieval = RetrievalService(
            sessions=sessions, index=index, metrics=metrics, model_id=bundle.model_id
        )
        self.classifier = ClassifyService(
            bundle=bundle, retrieval=self.retrieval, metrics=metrics, knn_k=settings.classify_knn_k
        )
        self.follower = FeedFollower(
            engine=engine,
            sessions=sessions,
            index=index,
            model_id=bundle.model_id,
            poll_interval_s=settings.feed_poll_interval_s,
        )
        metrics.bind(metrics.index_vectors, lambda: index.ntotal)
        metrics.bind(metrics.feed_sequence, lambda: index.sequence)
        metrics.bind(metrics.feed_lag_changes, lambda: self.follower.lag().changes)
        metrics.bind(metrics.feed_lag_seconds, lambda: self.follower.lag().seconds)
        self.follower.on_applied = lambda _lag: metrics.refresh()
        # Model inference runs on these few threads only: the pool size bounds how many
        # inferences run at once, and torch's and FAISS's OpenMP thread teams, which are
        # made per calling thread, stay as few as the pool's threads instead of one team
        # per worker of a general-purpose pool (oversubscribing the cores).
        self.inference = ThreadPoolExecutor(
            max_workers=settings.encode_concurrency, thread_name_prefix="convirt-inference"
        )
        # Image work (decode, embed, store: seconds for a large upload) has threads of its
        # own at a lower CPU priority, which their OpenMP teams inherit: on a busy machine
        # the text searches on the threads above are scheduled first.
        self.image_inference = ThreadPoolExecutor(
            max_workers=self._image_threads,
            thread_name_prefix="convirt-image",
            initializer=_lower_thread_priority,
        )

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        bundle: EncoderBundle | None = None,
        reembed_all: bool = False,
        switch_model: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Runtime:
        """Migrate, load the bundle (unless given), reconcile, replay the feed's tail; the
        index agrees with the database when it returns.

        ``reembed_all`` re-embeds every stored image first (``convirt reindex``);
        ``switch_model`` makes the bundle's model the active one for every process.
        """
        engine = create_engine_for(settings)
        try:
            upgrade_database(settings.database_url)
            sessions = session_factory(engine)
            if bundle is None:
                # The bundle carries its tokenizer and weights: nothing may come from a hub.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                bundle = EncoderBundle.load(settings.bundle_dir)
            logger.info("encoder bundle %s (dim %d) loaded", bundle.model_id, bundle.dim)
            store = ImageStore(
                settings.data_dir,
                thumbnail_size=settings.thumbnail_size,
                store_originals=settings.store_originals,
            )
            store.prepare_locks()
            vindex, report = reconcile(
                sessions,
                bundle,
                store,
                index_dir=settings.index_dir,
                factory=settings.index_factory,
                reembed_all=reembed_all,
                switch_model=switch_model,
                progress=progress,
            )
            live = LiveIndex(vindex, settings.index_dir, sequence=report.sequence)
            if report.save_error is not None:
                live.mark_unsaved(report.save_error)
            runtime = cls(
                settings=settings,
                engine=engine,
                sessions=sessions,
                bundle=bundle,
                store=store,
                index=live,
                metrics=metrics or Metrics(),
                report=report,
            )
            runtime.catch_up_at_start()
        except BaseException:
            engine.dispose()
            raise
        return runtime

    def catch_up_at_start(self) -> None:
        """Replay the feed past the snapshot; rebuild if the result disagrees with the database.

        The count check is the cheap guard against a database changed behind the feed's
        back (rows deleted by hand, a restored backup): a snapshot is trusted for what the
        feed says, not for what it cannot know.
        """
        replayed = self.follower.catch_up()
        self.follower.count_pending()
        if replayed:
            logger.info("replayed %d feed records after the snapshot", replayed)
        problem = self.disagreement()
        if problem is not None:
            logger.warning("index disagrees with the database after the replay: %s", problem)
            self.rebuild_index(trust_snapshot=False)
            self.report.rebuilt, self.report.reason = True, problem
        self.report.vectors = self.index.ntotal
        self.report.sequence = self.index.sequence

    def disagreement(self) -> str | None:
        """Why the caught-up index does not hold the database's embeddings, or None.

        Only decidable when the index has applied the feed up to its head: while changes
        are pending the check is skipped (None) and a later call decides.
        """
        with self.index.applying():
            with self.sessions() as session:
                head, stored = feed.head_and_count(session, self.bundle.model_id)
            if head != self.index.sequence:
                return None
            vectors = self.index.ntotal
        if vectors != stored:
            return f"the index holds {vectors} vectors, the database {stored}"
        return None

    # -- maintenance -------------------------------------------------------------------

    def rebuild_index(self, *, trust_snapshot: bool = True) -> None:
        """Reload the saved snapshot (or rebuild from the database), then follow the feed.

        ``trust_snapshot`` false always rebuilds from the stored embeddings.
        """
        with self.index.exclusive():
            save_error: str | None = None
            if trust_snapshot:
                vindex, reason, sequence, save_error = open_index(
                    self.sessions,
                    index_dir=self.settings.index_dir,
                    model_id=self.bundle.model_id,
                    dim=self.bundle.dim,
                    factory=self.settings.index_factory,
                )
            else:
                vindex, sequence = rebuild_from_database(
                    self.sessions,
                    model_id=self.bundle.model_id,
                    dim=self.bundle.dim,
                    factory=self.settings.index_factory,
                )
                reason = "rebuilt from the database"
                try:
                    save_snapshot(vindex, self.settings.index_dir, sequence)
                except OSError as exc:
                    save_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            # Either the saved copy was good (reason None) or a new one was saved: both are
            # on disk as they are live, up to ``sequence``; an unsaved one is retried.
            self.index.replace(vindex, saved=save_error is None, sequence=sequence)
            if save_error is not None:
                self.index.mark_unsaved(save_error)
            if reason is not None:
                logger.info("index rebuilt: %s", reason)
        self.follower.catch_up()

    def maintain(self) -> None:
        """Periodic duty: rebuild a stale index, else save unsaved changes; sweep orphans
        at the first round after start-up and every ``orphan_sweep_interval_s`` after."""
        now = time.monotonic()
        due = self._last_sweep is None or (
            now - self._last_sweep >= self.settings.orphan_sweep_interval_s
        )
        try:
            if self.index.stale_reason is not None:
                self.rebuild_index()
            else:
                self.index.save_if_dirty()
        except OSError as exc:
            # A full disk: the index goes on serving from memory; retried next round.
            logger.warning("index not saved (%s); retrying", exc.strerror or exc)
        finally:
            # Also when saving failed: on a full disk the sweep is what frees space.
            if due:
                self._last_sweep = now
                self.sweep_orphans()
                self.prune_feed()

    def sweep_orphans(self) -> SweepReport:
        """Remove stored files that no row refers to (see :mod:`app.services.sweep`)."""
        with self.metrics.stage("store"):
            return sweep_orphans(self.sessions, self.store, grace_s=self.settings.orphan_grace_s)

    def prune_feed(self) -> int:
        """Delete change-feed records older than ``feed_retention_s``; returns how many."""
        if self.settings.feed_retention_s <= 0:
            return 0
        before = utcnow() - dt.timedelta(seconds=self.settings.feed_retention_s)
        pruned = 0
        try:
            while True:
                with self.sessions() as session, session.begin():
                    step = feed.prune(session, before)
                pruned += step
                if step < feed.PRUNE_BATCH:
                    break
        except SQLAlchemyError as exc:
            # Another round retries; a feed that is not pruned only takes space.
            logger.warning("change feed not pruned: %s", type(exc).__name__)
        if pruned:
            logger.info("pruned %d change-feed records older than %s", pruned, before)
        return pruned

    def readiness(self) -> Readiness:
        """Database reachable, the active model served, the index following the feed and,
        when no change is in flight, holding exactly the model's stored embeddings."""
        if not ping(self.engine):
            return Readiness(False, NOT_READY_DATABASE, "the database does not answer")
        if self.index.stale_reason is not None:
            return Readiness(False, NOT_READY_INDEX, "the index is being rebuilt")
        if self.follower.switched_to is not None:
            return Readiness(
                False,
                NOT_READY_SWITCHED,
                f"model {self.follower.switched_to} is now active; loading its bundle",
            )
        # Not caught up here: /ready must show a follower that stopped keeping up.
        self.follower.count_pending()
        problem = self.disagreement()
        with self.sessions() as session:
            images = int(session.scalar(select(func.count()).select_from(Image)) or 0)
        vectors = self.index.ntotal
        lag = self.follower.lag()
        if problem is not None:
            return Readiness(False, NOT_READY_INDEX, problem, images, vectors)
        if lag.seconds > self.settings.feed_max_lag_s:
            return Readiness(
                False,
                NOT_READY_LAGGING,
                f"the index has not seen the change feed for {lag.seconds:.0f} s",
                images,
                vectors,
                lag.changes,
                lag.seconds,
            )
        notes: tuple[str, ...] = ()
        if self.index.save_error is not None:
            failure = self.index.save_error
            notes = (f"the index is served from memory; saving it failed ({failure})",)
        return Readiness(
            True,
            images=images,
            vectors=vectors,
            lag_changes=lag.changes,
            lag_seconds=lag.seconds,
            notes=notes,
        )

    def delete_image(self, image_id: int) -> bool:
        """Delete an image: database (committed) first, then the index, then the files.

        The files are removed under the content hash's store lock, and only when no row
        refers to them any more: a re-upload of the same bytes waits for the lock, so it
        either committed before (its row keeps the files) or writes them anew after.
        Returns False when there is no such image.
        """
        with self.sessions() as session:
            digest = session.scalar(select(Image.content_hash).where(Image.id == image_id))
        if digest is None:
            return False
        with self.store.lock([digest]), self.index.change():
            with self.metrics.stage("database"), self.sessions() as session, session.begin():
                row = session.get(Image, image_id)
                if row is None:
                    return False
                paths = (row.image_path, row.thumbnail_path, row.original_path)
                session.delete(row)
                session.flush()
                feed.record_removes(session, [image_id])
            with self.metrics.stage("index"):
                self.index.remove(np.asarray([image_id], dtype=np.int64))
            with self.metrics.stage("store"), self.sessions() as session:
                still_used = session.scalar(
                    select(func.count()).select_from(Image).where(Image.content_hash == digest)
                )
                if not still_used:
                    self.store.delete(*paths)
        logger.info("image %d deleted", image_id)
        return True

    async def infer(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` (model inference, and the search that follows it) on an inference
        thread, off the event loop; waits for a free thread when all are busy."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.inference, functools.partial(fn, *args, **kwargs))

    async def infer_image(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`infer` for work that decodes images: on the image threads, waiting for one
        at most ``decode_wait_s`` seconds (then :class:`BusyError`, 503 ``busy``)."""
        try:
            await asyncio.wait_for(self._image_lane.acquire(), self.settings.decode_wait_s)
        except TimeoutError:
            raise BusyError("the service is busy with other images; retry shortly") from None
        try:
            loop = asyncio.get_running_loop()
            call = functools.partial(fn, *args, **kwargs)
            return await loop.run_in_executor(self.image_inference, call)
        finally:
            self._image_lane.release()

    def close(self) -> None:
        """Finish running inferences, save unsaved index changes, release the database."""
        self.follower.stop()
        try:
            self.inference.shutdown(wait=True)
            self.image_inference.shutdown(wait=True)
            try:
                # The saved position then covers this process's own last changes too.
                self.follower.catch_up()
            except SQLAlchemyError as exc:
                logger.warning("feed not read before the final save: %s", type(exc).__name__)
            if self.index.stale_reason is None:
                try:
                    self.index.save_if_dirty()
                except OSError as exc:
                    # Nothing is lost: the next start-up rebuilds it from the database.
                    logger.warning("index not saved at shutdown: %s", exc.strerror or exc)
        finally:
            self.engine.dispose()
