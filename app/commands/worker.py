"""``convirt worker``: run evaluation jobs from the database's job queue.

Deployments run it beside the API replicas (with ``CONVIRT_EVALUATION_WORKER=false`` on
the replicas): it loads the encoder bundle, then claims queued evaluation runs one at a
time, across every worker process (:mod:`app.services.jobs`), until SIGTERM or Ctrl-C;
the run in progress is then cancelled and recorded as failed. A worker that is killed
outright leaves a lease that runs out: the run is queued again once, then failed.

Exit status: 0 after a clean stop, 1 when it cannot start, 2 for unusable settings.
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType
from typing import Any

from app.commands.serve import add_settings_arguments, command_settings, start_runtime

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run evaluation jobs from the database's queue",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = command_settings(args)
    if settings is None:
        return 2
    logging.getLogger().setLevel(settings.log_level)
    from app.services.evaluations import EvaluationJobs
    from app.services.job_worker import JobWorker

    runtime = start_runtime(settings)
    if runtime is None:
        return 1
    jobs = EvaluationJobs(lease_s=settings.evaluation_lease_s)
    worker = JobWorker(jobs, lambda: runtime)

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping after cancelling the run in progress", signum)
        worker.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.start()
        # The main thread only waits: signal handlers run here, the work in the thread.
        while worker.running():
            worker.join(0.5)
    finally:
        worker.stop(timeout=60)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runtime.close()
    return 0
