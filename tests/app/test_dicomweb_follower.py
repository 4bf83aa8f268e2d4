"""``convirt follow-dicomweb`` against a real Orthanc: STOW-RS in, followed, searchable."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from app import cli
from app.models import DicomwebCursor, DicomwebSeries, Image
from app.services.dicomweb_follower import (
    DicomwebFollower,
    as_part10,
    http_session,
    multipart_parts,
)
from app.services.runtime import Runtime
from app.settings import Settings
from model.bundle import EncoderBundle
from tests.app.dicom_support import kermany_pixels, real_cr_path, synthetic_dicom
from tests.app.orthanc_support import PASSWORD, USER, Orthanc, running_orthanc
from tests.app.process_support import free_port
from tests.app.service_support import assert_consistent, make_settings, running_app

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def runtime(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[Runtime]:
    settings = make_settings(
        tmp_path / "data",
        database_url,
        bundle_dir,
        dicomweb_username=USER,
        dicomweb_password=PASSWORD,
    )
    runtime = Runtime.start(settings, bundle=bundle)
    try:
        yield runtime
    finally:
        runtime.close()


def _stow(orthanc: Orthanc, datasets: list[Dataset]) -> None:
    client = DICOMwebClient(orthanc.dicomweb, session=orthanc.session())
    client.store_instances(datasets)


def _study(shared_dir: Path, n: int, *, first: int = 0, modality: str = "DX") -> list[Dataset]:
    """``n`` radiographs of one study and series."""
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = synthetic_dicom(
            kermany_pixels(shared_dir, (first + i) % 16),
            modality=modality,
            study_uid=study,
            series_uid=series,
        )
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def _images(runtime: Runtime) -> list[Image]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Image).order_by(Image.id)))


@pytest.mark.parametrize("mode", ["orthanc", "qido"])
def test_stowed_radiographs_are_followed_and_searchable(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path, bundle: EncoderBundle, mode: str
) -> None:
    real = pydicom.dcmread(real_cr_path())
    radiographs = [real, *_study(shared_dir, 2)]
    ct = synthetic_dicom(kermany_pixels(shared_dir, 5), modality="CT")
    colour = synthetic_dicom(kermany_pixels(shared_dir, 6), modality="DX", colour=True)
    _stow(orthanc, [*radiographs, ct, colour])

    follower = DicomwebFollower(runtime, orthanc.dicomweb, mode=mode)  # type: ignore[arg-type]
    follower.poll_once()

    rows = _images(runtime)
    assert sorted(str(r.study_instance_uid) for r in rows) == sorted(
        str(ds.StudyInstanceUID) for ds in radiographs
    )
    assert follower.counts["created"] == 3
    # The colour DX is fetched (it is a DX) but the decoder refuses it; the CT is never
    # fetched by the change feed, and never found by a CR/DX search.
    assert follower.counts["failed"] == 1
    if mode == "orthanc":
        assert follower.counts["not_a_radiograph"] == 1
    assert_consistent(runtime)

    # A second pass resumes where the first stopped: nothing is fetched again.
    assert follower.poll_once() == 0
    # A new instance is fetched alone.
    late = _study(shared_dir, 1, first=9, modality="CR")
    _stow(orthanc, late)
    assert follower.poll_once() == 1
    assert len(_images(runtime)) == 4

    settings = runtime.settings.model_copy(
        update={
            "viewer_url_template": "https://pacs.test/ohif/viewer?StudyInstanceUIDs={study_instance_uid}"
        }
    )
    with running_app(settings, bundle) as client:
        response = client.post("/search/text", json={"query": "consolidation", "k": 10})
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        assert {h["study_instance_uid"] for h in hits} == {
            str(r.study_instance_uid) for r in _images(runtime)
        }
        assert all(h["viewer_url"].endswith(h["study_instance_uid"]) for h in hits)
        # The patient module travelled through Orthanc; none of it comes out.
        assert "SYN-0001" not in response.text
        assert "Synthetic" not in response.text


def test_cursor_is_kept_in_the_database(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path
) -> None:
    _stow(orthanc, _study(shared_dir, 2))
    DicomwebFollower(runtime, orthanc.dicomweb).poll_once()
    with runtime.sessions() as session:
        cursor = session.get(DicomwebCursor, orthanc.dicomweb)
        assert cursor is not None
        assert cursor.last_change > 0
    # A new follower (a restart) starts at the stored cursor: it fetches nothing.
    again = DicomwebFollower(runtime, orthanc.dicomweb)
    assert again.cursor() == cursor.last_change
    assert again.poll_once() == 0
    assert again.counts["fetched"] == 0

    DicomwebFollower(runtime, orthanc.dicomweb, mode="qido").poll_once()
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DicomwebSeries)) == 1
    assert len(_images(runtime)) == 2


def test_a_study_deleted_on_the_pacs_is_not_resurrected(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path
) -> None:
    kept, deleted_early, deleted_late = (
        _study(shared_dir, 1, first=0),
        _study(shared_dir, 2, first=2),
        _study(shared_dir, 1, first=4),
    )
    _stow(orthanc, [*kept, *deleted_late])
    follower = DicomwebFollower(runtime, orthanc.dicomweb)
    follower.poll_once()
    assert len(_images(runtime)) == 2

    # Deleted on the PACS before the follower saw it: never fetched.
    _stow(orthanc, deleted_early)
    orthanc.delete_study(str(deleted_early[0].StudyInstanceUID))
    # Deleted on the PACS and here after it was ingested: not brought back.
    orthanc.delete_study(str(deleted_late[0].StudyInstanceUID))
    [late_row] = [
        r for r in _images(runtime) if r.study_instance_uid == str(deleted_late[0].StudyInstanceUID)
    ]
    assert runtime.delete_image(late_row.id)

    for mode in ("orthanc", "qido"):
        DicomwebFollower(runtime, orthanc.dicomweb, mode=mode).poll_once()
    assert [r.study_instance_uid for r in _images(runtime)] == [str(kept[0].StudyInstanceUID)]
    assert follower.counts["deleted_on_server"] == 0
    assert_consistent(runtime)


def test_a_crash_between_commit_and_cursor_duplicates_nothing(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study(shared_dir, 5)
    _stow(orthanc, study)
    follower = DicomwebFollower(runtime, orthanc.dicomweb, batch_size=2)
    saves = 0
    original = DicomwebFollower._save_cursor

    def crash_on_second_save(self: DicomwebFollower, seq: int) -> int:
        nonlocal saves
        saves += 1
        if saves == 2:
            # The second batch is committed; the process dies before its cursor is saved.
            raise KeyboardInterrupt
        return original(self, seq)

    monkeypatch.setattr(DicomwebFollower, "_save_cursor", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        follower.poll_once()
    assert len(_images(runtime)) == 4
    monkeypatch.undo()

    restarted = DicomwebFollower(runtime, orthanc.dicomweb, batch_size=2)
    restarted.poll_once()
    # Only the batch whose cursor was lost is fetched again; it dedupes by content hash.
    assert restarted.counts["fetched"] == 3
    assert restarted.counts["existing"] == 2
    assert restarted.counts["created"] == 1
    rows = _images(runtime)
    assert len(rows) == 5
    assert len({r.content_hash for r in rows}) == 5
    assert_consistent(runtime)


@pytest.mark.slow
def test_killing_the_follower_mid_study_loses_and_duplicates_nothing(
    orthanc: Orthanc, tmp_path: Path, sqlite_url: str, bundle_dir: Path, shared_dir: Path
) -> None:
    n = 24
    study = _study(shared_dir, n)
    _stow(orthanc, study)
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "CONVIRT_DATA_DIR": str(tmp_path / "data"),
        "CONVIRT_DATABASE_URL": sqlite_url,
        "CONVIRT_BUNDLE_DIR": str(bundle_dir),
        "CONVIRT_DICOMWEB_USERNAME": USER,
        "CONVIRT_DICOMWEB_PASSWORD": PASSWORD,
    }
    command = [sys.executable, "-m", "app.cli", "follow-dicomweb", orthanc.dicomweb, "--once"]
    engine = sa.create_engine(sqlite_url)

    def stored() -> int:
        try:
            with engine.connect() as conn:
                return int(conn.scalar(select(func.count()).select_from(Image)) or 0)
        except sa.exc.OperationalError:  # not migrated yet
            return 0

    try:
        first = subprocess.Popen([*command, "--batch-size", "1"], env=env, cwd=tmp_path)
        deadline = time.monotonic() + 300
        while stored() < 3:
            assert first.poll() is None, "the follower ended before it could be killed"
            assert time.monotonic() < deadline, "the follower stored nothing in time"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        before = stored()
        assert before < n, "the follower finished before it was killed"

        done = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr
        counts = json.loads(done.stdout.strip().splitlines()[-1])
        # The restart fetches what was not committed, plus at most the one batch (of one)
        # whose cursor the kill may have cut off.
        assert n - before <= counts["fetched"] <= n - before + 1
        with engine.connect() as conn:
            hashes = conn.execute(select(Image.content_hash, Image.study_instance_uid)).all()
        assert len(hashes) == n
        assert len({h for h, _ in hashes}) == n
        assert {uid for _, uid in hashes} == {str(study[0].StudyInstanceUID)}
    finally:
        engine.dispose()


def test_command_refuses_credentials_in_the_url(tmp_path: Path) -> None:
    url = "http://user:secret@127.0.0.1:1/dicom-web"
    assert cli.main(["follow-dicomweb", url, "--once", "--data-dir", str(tmp_path)]) == 2
    assert cli.main(["follow-dicomweb", "ftp://pacs/dicom-web", "--data-dir", str(tmp_path)]) == 2


def test_multipart_bodies_are_split_exactly() -> None:
    boundary = "b0undary"
    first, second = b"DICM\r\n\r\nbinary\r\n-- not a boundary", b"\x00\x01\r\n"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + first
        + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + second
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    assert multipart_parts(content_type, body) == [first, second]
    assert multipart_parts("application/dicom", b"raw") == [b"raw"]
    assert multipart_parts("multipart/related", body) == []


def test_files_without_a_preamble_become_part10(shared_dir: Path) -> None:
    ds = synthetic_dicom(kermany_pixels(shared_dir, 0), modality="DX")
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds)  # no preamble, no DICM: as STOW-RS clients may send
    assert bare.getvalue()[128:132] != b"DICM"
    fixed = as_part10(bare.getvalue())
    assert fixed[128:132] == b"DICM"
    assert as_part10(fixed) is fixed
    assert as_part10(bare.getvalue()) == fixed
    assert pydicom.dcmread(io.BytesIO(fixed)).SOPInstanceUID == ds.SOPInstanceUID


def test_a_stop_mid_page_resumes_exactly_where_it_stopped(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stow(orthanc, _study(shared_dir, 5))
    stop = threading.Event()
    original = DicomwebFollower._fetch_orthanc_instance

    def stop_after_two(self: DicomwebFollower, root: str, orthanc_id: str) -> Any:
        item = original(self, root, orthanc_id)
        if self.counts["fetched"] == 2:
            stop.set()  # SIGTERM arrives while the page is being handled
        return item

    monkeypatch.setattr(DicomwebFollower, "_fetch_orthanc_instance", stop_after_two)
    first = DicomwebFollower(runtime, orthanc.dicomweb, batch_size=8)
    assert first.poll_once(stop) == 2
    assert len(_images(runtime)) == 2
    monkeypatch.undo()

    second = DicomwebFollower(runtime, orthanc.dicomweb)
    # Exactly the three not yet fetched: nothing is fetched twice, nothing skipped.
    assert second.poll_once() == 3
    assert second.counts["created"] == 3
    assert len(_images(runtime)) == 5


def test_the_follower_keeps_following_until_stopped(
    orthanc: Orthanc, runtime: Runtime, shared_dir: Path
) -> None:
    runtime.settings = runtime.settings.model_copy(update={"dicomweb_poll_seconds": 0.2})
    follower = DicomwebFollower(runtime, orthanc.dicomweb)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,))
    thread.start()
    try:
        for first in (0, 3):
            _stow(orthanc, _study(shared_dir, 1, first=first))
            deadline = time.monotonic() + 120
            while len(_images(runtime)) < (1 if first == 0 else 2):
                assert thread.is_alive()
                assert time.monotonic() < deadline, "the follower did not pick the study up"
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert follower.counts["created"] == 2


def test_wrong_credentials_fail_loudly(orthanc: Orthanc, runtime: Runtime) -> None:
    session = requests.Session()
    session.auth = (USER, "not-the-password")
    follower = DicomwebFollower(runtime, orthanc.dicomweb, session=session)
    with pytest.raises(requests.HTTPError) as caught:
        follower.poll_once()
    assert caught.value.response is not None
    assert caught.value.response.status_code == 401


def test_credentials_come_from_the_settings(tmp_path: Path) -> None:
    bearer = http_session(Settings(data_dir=tmp_path, dicomweb_token="t0ken-" + "x" * 20))
    assert bearer.headers["Authorization"] == "Bearer t0ken-" + "x" * 20
    assert bearer.auth is None
    basic = http_session(Settings(data_dir=tmp_path, dicomweb_username="u", dicomweb_password="p"))
    assert basic.auth == ("u", "p")
    assert "Authorization" not in basic.headers
    anonymous = http_session(Settings(data_dir=tmp_path))
    assert anonymous.auth is None
    assert "Authorization" not in anonymous.headers


def test_an_unreachable_server_is_retried_not_given_up(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    follower = DicomwebFollower(runtime, url)
    with pytest.raises(requests.ConnectionError):
        follower.poll_once()
    # Not taken for a non-Orthanc: the way of following is decided at the first answer.
    assert follower._decided is False

    runtime.settings = runtime.settings.model_copy(update={"dicomweb_poll_seconds": 0.05})
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,))
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert caplog.text.count("DICOMweb server unavailable (ConnectionError); retrying") >= 2
