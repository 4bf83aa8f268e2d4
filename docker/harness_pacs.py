"""Runs inside an API replica of the compose harness: store one radiograph in the stack's Orthanc.

    docker exec -i CONTAINER /opt/venv/bin/python - ORTHANC_URL USER PASSWORD < harness_pacs.py

Writes a small synthetic DX radiograph (pydicom and numpy, as installed in the service
image) and sends it to Orthanc's REST API (``POST /instances``), as a modality would store
a study. Prints ``{"study_instance_uid": …}``: the follower must make that study searchable.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.request

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DIGITAL_XRAY = UID("1.2.840.10008.5.1.4.1.1.1.1")


def radiograph(rows: int = 320, columns: int = 256) -> np.ndarray:
    """A bright mediastinum between two dark lung fields, 12-bit."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    image = np.full((rows, columns), 3000.0, dtype=np.float32)
    for centre in (columns * 0.3, columns * 0.7):
        inside = ((x - centre) / (columns * 0.17)) ** 2 + ((y - rows * 0.5) / (rows * 0.33)) ** 2
        image[inside < 1.0] = 900.0
    return image.astype(np.uint16)


def dataset(pixels: np.ndarray) -> Dataset:
    instance_uid = generate_uid()
    meta = FileMetaDataset()
    for keyword, value in {
        "MediaStorageSOPClassUID": DIGITAL_XRAY,
        "MediaStorageSOPInstanceUID": instance_uid,
        "TransferSyntaxUID": ExplicitVRLittleEndian,
    }.items():
        setattr(meta, keyword, value)
    ds = Dataset()
    ds.file_meta = meta
    rows, columns = pixels.shape
    # What a DX modality writes about one frontal chest image (set by keyword: pydicom maps
    # each to its tag).
    elements = {
        "SOPClassUID": DIGITAL_XRAY,
        "SOPInstanceUID": instance_uid,
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "PatientName": "Harness^Compose",
        "PatientID": "HARNESS-1",
        "Modality": "DX",
        "ViewPosition": "PA",
        "BodyPartExamined": "CHEST",
        "InstanceNumber": 1,
        "Rows": rows,
        "Columns": columns,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "PixelData": pixels.tobytes(),
    }
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def main(argv: list[str]) -> int:
    url, user, password = argv[0].rstrip("/"), argv[1], argv[2]
    ds = dataset(radiograph())
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(
        f"{url}/instances",
        data=buffer.getvalue(),
        method="POST",
        headers={"Content-Type": "application/dicom", "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        stored = json.loads(resp.read())
    answer = {"study_instance_uid": str(ds.StudyInstanceUID), "orthanc": stored}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
