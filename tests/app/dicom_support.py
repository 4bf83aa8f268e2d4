"""DICOM instances for the PACS connector tests: real CR radiographs and synthetic ones.

The real ones are pydicom-data's CR chest radiographs (read offline with
``get_testdata_file(..., download=False)``; the plural ``get_testdata_files`` would try to
download). The synthetic ones carry real pixels (the Kermany radiographs) in the modality
and layout a test needs: DX, CT, MR, colour, multi-frame.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
}


def real_cr_path(name: str = "RG1_UNCR.dcm") -> Path:
    """One of pydicom-data's real CR chest radiographs (uncompressed, MONOCHROME1)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom-data's {name} is missing: install the dev extra")
    return Path(str(path))


def kermany_pixels(shared_dir: Path, index: int, size: tuple[int, int] = (256, 320)) -> np.ndarray:
    """(H, W) uint16, 12-bit: a real Kermany radiograph."""
    from PIL import Image

    sources = sorted((shared_dir / "data/kermany-16/images").glob("*.png"))
    picture = Image.open(sources[index]).convert("L").resize((size[1], size[0]))
    return (np.asarray(picture, dtype=np.uint16) * 16).astype(np.uint16)


def synthetic_dicom(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    study_uid: str | None = None,
    series_uid: str | None = None,
    colour: bool = False,
    frames: int = 1,
) -> Dataset:
    """A single-file DICOM dataset (with file meta) around ``pixels`` (H, W) uint16."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.StudyDate = "20260101"
    ds.Modality = modality
    ds.ViewPosition = "PA"
    ds.InstanceNumber = 1
    rows, columns = pixels.shape
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if colour:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        rgb = np.repeat((pixels >> 4).astype(np.uint8)[..., None], 3, axis=2)  # (H, W, 3)
        ds.PixelData = rgb.tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        stack = np.repeat(pixels[None], frames, axis=0) if frames > 1 else pixels
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = stack.tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
