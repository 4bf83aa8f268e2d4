"""What the PACS connectors (the DICOM node, the DICOMweb follower) share.

Which instances are stored (chest radiographs: Modality CR or DX) and how a study's
StudyInstanceUID is read and checked before it is stored. The UID ends up in a link to the
PACS viewer, so anything that is not a well-formed DICOM UID (digits and dots, at most 64
characters, PS3.5 9.1) is dropped rather than stored: a crafted "UID" must not be able to
steer that link elsewhere.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Final

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

#: Modalities of the radiographs the connectors store (computed and digital radiography).
RADIOGRAPH_MODALITIES: Final = frozenset({"CR", "DX"})

_UID: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def clean_uid(value: object) -> str | None:
    """``value`` as a DICOM UID, or None when it is missing or not a well-formed UID."""
    if value is None:
        return None
    text = str(value).strip().rstrip("\0")
    if not text or len(text) > 64 or _UID.fullmatch(text) is None:
        return None
    return text


def study_uid_of(data: bytes) -> str | None:
    """The StudyInstanceUID of encoded DICOM bytes; None when absent, malformed or unreadable."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, AttributeError, KeyError):
        return None
    return clean_uid(ds.get("StudyInstanceUID"))


def is_radiograph_modality(value: object) -> bool:
    """Whether a Modality value names a radiograph this project stores."""
    return str(value or "").strip().upper() in RADIOGRAPH_MODALITIES
