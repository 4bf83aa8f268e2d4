"""Faults of the machine: a database outage answers 503, a full disk 507, never 500.

Nothing that got a 201 is lost, and the database, the index and the files agree once
the fault has passed.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from app.api.problems import fault_problem
from app.models import Image
from app.services.runtime import Runtime
from app.services.store import ImageStore
from index import VectorIndex
from model.bundle import EncoderBundle
from tests.app.conftest import throwaway_cluster
from tests.app.service_support import (
    assert_consistent,
    is_problem,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

WAIT_S = 90.0


def _files_of_every_row_exist(runtime: Runtime) -> None:
    with runtime.sessions() as session:
        for image_path, thumbnail_path in session.execute(
            select(Image.image_path, Image.thumbnail_path)
        ):
            assert runtime.store.path(image_path).is_file()
            assert runtime.store.path(thumbnail_path).is_file()


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + WAIT_S
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.2)


def _mapped(exc: BaseException) -> tuple[int, str, dict[str, str] | None] | None:
    problem = fault_problem(exc)
    return None if problem is None else (problem.status, problem.code, problem.headers)


def test_faults_map_to_503_and_507_and_nothing_else_does() -> None:
    full = (507, "insufficient_storage", None)
    unavailable = (503, "database_unavailable", {"Retry-After": "5"})
    assert _mapped(OSError(errno.ENOSPC, "No space left on device")) == full
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    assert _mapped(sa_exc.OperationalError("COMMIT", {}, sqlite_full)) == full
    locked = sqlite3.OperationalError("database is locked")
    assert _mapped(sa_exc.OperationalError("SELECT", {}, locked)) == unavailable
    assert _mapped(OSError(errno.EACCES, "Permission denied")) is None
    assert _mapped(ValueError("a bug")) is None


def test_a_full_disk_answers_507_and_deletes_still_work(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        created = upload(client, [noise_png(1), noise_png(2)]).json()["results"]
        kept, deleted = created[0]["id"], created[1]["id"]

        def disk_full(self: ImageStore, relative: str, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", relative)

        monkeypatch.setattr(ImageStore, "_write_atomic", disk_full)
        for seed in (3, 4):
            is_problem(upload(client, [noise_png(seed)]), 507, "insufficient_storage")
        assert client.delete(f"/images/{deleted}").status_code == 204
        assert client.get(f"/images/{deleted}").status_code == 404
        found = client.post("/search/text", json={"query": "pleural effusion", "k": 5})
        assert found.status_code == 200
        assert [hit["image_id"] for hit in found.json()["hits"]] == [kept]
        assert client.get(f"/images/{kept}/thumbnail").status_code == 200
        assert_consistent(runtime)
        _files_of_every_row_exist(runtime)

        monkeypatch.undo()
        assert upload(client, [noise_png(3)]).status_code == 201
        assert_consistent(runtime)


def _upload_until(client: TestClient, stop: threading.Event, seen: list[Any]) -> None:
    seed = 1000
    while not stop.is_set():
        response = upload(client, [noise_png(seed)])
        seen.append(response)
        seed += 1


def _count(seen: list[Any], status: int) -> int:
    return sum(r.status_code == status for r in list(seen))


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.postgres
def test_postgres_stopped_and_restarted_under_uploads(
    tmp_path: Path, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    # Its own cluster: stopping the session's one would break the tests that share it.
    with throwaway_cluster(durable=True) as server:
        with server.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("outage")))
        settings = make_settings(tmp_path / "data", server.url("outage"), bundle_dir)
        with running_app(settings, bundle) as client:
            runtime = runtime_of(client)
            seen: list[Any] = []
            stop = threading.Event()
            uploader = threading.Thread(target=_upload_until, args=(client, stop, seen))
            uploader.start()
            try:
                _wait_for(lambda: _count(seen, 201) >= 2, "uploads before the outage")
                server.stop("immediate")
                before = len(seen)
                _wait_for(lambda: _count(seen[before:], 503) >= 3, "uploads during the outage")
                searched = client.post("/search/text", json={"query": "effusion", "k": 3})
                is_problem(searched, 503, "database_unavailable")
                assert searched.headers["retry-after"] == "5"
                is_problem(client.get("/images/1"), 503, "database_unavailable")
                is_problem(client.get("/ready"), 503, "database_unavailable")
                server.start()
                after = len(seen)
                _wait_for(lambda: _count(seen[after:], 201) >= 2, "uploads after the restart")
            finally:
                stop.set()
                uploader.join(WAIT_S)
            for response in seen:
                assert response.status_code in (201, 503), response.text
                if response.status_code == 503:
                    is_problem(response, 503, "database_unavailable")
                    assert response.headers["retry-after"] == "5"
            _wait_ready(client)
            assert_consistent(runtime)
            _files_of_every_row_exist(runtime)
            stored = {r.json()["results"][0]["id"] for r in seen if r.status_code == 201}
            for image_id in stored:
                assert client.get(f"/images/{image_id}").status_code == 200


def test_a_restart_on_a_full_disk_serves_the_rebuilt_index_and_saves_it_later(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        created = upload(client, [noise_png(seed) for seed in range(3)]).json()["results"]
    ids = sorted(r["id"] for r in created)
    shutil.rmtree(settings.index_dir)  # lost: the start-up must rebuild it and save it
    real_save = VectorIndex.save

    def disk_full(self: VectorIndex, directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(VectorIndex, "save", disk_full)
    with running_app(settings, bundle) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert "No space left on device" in " ".join(ready.json()["notes"])
        found = client.post("/search/text", json={"query": "consolidation", "k": 5})
        assert found.status_code == 200
        assert sorted(hit["image_id"] for hit in found.json()["hits"]) == ids

        monkeypatch.setattr(VectorIndex, "save", real_save)  # space is freed
        _wait_for(lambda: client.get("/ready").json()["notes"] == [], "the retried save")
    saved = VectorIndex.load(settings.index_dir, expected_model_id=bundle.model_id)
    assert saved.ids().tolist() == ids
