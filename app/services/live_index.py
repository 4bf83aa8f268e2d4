"""The vector index as the running service holds it: locking, persistence and staleness.

:class:`~index.VectorIndex` is itself safe to use from many threads; what this wrapper adds
is the *change* lock that spans a database commit and the matching index update, so that a
rebuild from the database (which takes it exclusively) never misses a change made between
its read of the database and its swap of the index. Saving is debounced: changes mark the
index dirty and
:meth:`LiveIndex.save_if_dirty` (called periodically and at shutdown) writes it atomically;
after a crash the start-up reconcile rebuilds whatever the last save missed from the
database, which is the source of truth.

Other processes change the database too: :class:`~app.services.follower.FeedFollower`
applies the change feed to this index in order and advances :attr:`LiveIndex.sequence`,
the last feed ``seq`` the index is complete up to, which every save records beside the
index (:mod:`app.services.snapshot`). The process's own changes are applied directly as
well (so a client reads its own write at once); both paths are idempotent (an id already
in the index is not added again, a missing one is not removed), so which comes first
does not matter. The *apply* lock makes each follower round (read the feed, apply it)
atomic with respect to those direct changes.

When an ``add`` or ``remove`` fails the index no longer mirrors the database. It is then
marked *stale*: ``/ready`` answers 503 and the service schedules a rebuild from the
stored embeddings (:mod:`app.services.reconcile`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

from app.services.snapshot import save_snapshot
from index import MAX_K, VectorIndex
from index.rwlock import ReadWriteLock

logger = logging.getLogger(__name__)


class LiveIndex:
    """A :class:`~index.VectorIndex` shared by the request threads of one service."""

    def __init__(self, index: VectorIndex, directory: Path, *, sequence: int = 0) -> None:
        self._index = index
        self.directory = directory
        #: The change feed ``seq`` this index is complete up to.
        self.sequence = sequence
        # Re-entrant: a follower round holds it and calls add/remove, which take it too.
        self._apply = threading.RLock()
        #: Called after a change to the index (the follower: confirm it in the feed soon).
        self.on_change: Callable[[], None] | None = None
        self._save_mutex = threading.Lock()
        # Spans a whole database change *and* its index change, so that a rebuild (which
        # reads the database, then swaps the index) never misses a change in between.
        self._changes = ReadWriteLock()
        self._dirty = False
        self._stale_reason: str | None = None
        #: Why the last save failed (e.g. the disk is full), or None after a good one.
        self.save_error: str | None = None

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    @property
    def model_id(self) -> str:
        return self._index.model_id

    @property
    def dim(self) -> int:
        return self._index.dim

    def ids(self) -> npt.NDArray[np.int64]:
        """The indexed ids, sorted: (N,) int64."""
        return self._index.ids()

    @property
    def stale_reason(self) -> str | None:
        """Why the index no longer mirrors the database, or None when it does."""
        return self._stale_reason

    def mark_stale(self, reason: str) -> None:
        if self._stale_reason is None:
            logger.error("vector index marked for rebuild: %s", reason)
        self._stale_reason = reason

    @contextmanager
    def change(self) -> Iterator[None]:
        """Hold while committing rows and applying them to the index; many may hold it."""
        with self._changes.read():
            yield

    @contextmanager
    def applying(self) -> Iterator[None]:
        """Hold to read the feed and apply it with no direct change in between."""
        with self._apply:
            yield

    def contains(self, id_: int) -> bool:
        return self._index.contains(id_)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold to see (and rebuild) the database and the index with no change in flight."""
        with self._changes.write():
            yield

    def search(
        self, queries: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` of (Q, D) queries → scores (Q, k) and ids (Q, k), -1 padded.

        ``k`` is capped at the index size and at :data:`index.MAX_K`.
        """
        index = self._index
        k = min(k, index.ntotal, MAX_K)
        if k <= 0:
            q = queries.shape[0]
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        return index.search(queries, k)  # (Q, k), (Q, k)

    def add(self, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> bool:
        """Add (N,) ids with (N, D) vectors; ids already in the index are skipped (an id's
        vector under one model never changes). Returns False (and marks stale) on failure."""
        try:
            with self._apply:
                index = self._index
                new = np.asarray([not index.contains(int(i)) for i in ids], dtype=bool)  # (N,)
                if new.any():
                    index.add(ids[new], vectors[new])
                    self._dirty = True
                    self._changed()
        except Exception as exc:
            # The rows are committed already: the database stays right, the index is rebuilt.
            self.mark_stale(f"add of {len(ids)} vectors failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def remove(self, ids: npt.NDArray[np.int64]) -> bool:
        """Remove (N,) ids. Returns False (and marks stale) on failure."""
        try:
            with self._apply:
                if self._index.remove(ids):
                    self._dirty = True
                    self._changed()
        except Exception as exc:
            self.mark_stale(f"removal of {len(ids)} vectors failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def mark_unsaved(self, reason: str) -> None:
        """The index in memory has no saved copy (its save failed): keep retrying it."""
        self._dirty = True
        self.save_error = reason

    def replace(self, index: VectorIndex, *, saved: bool, sequence: int) -> None:
        """Swap in a rebuilt index, complete up to feed ``sequence``."""
        with self._save_mutex, self._apply:
            self._index = index
            self.sequence = sequence
            self._dirty = not saved
            self._stale_reason = None
            if saved:
                self.save_error = None

    def save(self) -> None:
        """Write the index atomically to its directory; searches go on meanwhile.

        The dirty flag is cleared *before* writing: a change landing during the write marks
        it dirty again, so it is saved next time rather than lost.
        """
        with self._save_mutex:
            # The position is read first: the save holds at least everything up to it.
            with self._apply:
                self._dirty = False
                sequence = self.sequence
            try:
                save_snapshot(self._index, self.directory, sequence)
            except BaseException as exc:
                self._dirty = True
                self.save_error = f"{type(exc).__name__}: {exc}"
                raise
            self.save_error = None
        logger.debug("index saved to %s", self.directory)

    def save_if_dirty(self) -> bool:
        """Save when there are unsaved changes and the index is not stale; True if saved."""
        if not self._dirty or self._stale_reason is not None:
            return False
        self.save()
        return True
