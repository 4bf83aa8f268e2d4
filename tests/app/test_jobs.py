"""The evaluation job queue on both backends: claims, leases, reaping, one at a time.

Each :class:`JobQueue` here has an engine of its own, as a separate worker process would.
The last test runs two real ``convirt worker`` processes and kills one mid-run.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import create_engine_for_url, session_factory, upgrade_database
from app.models import EncoderModel, EvaluationRun, utcnow
from app.services.jobs import MAX_ATTEMPTS, JobQueue
from tests.app.process_support import PROJECT_ROOT, process_env, settings_options

MODEL = "sha256:" + "a" * 64


@pytest.fixture
def makers(database_url: str) -> Iterator[list[sessionmaker[Session]]]:
    """Four session factories on four engines: four 'processes' on one database."""
    upgrade_database(database_url)
    engines = [create_engine_for_url(database_url) for _ in range(4)]
    yield [session_factory(engine) for engine in engines]
    for engine in engines:
        engine.dispose()


def _queue_runs(sessions: sessionmaker[Session], count: int, model_id: str = MODEL) -> list[int]:
    with sessions() as session, session.begin():
        runs = [
            EvaluationRun(model_id=model_id, protocol="stored", params={}, status="queued")
            for _ in range(count)
        ]
        session.add_all(runs)
        session.flush()
        return [run.id for run in runs]


def _status(sessions: sessionmaker[Session], run_id: int) -> EvaluationRun:
    with sessions() as session:
        run = session.get(EvaluationRun, run_id)
        assert run is not None
        return run


def _finish(sessions: sessionmaker[Session], run_id: int) -> None:
    with sessions() as session, session.begin():
        run = session.get(EvaluationRun, run_id)
        assert run is not None
        run.status = "succeeded"
        run.finished_at = utcnow()


def test_one_run_at_a_time_across_workers(makers: list[sessionmaker[Session]]) -> None:
    first, second = JobQueue(makers[0]), JobQueue(makers[1])
    ids = _queue_runs(makers[0], 3)
    assert first.claim("a", MODEL) == ids[0]
    # The other worker finds a run running: it claims nothing, the oldest queued waits.
    assert second.claim("b", MODEL) is None
    run = _status(makers[0], ids[0])
    assert (run.status, run.worker, run.attempts) == ("running", "a", 1)
    assert run.lease_expires_at is not None
    assert run.lease_expires_at > utcnow()
    _finish(makers[0], ids[0])
    assert second.claim("b", MODEL) == ids[1]
    # A worker of another model never takes a run of this one.
    _finish(makers[0], ids[1])
    assert first.claim("a", "sha256:" + "b" * 64) is None
    assert first.claim("a", MODEL) == ids[2]


def test_simultaneous_claims_take_exactly_one(makers: list[sessionmaker[Session]]) -> None:
    _queue_runs(makers[0], 2)
    queues = [JobQueue(m) for m in makers]
    start = threading.Barrier(len(queues))
    claimed: list[int | None] = [None] * len(queues)

    def claim(position: int) -> None:
        start.wait()
        claimed[position] = queues[position].claim(f"w{position}", MODEL)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(queues))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len([c for c in claimed if c is not None]) == 1
    with makers[0]() as session:
        running = session.scalars(
            select(EvaluationRun.id).where(EvaluationRun.status == "running")
        ).all()
    assert running == [c for c in claimed if c is not None]


def test_a_lost_lease_is_retried_once_then_failed(makers: list[sessionmaker[Session]]) -> None:
    queue = JobQueue(makers[0], lease_s=0.2)
    other = JobQueue(makers[1], lease_s=0.2)
    (run_id,) = _queue_runs(makers[0], 1)
    assert queue.claim("dies", MODEL) == run_id
    assert queue.renew(run_id, "dies")
    # The worker dies: no more renewals. Once the lease has passed, another worker's
    # claim reaps the run and, with an attempt left, takes it itself.
    time.sleep(0.3)
    assert other.claim("survivor", MODEL) == run_id
    run = _status(makers[0], run_id)
    assert (run.status, run.worker, run.attempts) == ("running", "survivor", MAX_ATTEMPTS)
    # The dead worker cannot renew what it lost.
    assert not queue.renew(run_id, "dies")
    time.sleep(0.3)
    other.reap_now()
    run = _status(makers[0], run_id)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error.startswith("interrupted")
    assert run.lease_expires_at is None
    assert other.claim("survivor", MODEL) is None


def test_a_running_run_without_a_lease_is_reaped(makers: list[sessionmaker[Session]]) -> None:
    # As a run left by a version without leases: running, no lease, no worker.
    with makers[0]() as session, session.begin():
        run = EvaluationRun(
            model_id=MODEL,
            protocol="stored",
            params={},
            status="running",
            started_at=utcnow() - dt.timedelta(hours=1),
        )
        session.add(run)
        session.flush()
        run_id = run.id
    JobQueue(makers[1]).reap_now()
    assert _status(makers[0], run_id).status == "queued"


STORED_PARAMS = {
    "categories": ["No Finding", "Pneumonia"],
    "candidates_per_category": 5,
    "queries_per_category": 2,
    "seed": 3,
    "ks": [1, 5],
    "backbone": True,
    "random_repeats": 5,
    "text_queries": "built-in",
}


def _ingest_labelled(
    folder: Path,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
    options: list[str],
) -> None:
    """Store the labelled radiographs with ``convirt ingest`` of a manifest."""
    folder.mkdir()
    lines = []
    for i, (data, labels) in enumerate(kermany_images):
        (folder / f"study{i:02d}.png").write_bytes(data)
        record = {"image": f"study{i:02d}.png", "labels": labels, "report": ""}
        lines.append(json.dumps({**record, "patient_id": f"p{i}"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "ingest", str(manifest), "--no-progress", *options],
        capture_output=True,
        text=True,
        env=process_env(),
        cwd=PROJECT_ROOT,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _watch_and_kill_one(
    sessions: sessionmaker[Session], ids: list[int], workers: list[subprocess.Popen[bytes]]
) -> tuple[int, bool]:
    """Poll the runs until all ended; SIGKILL the worker of the first one seen running.

    Returns the most runs ever seen running at once, and whether a worker was killed.
    """
    most_running, killed = 0, False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with sessions() as session:
            rows = session.execute(
                select(EvaluationRun.status, EvaluationRun.worker).where(EvaluationRun.id.in_(ids))
            ).all()
        running = [r for r in rows if r.status == "running"]
        most_running = max(most_running, len(running))
        if running and not killed:
            # Its lease must run out and the run be taken again, not stay "running".
            pid = int(str(running[0].worker).split(":")[1])
            next(w for w in workers if w.pid == pid).send_signal(signal.SIGKILL)
            killed = True
        if all(r.status in ("succeeded", "failed") for r in rows):
            break
        time.sleep(0.05)
    return most_running, killed


@pytest.mark.slow
def test_two_worker_processes_never_run_two_evaluations_at_once(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    options = settings_options(
        data_dir=tmp_path / "data",
        database_url=database_url,
        bundle_dir=bundle_dir,
        index_dir=tmp_path / "index",
    )
    _ingest_labelled(tmp_path / "incoming", kermany_images, options)
    engine = create_engine_for_url(database_url)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        model_id = session.scalar(select(EncoderModel.id).where(EncoderModel.is_active))
        assert model_id is not None
        runs = [
            EvaluationRun(
                model_id=model_id, protocol="stored", params=STORED_PARAMS, status="queued"
            )
            for _ in range(3)
        ]
        session.add_all(runs)
        session.flush()
        ids = [run.id for run in runs]
    logs = [(tmp_path / f"worker{i}.log").open("wb") for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=process_env(CONVIRT_EVALUATION_LEASE_S="3"),
            cwd=PROJECT_ROOT,
        )
        for log in logs
    ]
    try:
        most_running, killed = _watch_and_kill_one(sessions, ids, workers)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=90)
        for log in logs:
            log.close()
    with sessions() as session:
        final = {
            run.id: (run.status, run.attempts, run.error)
            for run in session.scalars(select(EvaluationRun).where(EvaluationRun.id.in_(ids)))
        }
    engine.dispose()
    assert killed
    assert most_running == 1
    # The killed run was retried by the surviving worker; every run finished.
    assert final[ids[0]][:2] == ("succeeded", 2), final
    assert [final[i][0] for i in ids[1:]] == ["succeeded", "succeeded"], final
