"""``convirt dicom-node``: a real pynetdicom SCU sends to the node on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from app import cli
from app.models import Image
from app.services.dicom_node import (
    STAGING_DIRNAME,
    STATUS_NOT_STORED_HERE,
    STATUS_SUCCESS,
    DicomNode,
    NoCallerAcceptedError,
)
from app.services.pacs import clean_uid
from app.services.runtime import Runtime
from app.settings import Settings
from model.bundle import EncoderBundle
from tests.app.dicom_support import (
    SOP_CLASSES,
    dicom_bytes,
    kermany_pixels,
    real_cr_path,
    synthetic_dicom,
)
from tests.app.process_support import free_port
from tests.app.service_support import assert_consistent, make_settings, running_app

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CALLER = "MODALITY1"
#: Seconds a test SCU waits for an answer: the 30 s default is short on a busy shared machine.
SCU_TIMEOUT_S = 300
NODE_AE = "CONVIRT"


@pytest.fixture
def node(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[DicomNode]:
    runtime = Runtime.start(_node_settings(tmp_path, database_url, bundle_dir), bundle=bundle)
    node = DicomNode(runtime)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        runtime.close()


def _node_settings(tmp_path: Path, database_url: str, bundle_dir: Path, **extra: Any) -> Settings:
    """A node called ``NODE_AE`` on a free port, accepting ``CALLER``."""
    return make_settings(
        tmp_path / "data",
        database_url,
        bundle_dir,
        dicom_ae_title=NODE_AE,
        dicom_port=free_port(),
        dicom_calling_aes=[CALLER],
        **extra,
    )


def _send(node: DicomNode, datasets: list[Dataset], *, caller: str = CALLER) -> list[int]:
    """C-STORE each dataset in one association; the statuses in order."""
    ae = AE(ae_title=caller)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = SCU_TIMEOUT_S
    for uid in SOP_CLASSES.values():
        ae.add_requested_context(uid)
    settings = node.runtime.settings
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status))
        return statuses
    finally:
        assoc.release()


def _rows(node: DicomNode) -> list[Image]:
    with node.runtime.sessions() as session:
        return list(session.scalars(select(Image).order_by(Image.id)))


def test_radiographs_sent_over_c_store_are_stored_and_searchable(
    node: DicomNode, shared_dir: Path
) -> None:
    real = pydicom.dcmread(real_cr_path())
    synthetic = [synthetic_dicom(kermany_pixels(shared_dir, i), modality="DX") for i in (0, 9)]

    assert _send(node, [real, *synthetic]) == [STATUS_SUCCESS] * 3
    node.stop()  # drains the ingest thread: everything acknowledged is committed

    rows = _rows(node)
    assert sorted(str(r.study_instance_uid) for r in rows) == sorted(
        str(ds.StudyInstanceUID) for ds in (real, *synthetic)
    )
    assert {r.modality for r in rows} == {"CR", "DX"}
    assert node.counts["stored"] == 3
    assert node.counts["ingested"] == 3
    # Nothing is left staged once committed.
    assert list((node.runtime.settings.data_dir / STAGING_DIRNAME).iterdir()) == []
    assert_consistent(node.runtime)

    # Sending the same instance again is one image, not two.
    node.start()
    assert _send(node, [real]) == [STATUS_SUCCESS]
    node.stop()
    assert len(_rows(node)) == 3


def test_received_radiographs_are_found_by_the_service(
    node: DicomNode, shared_dir: Path, bundle: EncoderBundle
) -> None:
    ds = synthetic_dicom(kermany_pixels(shared_dir, 3), modality="CR")
    assert _send(node, [ds]) == [STATUS_SUCCESS]
    node.stop()
    settings = node.runtime.settings.model_copy(
        update={"viewer_url_template": "http://pacs.test/viewer?study={study_instance_uid}"}
    )
    node.runtime.close()
    with running_app(settings, bundle) as client:
        response = client.post("/search/text", json={"query": "pneumonia", "k": 5})
        assert response.status_code == 200, response.text
        [hit] = response.json()["hits"]
        assert hit["study_instance_uid"] == str(ds.StudyInstanceUID)
        assert hit["viewer_url"] == f"http://pacs.test/viewer?study={ds.StudyInstanceUID}"
        image = client.get(f"/images/{hit['image_id']}").json()
        assert image["study_instance_uid"] == str(ds.StudyInstanceUID)
        assert "SYN-0001" not in response.text
        assert "Synthetic" not in response.text


def test_instances_that_are_not_radiographs_get_a_failure_status(
    node: DicomNode, shared_dir: Path
) -> None:
    pixels = kermany_pixels(shared_dir, 1)
    refused = [
        synthetic_dicom(pixels, modality="CT"),
        synthetic_dicom(pixels, modality="MR"),
        synthetic_dicom(pixels, modality="DX", colour=True),
        synthetic_dicom(pixels, modality="DX", frames=3),
        # An icon and a strip: no radiograph has their shape.
        synthetic_dicom(np.ascontiguousarray(pixels[:16, :16]), modality="DX"),
        synthetic_dicom(np.ascontiguousarray(pixels[:40, :]), modality="CR"),
    ]
    no_pixels = synthetic_dicom(pixels, modality="CR")
    del no_pixels.PixelData
    statuses = _send(node, [*refused, no_pixels, synthetic_dicom(pixels, modality="DX")])

    # The association survives every refusal: the last, valid instance is still stored.
    assert statuses == [STATUS_NOT_STORED_HERE] * 7 + [STATUS_SUCCESS]
    node.stop()
    assert len(_rows(node)) == 1
    assert node.runtime.index.ntotal == 1
    assert node.counts["not_a_radiograph"] == 2
    assert node.counts["color_dicom"] == 1
    assert node.counts["multi_frame"] == 1
    assert node.counts["no_pixel_data"] == 1


def test_undecodable_pixel_data_is_cannot_understand(node: DicomNode, shared_dir: Path) -> None:
    ds = synthetic_dicom(kermany_pixels(shared_dir, 2), modality="CR")
    ds.PixelData = ds.PixelData[:100]  # truncated
    assert _send(node, [ds]) == [0xC000]
    node.stop()
    assert _rows(node) == []


def test_received_images_hold_the_pixel_budget_until_they_are_stored(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle, shared_dir: Path
) -> None:
    """A burst of instances waits for the budget instead of filling memory; none is lost."""
    size = (256, 320)
    settings = _node_settings(
        tmp_path,
        database_url,
        bundle_dir,
        # Room for one decoded instance, not two; a refusal comes quickly.
        decode_pixel_budget=size[0] * size[1] * 3 // 2,
        decode_wait_s=0.5,
    )
    runtime = Runtime.start(settings, bundle=bundle)
    node = DicomNode(runtime)
    storing = threading.Event()
    go_on = threading.Event()
    persist = node.ingest.persist

    def slow_persist(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        assert go_on.wait(SCU_TIMEOUT_S)
        return persist(*args, **kwargs)

    node.ingest.persist = slow_persist  # type: ignore[method-assign]
    node.start()
    try:
        first, second = (
            synthetic_dicom(kermany_pixels(shared_dir, i, size), modality="DX") for i in (3, 4)
        )
        assert _send(node, [first]) == [STATUS_SUCCESS]
        assert storing.wait(SCU_TIMEOUT_S)
        # The first is decoded and not yet stored: its pixels leave no room for the second.
        assert node.ingest.budget.in_use == size[0] * size[1]
        assert _send(node, [second]) == [0xA700]
        assert node.counts["busy"] == 1
        go_on.set()
        node.stop()
        assert node.ingest.budget.in_use == 0
        # The sender retries later, and the second is stored too.
        node.start()
        assert _send(node, [second]) == [STATUS_SUCCESS]
        node.stop()
        assert node.ingest.budget.in_use == 0
        assert len(_rows(node)) == 2
        assert_consistent(runtime)
    finally:
        go_on.set()
        node.stop()
        runtime.close()


def test_unknown_calling_ae_is_rejected(node: DicomNode) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = SCU_TIMEOUT_S
    ae.add_requested_context(SOP_CLASSES["CR"])
    assoc = ae.associate("127.0.0.1", node.runtime.settings.dicom_port, ae_title=NODE_AE)
    assert assoc.is_rejected
    assert not assoc.is_established
    assert node.counts["association_rejected"] == 1


def test_c_echo_answers(node: DicomNode) -> None:
    ae = AE(ae_title=CALLER)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = SCU_TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.runtime.settings.dicom_port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == STATUS_SUCCESS
    finally:
        assoc.release()


def test_staged_leftovers_of_a_crash_are_ingested_at_start(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(
        tmp_path / "data",
        sqlite_url,
        bundle_dir,
        dicom_port=free_port(),
        dicom_accept_any_caller=True,
    )
    staging = settings.data_dir / STAGING_DIRNAME
    staging.mkdir(parents=True)
    # What a killed node leaves: acknowledged instances, staged, never committed.
    real = real_cr_path()
    shutil.copyfile(real, staging / "a.dcm")
    garbage = staging / "b.dcm"
    garbage.write_bytes(b"DICM but not really")
    runtime = Runtime.start(settings, bundle=bundle)
    node = DicomNode(runtime)
    try:
        node.start()
        node.stop()
        rows = _rows(node)
        assert [r.study_instance_uid for r in rows] == [
            str(pydicom.dcmread(real, stop_before_pixels=True).StudyInstanceUID)
        ]
        assert not (staging / "a.dcm").exists()
        # An acknowledged file is never deleted unread: it is set aside for a person.
        assert (staging / "b.dcm.failed").exists()
        assert node.counts["recovered"] == 1
        assert node.counts["recovery_failed"] == 1
        assert_consistent(runtime)
    finally:
        runtime.close()


def test_command_refuses_to_start_without_accepted_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CONVIRT_DICOM_CALLING_AES", raising=False)
    monkeypatch.delenv("CONVIRT_DICOM_ACCEPT_ANY_CALLER", raising=False)
    code = cli.main(["dicom-node", "--data-dir", str(tmp_path), "--ae-title", "CONVIRT"])
    assert code == 2
    assert "--accept-any-caller" in caplog.text


def test_command_refuses_a_bad_ae_title(tmp_path: Path) -> None:
    args = ["dicom-node", "--data-dir", str(tmp_path), "--accept-any-caller"]
    assert cli.main([*args, "--ae-title", "A" * 17]) == 2
    assert cli.main([*args, "--ae-title", "BAD\\AE"]) == 2


def test_node_without_accepted_callers_does_not_listen(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", sqlite_url, bundle_dir, dicom_port=free_port())
    runtime = Runtime.start(settings, bundle=bundle)
    try:
        with pytest.raises(NoCallerAcceptedError):
            DicomNode(runtime).start()
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1"),
        ("1.2.3\0", "1.2.3"),
        ("1.2.3/../../admin", None),
        ("1.02.3", None),
        ("1." + "2" * 70, None),
        ("", None),
        (None, None),
    ],
)
def test_only_well_formed_study_uids_are_kept(value: str | None, expected: str | None) -> None:
    assert clean_uid(value) == expected


# pydicom warns again when the SCU encodes it and when the node reads it: expected here.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_a_malformed_study_uid_is_stored_as_none(node: DicomNode, shared_dir: Path) -> None:
    ds = synthetic_dicom(kermany_pixels(shared_dir, 4), modality="CR")
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.StudyInstanceUID = "1.2/evil?x="  # what a hostile sender can put on the wire
    assert _send(node, [ds]) == [STATUS_SUCCESS]
    node.stop()
    [row] = _rows(node)
    assert row.study_instance_uid is None


@pytest.mark.slow
def test_killing_the_node_loses_nothing_acknowledged(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle, shared_dir: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "CONVIRT_DATABASE_URL": sqlite_url}
    command = [
        sys.executable, "-m", "app.cli", "dicom-node", "--data-dir", str(data_dir),
        "--bundle-dir", str(bundle_dir), "--port", str(port), "--calling-ae", CALLER,
    ]  # fmt: skip
    node = subprocess.Popen(command, env=env, cwd=tmp_path)
    sent = [
        synthetic_dicom(kermany_pixels(shared_dir, i, size=(1024, 1024)), modality="DX")
        for i in range(12)
    ]
    try:
        ae = AE(ae_title=CALLER)
        ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = SCU_TIMEOUT_S
        ae.add_requested_context(SOP_CLASSES["DX"])
        deadline = time.monotonic() + 300
        while not (assoc := ae.associate("127.0.0.1", port, ae_title=NODE_AE)).is_established:
            assert node.poll() is None, "the node exited"
            assert time.monotonic() < deadline, "the node did not listen in time"
            time.sleep(0.5)
        statuses = [int(assoc.send_c_store(ds).Status) for ds in sent]
        # Killed the moment the last success arrives: the ingest thread is still behind.
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=30)
        assoc.abort()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert statuses == [STATUS_SUCCESS] * len(sent)

    settings = make_settings(
        data_dir, sqlite_url, bundle_dir, dicom_port=free_port(), dicom_calling_aes=[CALLER]
    )
    runtime = Runtime.start(settings, bundle=bundle)
    restarted = DicomNode(runtime)
    try:
        with runtime.sessions() as session:
            before = session.scalar(select(func.count()).select_from(Image))
        staged = len(list((data_dir / STAGING_DIRNAME).glob("*.dcm")))
        # Every acknowledged instance is committed or staged, before any recovery.
        assert (before or 0) + staged >= len(sent)
        restarted.start()
        restarted.stop()
        rows = _rows(restarted)
        assert sorted(str(r.study_instance_uid) for r in rows) == sorted(
            str(ds.StudyInstanceUID) for ds in sent
        )
        assert list((data_dir / STAGING_DIRNAME).glob("*.dcm")) == []
        assert_consistent(runtime)
    finally:
        runtime.close()


def test_an_internal_error_is_answered_and_the_association_survives(
    node: DicomNode, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode = node.ingest.decode
    calls = 0

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return decode(*args, **kwargs)

    monkeypatch.setattr(node.ingest, "decode", fail_once)
    pixels = kermany_pixels(shared_dir, 7)
    statuses = _send(node, [synthetic_dicom(pixels, modality="DX"), synthetic_dicom(pixels)])
    assert statuses == [0xC000, STATUS_SUCCESS]
    node.stop()
    assert len(_rows(node)) == 1
    assert node.counts["internal_error"] == 1


def test_refusals_are_counted_in_the_metrics(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle, shared_dir: Path
) -> None:
    metrics_port = free_port()
    settings = make_settings(
        tmp_path / "data",
        sqlite_url,
        bundle_dir,
        dicom_port=free_port(),
        dicom_metrics_port=metrics_port,
        dicom_calling_aes=[CALLER],
    )
    runtime = Runtime.start(settings, bundle=bundle)
    node = DicomNode(runtime)
    try:
        node.start()
        pixels = kermany_pixels(shared_dir, 8)
        _send(node, [synthetic_dicom(pixels, modality="CT"), synthetic_dicom(pixels)])
        node_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'convirt_dicom_instances_total{outcome="not_a_radiograph"} 1.0' in node_metrics
        assert 'convirt_dicom_instances_total{outcome="stored"} 1.0' in node_metrics
    finally:
        node.stop()
        runtime.close()
    # Stopped means stopped: the metrics port is released with the node.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")


def test_pynetdicom_storescu_sends_a_folder_of_radiographs(
    node: DicomNode, tmp_path: Path, shared_dir: Path
) -> None:
    # The command-line storescu that ships with pynetdicom, as a site would use it.
    folder = tmp_path / "outgoing"
    folder.mkdir()
    shutil.copyfile(real_cr_path(), folder / "RG1_UNCR.dcm")
    (folder / "ct.dcm").write_bytes(
        dicom_bytes(synthetic_dicom(kermany_pixels(shared_dir, 11), modality="CT"))
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1",
            str(node.runtime.settings.dicom_port), str(folder), "-r",
            "-aet", CALLER, "-aec", NODE_AE, "-v",
            "-td", str(SCU_TIMEOUT_S), "-ta", str(SCU_TIMEOUT_S), "-tn", str(SCU_TIMEOUT_S),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "Association Accepted" in done.stderr, done.stderr
    node.stop()
    [row] = _rows(node)
    assert row.modality == "CR"
    assert node.counts["stored"] == 1
    assert node.counts["not_a_radiograph"] == 1
