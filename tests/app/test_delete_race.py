"""A delete racing a re-upload of the same bytes: the survivor keeps its files.

The interleaving that lost files: the delete commits, the re-upload (finding no row)
writes the same content-hash-named files and commits its row, then the delete removes
"its" files, which are now the new row's. The test forces exactly that order with hooks:
the re-upload is started from inside the delete, right where the files are removed, and
the delete goes on once the upload has either committed or is waiting for the store lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from app.models import Image
from app.services.ingest import IngestItem, IngestResult
from model.bundle import EncoderBundle
from tests.app.service_support import (
    assert_consistent,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

WAIT_S = 60.0


def test_a_reupload_during_a_delete_keeps_its_files(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = noise_png(7)
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        first = upload(client, [data]).json()["results"][0]["id"]

        upload_may_proceed = threading.Event()
        results: list[IngestResult] = []

        def reupload() -> None:
            try:
                results.extend(runtime.ingest.ingest([IngestItem(data=data)]))
            finally:
                upload_may_proceed.set()

        uploader = threading.Thread(target=reupload, name="reupload")
        real_lock = runtime.store.lock
        real_delete = runtime.store.delete

        def lock(hashes: Iterable[str]) -> AbstractContextManager[None]:
            if threading.current_thread() is uploader:
                upload_may_proceed.set()  # the upload now waits for the delete's lock
            return real_lock(hashes)

        def delete(*relatives: str | None) -> None:
            # The delete has committed: the re-upload starts now and finds no row.
            uploader.start()
            assert upload_may_proceed.wait(WAIT_S)
            real_delete(*relatives)

        monkeypatch.setattr(runtime.store, "lock", lock)
        monkeypatch.setattr(runtime.store, "delete", delete)
        assert client.delete(f"/images/{first}").status_code == 204
        uploader.join(WAIT_S)
        assert not uploader.is_alive()

        assert [r.status for r in results] == ["created"]
        second = results[0].image_id
        assert second is not None
        assert second != first
        with runtime.sessions() as session:
            row = session.get(Image, second)
            assert row is not None
            assert runtime.store.path(row.image_path).is_file()
            assert runtime.store.path(row.thumbnail_path).is_file()
        assert client.get(f"/images/{second}/thumbnail").status_code == 200
        assert client.get(f"/images/{first}").status_code == 404
        assert_consistent(runtime)
