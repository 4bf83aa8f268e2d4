"""The change feed: every addition or removal of an embedding, in one order for all.

A writer calls :func:`record` as the *last* statement of the transaction that changes
embeddings, so the feed's rows commit with the change or not at all. Followers
(:mod:`app.services.follower`) read the rows past the last ``seq`` they applied.

The outbox trap. A sequence hands out numbers when a row is inserted, not when it
commits: writer A takes 7, writer B takes 8 and commits first, a follower reads 8 and
moves its position past 7, and A's change, committed a moment later, is never applied.
Here the numbers are taken in commit order:

- PostgreSQL: :func:`record` first takes a transaction-level advisory lock
  (``pg_advisory_xact_lock``), held until the transaction ends, and only then inserts
  (drawing from the sequence). A second writer waits at the lock until the first has
  committed or rolled back, so a row with a higher ``seq`` never commits before one with
  a lower ``seq``. Writers of embeddings queue behind each other only for the time
  between their feed insert and their commit, which is why the insert comes last.
- SQLite: a database has one writer at a time; a write transaction holds the database's
  write lock from its first write to its commit, so the same holds without more.

A number taken by a transaction that rolls back leaves a gap; gaps are harmless because
followers never wait for a number, they only read what has committed.

On PostgreSQL the same transaction sends ``NOTIFY convirt_changes``: it is delivered on
commit and wakes the followers at once; they also poll, so a lost notification only
delays a change by one poll interval.

Pruning. Every change adds a row, so the feed would grow for ever. :func:`prune` deletes
the records older than a retention period, always keeping the newest one (so that
:func:`head` stays right), and raises the floor (``feed_floor``) to the last deleted
``seq`` in the same transaction. A follower whose position is below the floor missed
records it can no longer read, and rebuilds its index from the stored embeddings; one
that was down for less than the retention period replays the tail as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from sqlalchemy import CursorResult, delete, func, insert, select, text
from sqlalchemy.orm import Session

from app.models import Change, Embedding, FeedFloor, utcnow

#: The channel followers LISTEN on (PostgreSQL).
NOTIFY_CHANNEL: Final = "convirt_changes"
#: Key of the advisory lock that serialises feed writes (PostgreSQL); "feed" in ASCII.
FEED_LOCK_KEY: Final = 0x66656564
#: Records deleted per pruning transaction: writers wait on the feed's lock meanwhile, so
#: a first prune of millions of rows goes in short steps rather than one long one.
PRUNE_BATCH: Final = 10_000


@dataclass(frozen=True)
class ChangeRecord:
    """One feed row as a follower reads it."""

    seq: int
    op: str
    model_id: str | None
    image_id: int | None
    created_at: dt.datetime


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def record(
    session: Session, op: str, *, model_id: str | None, image_ids: Iterable[int | None]
) -> None:
    """Append one ``op`` record per image id to the feed, inside the caller's transaction.

    Call it last, just before the commit (see the module docstring). ``op`` is ``add``
    (with the model), ``remove`` (model None) or ``switch`` (image id None).
    """
    ids = list(image_ids)
    if not ids:
        return
    postgresql = _is_postgresql(session)
    if postgresql:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": FEED_LOCK_KEY})
    now = utcnow()
    session.execute(
        insert(Change),
        [{"op": op, "model_id": model_id, "image_id": i, "created_at": now} for i in ids],
    )
    if postgresql:
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})


def record_adds(session: Session, model_id: str, image_ids: Sequence[int]) -> None:
    """Record that ``image_ids`` got an embedding under ``model_id``."""
    record(session, "add", model_id=model_id, image_ids=image_ids)


def record_removes(session: Session, image_ids: Sequence[int]) -> None:
    """Record that ``image_ids`` were deleted with all their embeddings."""
    record(session, "remove", model_id=None, image_ids=image_ids)


def record_switch(session: Session, model_id: str) -> None:
    """Record that ``model_id`` is now the active model."""
    record(session, "switch", model_id=model_id, image_ids=[None])


def head(session: Session) -> int:
    """The newest committed ``seq``, 0 for an empty feed."""
    return int(session.scalar(select(func.coalesce(func.max(Change.seq), 0))) or 0)


def read_tail(session: Session, after: int, limit: int) -> list[ChangeRecord]:
    """Up to ``limit`` committed records with ``seq > after``, in ``seq`` order."""
    rows = session.execute(
        select(Change.seq, Change.op, Change.model_id, Change.image_id, Change.created_at)
        .where(Change.seq > after)
        .order_by(Change.seq)
        .limit(limit)
    ).all()
    return [
        ChangeRecord(
            int(seq), str(op), model_id, None if image_id is None else int(image_id), created
        )
        for seq, op, model_id, image_id, created in rows
    ]


def floor(session: Session) -> int:
    """The highest ``seq`` that may have been pruned; 0 when nothing ever was."""
    return int(session.scalar(select(FeedFloor.seq).where(FeedFloor.id == 1)) or 0)


def prune(session: Session, before: dt.datetime, *, limit: int = PRUNE_BATCH) -> int:
    """Delete the oldest ``limit`` records created before ``before``, never the newest
    record; returns how many went. Raises the floor to the last deleted ``seq``, in the
    caller's transaction. Fewer than ``limit`` deleted means none is left to prune.
    """
    if _is_postgresql(session):
        # Writers wait meanwhile: the head read here cannot move under the delete.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": FEED_LOCK_KEY})
    newest = head(session)
    oldest = (
        select(Change.seq)
        .where(Change.created_at < before, Change.seq < newest)
        .order_by(Change.seq)
        .limit(limit)
        .subquery()
    )
    last_old = session.scalar(select(func.max(oldest.c.seq)))
    if last_old is None:
        return 0
    new_floor = int(last_old)
    result = session.execute(delete(Change).where(Change.seq <= new_floor))
    deleted = cast(CursorResult[Any], result).rowcount
    current = session.get(FeedFloor, 1)
    if current is None:
        session.add(FeedFloor(id=1, seq=new_floor))
    elif new_floor > current.seq:
        current.seq = new_floor
    return int(deleted or 0)


def head_and_count(session: Session, model_id: str) -> tuple[int, int]:
    """The feed's head and the number of stored embeddings of ``model_id``, read together.

    One statement, so both come from one snapshot on either backend (SQLite's driver
    runs each SELECT outside a transaction; PostgreSQL's READ COMMITTED takes a snapshot
    per statement).
    """
    heads = select(func.coalesce(func.max(Change.seq), 0)).scalar_subquery()
    counts = (
        select(func.count())
        .select_from(Embedding)
        .where(Embedding.model_id == model_id)
        .scalar_subquery()
    )
    row = session.execute(select(heads, counts)).one()
    return int(row[0]), int(row[1])
