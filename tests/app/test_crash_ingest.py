"""A bulk ingest killed with SIGKILL mid-way leaves nothing the next start cannot fix.

``convirt ingest`` of a synthetic corpus runs in a subprocess and is killed once a few
batches are committed. The service then starts on the same data directory: after its
start-up reconcile the database and the index agree, no image is stored twice and every
row's files exist. Running the ingest again completes the corpus, again without
duplicates.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.models import Image
from model.bundle import EncoderBundle
from model.data.manifest import read_manifest
from model.data.synthetic import generate_corpus
from tests.app.service_support import (
    assert_consistent,
    make_settings,
    running_app,
    runtime_of,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CORPUS_SIZE = 96
BATCH_SIZE = 4
#: Kill once this many images are committed (several batches, far from the end).
KILL_AFTER = 3 * BATCH_SIZE


def _committed(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0) as conn:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not migrated yet, or locked for a moment


def _ingest_command(manifest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "ingest",
        str(manifest),
        "--batch-size",
        str(BATCH_SIZE),
        "--no-progress",
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_ingest_then_restart_and_rerun(
    tmp_path: Path, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    manifest = generate_corpus(tmp_path / "corpus", CORPUS_SIZE, seed=11, progress=False)
    records = read_manifest(manifest)
    distinct = {hashlib.sha256(r.image_path.read_bytes()).hexdigest() for r in records}
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, f"sqlite:///{data_dir / 'convirt.db'}", bundle_dir)
    env = {
        **os.environ,
        "CONVIRT_DATA_DIR": str(data_dir),
        "CONVIRT_DATABASE_URL": settings.database_url,
        "CONVIRT_BUNDLE_DIR": str(bundle_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    log = (tmp_path / "ingest1.log").open("wb")
    process = subprocess.Popen(
        _ingest_command(manifest), cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 600
        while _committed(data_dir / "convirt.db") < KILL_AFTER:
            if process.poll() is not None:
                pytest.fail(
                    f"ingest ended (status {process.returncode}) before it could be killed:\n"
                    + (tmp_path / "ingest1.log").read_text(errors="replace")
                )
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL
    interrupted = _committed(data_dir / "convirt.db")
    assert KILL_AFTER <= interrupted < len(distinct)

    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert_consistent(runtime)
        assert client.get("/ready").status_code == 200
        with runtime.sessions() as session:
            rows = session.execute(select(Image.content_hash, Image.image_path)).all()
            hashes = [h for h, _ in rows]
            assert len(hashes) == len(set(hashes)) == interrupted
            assert set(hashes) <= distinct
            for _, image_path in rows:
                assert runtime.store.path(image_path).is_file()

    done = subprocess.run(
        _ingest_command(manifest), cwd=PROJECT_ROOT, env=env, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")

    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert_consistent(runtime)
        with runtime.sessions() as session:
            count = session.scalar(select(func.count()).select_from(Image))
            stored = set(session.scalars(select(Image.content_hash)))
        assert count == len(distinct)
        assert stored == distinct
        assert client.get("/ready").json()["index_vectors"] == len(distinct)
