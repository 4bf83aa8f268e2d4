"""The evaluation job queue: ``evaluation_runs`` rows, claimed by worker processes.

Why the table and not a job-queue library: the runs already live in ``evaluation_runs``
(the API lists them, with progress and results), the queue must work on SQLite (the
embedded default) and PostgreSQL alike, and one run at a time is the only scheduling
rule. A dozen lines of SQL per backend do that; a broker would be a new service to run.

- **Claim.** On PostgreSQL a worker takes a transaction-level advisory lock (claims take
  turns, so "is one running already?" and "take the oldest queued" are one step), then
  ``SELECT … FOR UPDATE SKIP LOCKED`` picks the oldest queued run of its model. On SQLite
  one conditional ``UPDATE … WHERE id = (oldest queued) AND NOT EXISTS (a running run)
  RETURNING id`` does it: a statement runs under the database's write lock.
- **Lease.** A claimed run holds a lease (``lease_expires_at``) that its worker renews
  every third of :data:`LEASE_S`. A worker that dies stops renewing; once the lease has
  passed, the next claim (by any worker) first *reaps* it: queued again for a second
  attempt, or failed (``interrupted``) after :data:`MAX_ATTEMPTS`. A run is never left
  ``running`` without a live worker.
- **One at a time.** A claim succeeds only while no run is ``running``: across every
  process, because the check and the claim are one atomic step on either backend.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from typing import Final

from sqlalchemy import exists, select, text, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.models import EvaluationRun, utcnow

logger = logging.getLogger(__name__)

#: Seconds a claim lasts without renewal.
LEASE_S: Final = 30.0
#: A run is tried at most this often (the first run and one retry).
MAX_ATTEMPTS: Final = 2
#: Key of the advisory lock claims take on PostgreSQL; "jobs" in ASCII.
CLAIM_LOCK_KEY: Final = 0x6A6F6273


def worker_name() -> str:
    """``host:pid:thread`` of the calling thread: unique among live workers."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{threading.get_ident() % 100000}"


class JobQueue:
    """Claims, lease renewals and reaping of evaluation runs."""

    def __init__(self, sessions: sessionmaker[Session], *, lease_s: float = LEASE_S) -> None:
        self.sessions = sessions
        self.lease_s = lease_s

    def _postgresql(self, session: Session) -> bool:
        return session.get_bind().dialect.name == "postgresql"

    def reap(self, session: Session, now: dt.datetime) -> None:
        """Requeue (or fail, after the last attempt) running runs whose lease passed."""
        expired = (EvaluationRun.status == "running") & (
            EvaluationRun.lease_expires_at.is_(None) | (EvaluationRun.lease_expires_at < now)
        )
        lost = session.scalars(select(EvaluationRun.id).where(expired)).all()
        if not lost:
            return
        session.execute(
            update(EvaluationRun)
            .where(expired, EvaluationRun.attempts < MAX_ATTEMPTS)
            .values(status="queued", worker=None, lease_expires_at=None, progress=0.0)
        )
        session.execute(
            update(EvaluationRun)
            .where(expired)
            .values(
                status="failed",
                worker=None,
                lease_expires_at=None,
                finished_at=now,
                error="interrupted: its worker stopped before the run finished",
            )
        )
        logger.warning("evaluation runs %s lost their worker", sorted(int(i) for i in lost))

    def reap_now(self) -> None:
        with self.sessions() as session, session.begin():
            self._lock(session)
            self.reap(session, utcnow())

    def _lock(self, session: Session) -> None:
        if self._postgresql(session):
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})

    def claim(self, worker: str, model_id: str) -> int | None:
        """Claim the oldest queued run of ``model_id`` if none is running; its id, or None."""
        now = utcnow()
        lease = now + dt.timedelta(seconds=self.lease_s)
        claimed = {
            "status": "running",
            "worker": worker,
            "lease_expires_at": lease,
            "attempts": EvaluationRun.attempts + 1,
            "started_at": now,
            "progress": 0.0,
        }
        with self.sessions() as session, session.begin():
            self._lock(session)
            self.reap(session, now)
            # Aliases: subqueries of the UPDATE must not correlate with the updated row.
            queued, other = aliased(EvaluationRun), aliased(EvaluationRun)
            oldest = (
                select(queued.id)
                .where(queued.status == "queued", queued.model_id == model_id)
                .order_by(queued.id)
                .limit(1)
            )
            running = exists().where(other.status == "running")
            if self._postgresql(session):
                if session.scalar(select(running)):
                    return None
                run_id = session.scalar(oldest.with_for_update(skip_locked=True))
                if run_id is None:
                    return None
                session.execute(
                    update(EvaluationRun).where(EvaluationRun.id == run_id).values(**claimed)
                )
            else:
                run_id = session.scalar(
                    update(EvaluationRun)
                    .where(EvaluationRun.id == oldest.scalar_subquery(), ~running)
                    .values(**claimed)
                    .returning(EvaluationRun.id)
                )
                if run_id is None:
                    return None
        logger.info("evaluation %d claimed by %s", run_id, worker)
        return int(run_id)

    def renew(self, run_id: int, worker: str) -> bool:
        """Extend the lease of a run this worker holds; False when it no longer holds it."""
        lease = utcnow() + dt.timedelta(seconds=self.lease_s)
        with self.sessions() as session, session.begin():
            held = session.execute(
                update(EvaluationRun)
                .where(
                    EvaluationRun.id == run_id,
                    EvaluationRun.worker == worker,
                    EvaluationRun.status == "running",
                )
                .values(lease_expires_at=lease)
            )
            return bool(held.rowcount)  # type: ignore[attr-defined]

    def active_run(self) -> int | None:
        """A queued or running run (after reaping lost ones), or None."""
        with self.sessions() as session:
            run_id = session.scalar(
                select(EvaluationRun.id)
                .where(EvaluationRun.status.in_(("queued", "running")))
                .order_by(EvaluationRun.id)
                .limit(1)
            )
        return None if run_id is None else int(run_id)
