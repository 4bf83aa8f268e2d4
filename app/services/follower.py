"""The follower: keeps one process's index in step with the change feed of the database.

Every process that serves searches runs one :class:`FeedFollower`. A background thread
applies the feed's tail (:mod:`app.services.feed`) to the process's
:class:`~app.services.live_index.LiveIndex` in ``seq`` order, at least once per poll
interval (under a second); on PostgreSQL a ``LISTEN`` connection wakes it as soon as a
writer commits, so a change made by any process is searchable everywhere within
milliseconds there and within one poll interval on SQLite.

An ``add`` record makes the follower read the image's *current* embedding: when the
image was deleted since, there is none and the record is skipped (its ``remove`` comes
later in the feed). A ``switch`` record naming another model than the one this process
serves is remembered in :attr:`FeedFollower.switched_to`: this process's index no longer
follows the active model, and the runtime reloads its bundle.

How far behind it is: :meth:`FeedFollower.lag` gives the changes committed past the
index's position (as of the last round) and the seconds since the follower last saw the
feed's head, an upper bound on how stale a search can be.

A position below the feed's floor (:func:`app.services.feed.prune` deleted records this
index never applied) cannot be replayed: the index is marked stale, and the runtime
rebuilds it from the stored embeddings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.models import Embedding, bytes_to_vector
from app.services import feed
from app.services.feed import ChangeRecord
from app.services.live_index import LiveIndex

logger = logging.getLogger(__name__)

#: Records read per query while catching up.
TAIL_BATCH: Final = 2048
#: Longest wait before reconnecting a lost LISTEN connection, in seconds.
MAX_LISTEN_BACKOFF_S: Final = 30.0
#: The stale reason of an index whose position the feed was pruned past.
PRUNED_PAST: Final = "the change feed was pruned past the index's position"


@dataclass(frozen=True)
class Lag:
    """How far the index is behind the database."""

    changes: int
    seconds: float


class FeedFollower:
    """Applies the change feed to one :class:`LiveIndex`; see the module docstring."""

    def __init__(
        self,
        *,
        engine: Engine,
        sessions: sessionmaker[Session],
        index: LiveIndex,
        model_id: str,
        poll_interval_s: float,
        on_applied: Callable[[Lag], None] | None = None,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.index = index
        self.model_id = model_id
        self.poll_interval_s = poll_interval_s
        self.on_applied = on_applied
        #: Another model became active (a ``switch`` record); None while ours is.
        self.switched_to: str | None = None
        self._pending = 0
        self._synced_at = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_error: str | None = None
        # A direct change to the index (this process's own write) is in the feed already:
        # a round soon after confirms it and moves the position past it.
        index.on_change = self.wake

    def wake(self) -> None:
        """Run a round now rather than at the next poll."""
        self._wake.set()

    # -- one round ---------------------------------------------------------------------

    def catch_up(self) -> int:
        """Apply every committed record past the index's position; returns how many."""
        applied = 0
        with self.index.applying():
            if self.index.stale_reason is not None:
                # A rebuild from the database is due; it sets the position itself.
                return 0
            started = time.monotonic()
            while True:
                with self.sessions() as session:
                    records = feed.read_tail(session, self.index.sequence, TAIL_BATCH)
                    # Read after the tail: a prune committed before the tail was read is
                    # seen here, and one committed later deleted nothing this round needs.
                    if self.index.sequence < feed.floor(session):
                        logger.warning(
                            "index at feed position %d, below the pruned floor: rebuilding",
                            self.index.sequence,
                        )
                        self.index.mark_stale(PRUNED_PAST)
                        return applied
                    if records:
                        self._apply(session, records)
                if not records:
                    break
                applied += len(records)
                self.index.sequence = records[-1].seq
            self._synced_at = started
            self._pending = 0
        if applied:
            logger.debug("applied %d feed records, now at %d", applied, self.index.sequence)
        if self.on_applied is not None:
            self.on_applied(self.lag())
        return applied

    def _apply(self, session: Session, records: list[ChangeRecord]) -> None:
        """Apply ``records`` in order; consecutive adds go in as one batch."""
        adds: list[int] = []
        for record in records:
            if record.op == "add" and record.model_id == self.model_id:
                assert record.image_id is not None
                adds.append(record.image_id)
            elif record.op == "remove":
                # Pending adds come first: the removal may be of one of them.
                self._add(session, adds)
                adds = []
                assert record.image_id is not None
                self.index.remove(np.asarray([record.image_id], dtype=np.int64))
            elif record.op == "switch":
                if record.model_id != self.model_id:
                    self.switched_to = record.model_id
                    logger.warning(
                        "model %s is now active; this process serves %s",
                        record.model_id,
                        self.model_id,
                    )
                else:
                    self.switched_to = None
        self._add(session, adds)

    def _add(self, session: Session, image_ids: list[int]) -> None:
        wanted = sorted({i for i in image_ids if not self.index.contains(i)})
        if not wanted:
            return
        rows = session.execute(
            select(Embedding.image_id, Embedding.dim, Embedding.vector).where(
                Embedding.model_id == self.model_id, Embedding.image_id.in_(wanted)
            )
        ).all()
        if not rows:
            return
        ids = np.asarray([int(r[0]) for r in rows], dtype=np.int64)  # (B,)
        vectors = np.stack([bytes_to_vector(r[2], int(r[1])) for r in rows])  # (B, D)
        self.index.add(ids, vectors)

    def lag(self) -> Lag:
        """Changes known to be unapplied, and seconds since the feed's head was last seen."""
        return Lag(self._pending, max(0.0, time.monotonic() - self._synced_at))

    def count_pending(self) -> int:
        """Ask the database how many committed records the index has not applied yet."""
        with self.sessions() as session:
            pending = feed.head(session) - self.index.sequence
        self._pending = max(0, pending)
        return self._pending

    # -- the background thread ---------------------------------------------------------

    def start(self) -> None:
        """Follow in the background: poll, and on PostgreSQL also listen for commits."""
        if self._threads:
            return
        self._stop.clear()
        self._threads.append(
            threading.Thread(target=self._poll_loop, name="convirt-follower", daemon=True)
        )
        if self.engine.dialect.name == "postgresql":
            self._threads.append(
                threading.Thread(target=self._listen_loop, name="convirt-listen", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads.clear()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.catch_up()
                self.last_error = None
            except Exception as exc:
                # The database may be down for a while: keep the index, report, retry.
                if self.last_error is None:
                    logger.warning("feed poll failed: %s", type(exc).__name__)
                self.last_error = type(exc).__name__

    def _listen_loop(self) -> None:
        """Wake the poll loop on every NOTIFY; reconnect with a backoff when cut off."""
        import psycopg  # only on PostgreSQL, where the engine's driver is psycopg

        url = make_url(self.engine.url).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        backoff = self.poll_interval_s
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {feed.NOTIFY_CHANNEL}")
                    backoff = self.poll_interval_s
                    # A change committed before LISTEN took effect is found by this poll.
                    self._wake.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.poll_interval_s, stop_after=1):
                            self._wake.set()
            except psycopg.Error as exc:
                logger.info("feed LISTEN connection lost (%s); polling only", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_LISTEN_BACKOFF_S)
