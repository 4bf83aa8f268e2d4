"""DICOM stored values to grayscale in [0, 1]: modality LUT or rescale, VOI LUT or window,
MONOCHROME1 inverted so that air is dark.

The decoder (:mod:`model.inputs.decode`) reads the file and its pixel data; this module only
turns the stored integers into the intensities a radiologist's viewer would show.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)

FloatArray: TypeAlias = npt.NDArray[np.float32]


class LutError(ValueError):
    """A LUT whose descriptor or data cannot be used (the decoder reports a corrupt image)."""


def dicom_to_unit(raw: npt.NDArray[Any], ds: Dataset, photometric: str) -> FloatArray:
    """Stored values ``(H, W)`` → float32 ``(H, W)`` in ``[0, 1]`` with air dark."""
    values, low, high = _modality_transform(raw, ds)  # (H, W)
    unit = _voi_transform(values, ds, low, high)  # (H, W) in [0, 1]
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows its lowest value as white: flipping makes air dark.
        np.subtract(1.0, unit, out=unit)
    return np.ascontiguousarray(unit, dtype=np.float32)


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_transform(raw: npt.NDArray[Any], ds: Dataset) -> tuple[FloatArray, float, float]:
    """Apply the Modality LUT or rescale; return the values ``(H, W)`` and their range.

    The range is what the transform can produce from any stored value (Bits Stored
    through the rescale, or the LUT's entries), not what this image happens to use.
    """
    lut_items = ds.get("ModalityLUTSequence")
    if lut_items:
        first, table = _lut_table(lut_items[0], ds)
        return _apply_lut(raw, first, table), float(table.min()), float(table.max())
    values = raw.astype(np.float32)  # (H, W)
    low, high = _stored_range(ds)
    slope = _dicom_float(ds, "RescaleSlope", 1.0)
    intercept = _dicom_float(ds, "RescaleIntercept", 0.0)
    if slope != 1.0 or intercept != 0.0:
        values *= np.float32(slope)
        values += np.float32(intercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return values, low, high


def _voi_transform(values: FloatArray, ds: Dataset, low: float, high: float) -> FloatArray:
    """Map modality values ``(H, W)`` onto ``[0, 1]`` by the VOI LUT, the window, or range."""
    lut_items = ds.get("VOILUTSequence")
    if lut_items:
        first, table = _lut_table(lut_items[0], ds)
        return _to_unit(_apply_lut(values, first, table), float(table.min()), float(table.max()))
    window = _window(ds)
    if window is not None:
        return _apply_window(values, *window)
    return _to_unit(values, low, high)


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = (dicom_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        logger.warning("unknown VOI LUT Function %r: using LINEAR", function)
        function = "LINEAR"
    if (function == "LINEAR" and width < 1.0) or width <= 0.0:
        logger.warning("ignoring invalid Window Width %s for %s", width, function)
        return None
    return center, width, function


def _apply_window(values: FloatArray, center: float, width: float, function: str) -> FloatArray:
    """PS3.3 C.11.2.1.2 windowing straight onto ``[0, 1]``; ``values`` is ``(H, W)``."""
    if function == "SIGMOID":
        exponent = values - np.float32(center)  # (H, W)
        exponent *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp → inf gives the correct limit 0
            np.exp(exponent, out=exponent)
        exponent += np.float32(1.0)
        return np.reciprocal(exponent, out=exponent)
    if function == "LINEAR":
        # The half-pixel offsets make the window of an integer image exactly `width` wide.
        center, width = center - 0.5, width - 1.0
        if width == 0.0:
            return (values > np.float32(center)).astype(np.float32)
    unit = values - np.float32(center)  # (H, W)
    unit *= np.float32(1.0 / width)
    unit += np.float32(0.5)
    return np.clip(unit, 0.0, 1.0, out=unit)


def _to_unit(values: FloatArray, low: float, high: float) -> FloatArray:
    if high <= low:
        return np.zeros_like(values)
    unit = values - np.float32(low)  # (H, W)
    unit *= np.float32(1.0 / (high - low))
    return np.clip(unit, 0.0, 1.0, out=unit)


def _lut_table(item: Dataset, ds: Dataset) -> tuple[int, FloatArray]:
    """Return the first mapped input value and the LUT entries ``(N,)`` as float32."""
    descriptor = item.get("LUTDescriptor")
    lut_data = item.get("LUTData")
    if descriptor is None or lut_data is None or len(descriptor) != 3:
        raise LutError("DICOM LUT lacks a valid LUT Descriptor or LUT Data")
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    # The descriptor's second value is US or SS, following Pixel Representation.
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first >= 2**15:
        first -= 2**16
    if isinstance(lut_data, bytes):
        little = ds.file_meta.TransferSyntaxUID.is_little_endian
        table = np.frombuffer(lut_data, dtype="<u2" if little else ">u2")
    else:
        table = np.atleast_1d(np.asarray(lut_data, dtype=np.float64))
    if table.size < entries:
        raise LutError(f"DICOM LUT has {table.size} entries, {entries} declared")
    return first, table[:entries].astype(np.float32)


def _apply_lut(values: npt.NDArray[Any], first: int, table: FloatArray) -> FloatArray:
    """Look ``values`` ``(H, W)`` up in ``table``; out-of-range inputs take the end entries."""
    index = np.rint(values.astype(np.float64) - first)  # (H, W)
    np.clip(index, 0, table.size - 1, out=index)
    return table[index.astype(np.intp)]


def _first_number(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _dicom_float(ds: Dataset, keyword: str, default: float) -> float:
    value = _first_number(ds.get(keyword))
    return default if value is None else value


def dicom_text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# ------------------------------------------------------------------------- PNG/JPEG
