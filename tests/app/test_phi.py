"""No patient identifier is stored, logged or returned.

A DICOM carrying a patient's name, id, birth date and accession number (and a file name
made of them) is uploaded, read back and searched with; then the database (every
table dumped, and the SQLite files byte by byte), every file under the data directory, the
captured logs at DEBUG and every response body are searched for those strings.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import MetaData, create_engine, select

from app.models import Image
from model.bundle import EncoderBundle
from tests.app.service_support import (
    make_settings,
    running_app,
    runtime_of,
    upload,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-998877"
BIRTH_DATE = "19630417"
ACCESSION = "ACC-55443322"
IDENTIFIERS = (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, ACCESSION, "Doe Jane")


def _dicom_with_identifiers(shared_dir: Path) -> bytes:
    """A CR DICOM of a real radiograph (Kermany PNG pixels) with a full patient module."""
    from PIL import Image

    source = sorted((shared_dir / "data/kermany-16/images").glob("*.png"))[0]
    pixels = np.asarray(Image.open(source).convert("L").resize((320, 256)), dtype=np.uint16)
    pixels = (pixels * 16).astype(np.uint16)  # 12-bit range

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION
    ds.OtherPatientIDs = PATIENT_ID
    ds.StudyDescription = f"Chest for {PATIENT_NAME}"
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    assert PATIENT_NAME.encode() in data
    assert ACCESSION.encode() in data
    return data


def _dump_database(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        lines: list[str] = []
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(select(table)):
                    lines.append(f"{table.name}: {row!r}")
                    for value in row:
                        if isinstance(value, bytes | memoryview):
                            lines.append(bytes(value).decode("latin-1"))
        assert any(line.startswith("images:") for line in lines)
        return "\n".join(lines)
    finally:
        engine.dispose()


def _assert_clean(where: str, text: str) -> None:
    for identifier in IDENTIFIERS:
        assert identifier not in text, f"{identifier!r} found in {where}"


def test_no_patient_identifier_is_stored_logged_or_returned(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    shared_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    data = _dicom_with_identifiers(shared_dir)
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    responses: list[bytes] = []
    with running_app(settings, bundle) as client:
        response = upload(
            client,
            [data],
            names=[f"{PATIENT_NAME}_{PATIENT_ID}_{BIRTH_DATE}.dcm"],
            content_type="application/dicom",
            report_text="No acute cardiopulmonary abnormality.",
        )
        assert response.status_code == 201, response.text
        responses.append(response.content)
        image_id = response.json()["results"][0]["id"]
        # The same bytes under another identifying file name: deduplicated, name dropped.
        again = upload(client, [data], names=[f"{ACCESSION}.dcm"])
        assert again.json()["results"][0]["status"] == "existing"
        responses.append(again.content)
        for call in (
            client.get(f"/images/{image_id}"),
            client.get(f"/images/{image_id}/thumbnail"),
            client.post("/search/text", json={"query": "clear lungs", "k": 5}),
            client.post("/search/image", json={"image_id": image_id, "k": 5}),
            client.post(
                "/search/image",
                files={"file": (f"{PATIENT_NAME}.dcm", data, "application/dicom")},
            ),
            client.get("/metrics"),
            client.get("/ready"),
        ):
            assert call.status_code == 200, call.text
            responses.append(call.content)
        meta = client.get(f"/images/{image_id}").json()
        assert meta["source_format"] == "dicom"
        assert meta["view_position"] == "PA"
        assert meta["modality"] == "CR"
        runtime = runtime_of(client)
        with runtime.sessions() as session:
            row = session.get(Image, image_id)
            assert row is not None
            assert row.original_path is None
        database_text = _dump_database(settings.database_url)

    _assert_clean("the database tables", database_text)
    # Every file under the data directory, the SQLite database and its WAL included.
    files = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files)
    for path in files:
        _assert_clean(str(path), path.read_bytes().decode("latin-1"))
    log_text = caplog.text + "\n".join(
        str(record.args) + record.getMessage() for record in caplog.records
    )
    assert "image" in log_text  # the logs were captured at all
    _assert_clean("the logs", log_text)
    for body in responses:
        _assert_clean("a response", body.decode("latin-1"))


def test_originals_are_kept_only_when_asked(
    tmp_path: Path, bundle_dir: Path, bundle: EncoderBundle, shared_dir: Path
) -> None:
    data = _dicom_with_identifiers(shared_dir)
    settings = make_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'o.db'}", bundle_dir, store_originals=True
    )
    with running_app(settings, bundle) as client:
        image_id = upload(client, [data]).json()["results"][0]["id"]
        runtime = runtime_of(client)
        with runtime.sessions() as session:
            row = session.get(Image, image_id)
            assert row is not None
            assert row.original_path is not None
            kept = runtime.store.path(row.original_path)
        # The operator asked for the upload itself: it is kept byte for byte.
        assert kept.read_bytes() == data
        assert client.delete(f"/images/{image_id}").status_code == 204
        assert not kept.exists()
