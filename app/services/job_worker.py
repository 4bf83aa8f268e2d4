"""A worker of the evaluation job queue: claims runs and executes them, one at a time.

The serving process runs one in a thread by default (``CONVIRT_EVALUATION_WORKER``), so
the embedded default (``make demo``, a bare ``convirt serve``) needs nothing more;
deployments turn that off on the API replicas and run ``convirt worker`` processes
instead. Workers wake on a local submission or poll the queue every second; while a run
executes, a second thread renews its lease, and cancels the run if the lease was lost
(the run was reaped because this worker stalled longer than the lease).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from sqlalchemy.exc import SQLAlchemyError

from app.services.evaluations import EvaluationJobs
from app.services.jobs import worker_name
from app.services.runtime import Runtime

logger = logging.getLogger(__name__)

#: Seconds between looks at the queue when nothing wakes the worker.
POLL_S: Final = 1.0


class JobWorker:
    """Claims and executes evaluation runs for the runtime ``runtime()`` returns."""

    def __init__(
        self,
        jobs: EvaluationJobs,
        runtime: Callable[[], Runtime | None],
        *,
        poll_s: float = POLL_S,
    ) -> None:
        self.jobs = jobs
        self.runtime = runtime
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancel: threading.Event | None = None

    def start(self) -> None:
        """Work in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run_forever, name="convirt-job-worker", daemon=True
        )
        self._thread.start()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; cancel the run in progress (it is recorded as failed)."""
        self._stop.set()
        self.jobs.submitted.set()
        cancel = self._cancel
        if cancel is not None:
            cancel.set()
        thread = self._thread
        # From a signal handler on the thread that waits for it: do not join yourself.
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def run_forever(self) -> None:
        """Claim and execute runs until :meth:`stop`."""
        name = worker_name()
        logger.info("evaluation worker %s started", name)
        while not self._stop.is_set():
            self.jobs.submitted.wait(self.poll_s)
            self.jobs.submitted.clear()
            runtime = self.runtime()
            if runtime is None or self._stop.is_set():
                continue
            try:
                run_id = self.jobs.queue(runtime.sessions).claim(name, runtime.bundle.model_id)
            except SQLAlchemyError as exc:
                # The database is away: the next round tries again.
                logger.warning("job claim failed: %s", type(exc).__name__)
                continue
            if run_id is not None:
                self._execute(runtime, run_id, name)
        logger.info("evaluation worker %s stopped", name)

    def _execute(self, runtime: Runtime, run_id: int, name: str) -> None:
        cancel = threading.Event()
        self._cancel = cancel
        finished = threading.Event()
        queue = self.jobs.queue(runtime.sessions)

        def renew() -> None:
            while not finished.wait(queue.lease_s / 3):
                try:
                    held = queue.renew(run_id, name)
                except SQLAlchemyError as exc:
                    # Retried at the next beat; the lease has two more beats of margin.
                    logger.warning("lease renewal of run %d failed: %s", run_id, type(exc).__name__)
                    continue
                if not held:
                    logger.error("run %d: lease lost to the reaper; cancelling it", run_id)
                    cancel.set()
                    return

        renewer = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
        renewer.start()
        try:
            self.jobs.execute(runtime, run_id, cancel)
        finally:
            finished.set()
            renewer.join()
            self._cancel = None
