"""Decode uploaded bytes (DICOM, PNG, JPEG) into one normalised grayscale picture.

The single entry point for pixels entering the system: ingest, image queries and the
evaluation harness all call :func:`decode_image` (or :func:`decode_file`) and get a
:class:`DecodedImage` whose ``pixels`` are float32 ``(H, W)`` in ``[0, 1]`` with air dark.

The format is recognised from the bytes, never from a file name. Sizes are checked
against ``max_pixels`` from the header, before any pixel data is decoded, so a small
upload that claims a huge image is refused without allocating it; so is, when the caller
gives ``max_aspect_ratio`` and ``min_side`` (the service does), a strip such as 1 × N or
an icon that no radiograph is. Every failure is an
:class:`ImageDecodeError` subclass with a stable ``code``; errors of pydicom and Pillow
never escape unwrapped.

The metadata record deliberately carries no patient identifiers: only format, size,
bit depth, photometric interpretation, view position and modality.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageOps
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from model.errors import ModelError
from model.inputs.grayscale import LutError, dicom_text, dicom_to_unit

logger = logging.getLogger(__name__)

SourceFormat: TypeAlias = Literal["dicom", "png", "jpeg"]
FloatArray: TypeAlias = npt.NDArray[np.float32]

#: Largest Rows × Columns accepted by default (a 7750 × 7750 image); an 8-bit copy of
#: it is already 60 MB, and chest radiographs are rarely above 4k × 4k.
DEFAULT_MAX_PIXELS: int = 60_000_000
#: A sensible ``max_aspect_ratio``: radiographs span about 1:2 to 2:1, long-leg and
#: scoliosis films reach about 1:3; a 1 × N strip is no radiograph.
DEFAULT_MAX_ASPECT_RATIO: float = 4.0
#: A sensible ``min_side``: the model looks at 160-224 px; a picture under 32 px a side
#: is an icon or a placeholder, and its embedding would match nothing it resembles.
DEFAULT_MIN_SIDE: int = 32

_DICM_OFFSET = 128
_DICM = b"DICM"
# A preamble-less DICOM file still starts with its file meta group, whose first element
# is (0002,0000) File Meta Information Group Length, explicit VR "UL", 4 bytes long.
# These 8 bytes are specific enough to recognise it without guessing.
_DICOM_META_START = b"\x02\x00\x00\x00UL\x04\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_PIXEL_DATA: Final = 0x7FE00010
#: Sequence Delimitation Item (FFFE,E0DD) with its zero length: closes encapsulated pixels.
_SEQUENCE_DELIMITER: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0..RST7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class ImageDecodeError(ModelError):
    """Base of every decoding failure; the API maps ``code`` to a problem response."""

    code = "image_decode_error"


class NotAnImageError(ImageDecodeError):
    """The payload is empty or is neither DICOM, PNG nor JPEG."""

    code = "not_an_image"


class CorruptImageError(ImageDecodeError):
    """The payload has a known format but is truncated or malformed."""

    code = "corrupt_image"


class NoPixelDataError(ImageDecodeError):
    """A DICOM dataset without a PixelData element (a report, a plan, a cut-off header)."""

    code = "no_pixel_data"


class MultiFrameError(ImageDecodeError):
    """A DICOM with more than one frame: the service embeds single radiographs only."""

    code = "multi_frame"


class ColorDicomError(ImageDecodeError):
    """A DICOM with several samples per pixel or a colour photometric interpretation."""

    code = "color_dicom"


class UnsupportedTransferSyntaxError(ImageDecodeError):
    """A DICOM whose transfer syntax no installed decoder handles (or that is refused)."""

    code = "unsupported_transfer_syntax"


class ImageTooLargeError(ImageDecodeError):
    """The header announces more pixels than ``max_pixels`` allows."""

    code = "image_too_large"


class AspectRatioError(ImageDecodeError):
    """The header announces a side more than ``max_aspect_ratio`` times the other."""

    code = "aspect_ratio_out_of_range"


class ImageTooSmallError(ImageDecodeError):
    """The image has a side shorter than ``min_side``."""

    code = "image_too_small"


@dataclass(frozen=True)
class ImageMeta:
    """What is known about a decoded image besides its pixels; never patient identifiers.

    ``width`` and ``height`` are the stored size, equal to ``pixels.shape[::-1]``.
    ``bits`` is Bits Stored for DICOM and the sample bit depth for PNG/JPEG.
    ``photometric`` is the DICOM Photometric Interpretation, or the Pillow mode of a
    PNG/JPEG before conversion to luminance ("L", "I;16", "RGB", "P", ...).
    """

    source_format: SourceFormat
    width: int
    height: int
    bits: int
    photometric: str | None
    view_position: str | None
    modality: str | None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded picture.

    ``pixels``: float32 ``(H, W)``, C-contiguous, values in ``[0, 1]``, air dark.
    """

    pixels: FloatArray
    meta: ImageMeta


@dataclass(frozen=True)
class _RasterHeader:
    width: int
    height: int
    bits: int


def sniff_format(data: bytes) -> SourceFormat | None:
    """Recognise DICOM, PNG or JPEG from the leading bytes; ``None`` for anything else.

    DICOM is the ``DICM`` magic at offset 128, or (without the 128-byte preamble) a file
    meta group that starts at offset 0.
    """
    if data[_DICM_OFFSET : _DICM_OFFSET + 4] == _DICM:
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data.startswith(_DICOM_META_START):
        return "dicom"
    return None


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = None,
    min_side: int | None = None,
) -> DecodedImage:
    """Decode DICOM, PNG or JPEG bytes into float32 ``(H, W)`` in ``[0, 1]``, air dark.

    DICOM: Modality LUT (or Rescale Slope/Intercept), then the first VOI LUT or, failing
    that, the first Window Center/Width, mapped onto ``[0, 1]``; without either, the
    range that Bits Stored allows (after the modality transform) is mapped onto ``[0, 1]``.
    MONOCHROME1 is inverted last so that air is dark.

    PNG/JPEG: grayscale is scaled by its bit depth (255 or 65535); colour, palette and
    alpha images are converted to luminance (ITU-R 601-2, Pillow's ``L``). For these,
    the effective limit is also capped by Pillow's ``Image.MAX_IMAGE_PIXELS``.

    ``max_aspect_ratio`` (None: unchecked) refuses, from the header, an image whose longer
    side exceeds that many times its shorter side (:class:`AspectRatioError`);
    ``min_side`` (None: unchecked) refuses one with a side shorter than that many pixels
    (:class:`ImageTooSmallError`), from the header when it can be read, else once decoded.

    Raises:
        ImageDecodeError: a subclass with a stable ``code`` for every refusal.
    """
    if not data:
        raise NotAnImageError("empty payload: expected DICOM, PNG or JPEG bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise NotAnImageError("not a DICOM, PNG or JPEG image (unrecognised leading bytes)")
    if max_aspect_ratio is not None or min_side is not None:
        size = peek_size(data)
        if size is not None:
            _check_shape(*size, max_aspect_ratio, min_side)
    if fmt == "dicom":
        decoded = _decode_dicom(data, max_pixels)
    else:
        decoded = _decode_raster(data, fmt, max_pixels)
    # A header that could not be peeked (a deflated DICOM) is checked on the pixels.
    _check_shape(decoded.meta.width, decoded.meta.height, max_aspect_ratio, min_side)
    logger.debug(
        "decoded %s %dx%d (%d bits, %s)",
        fmt,
        decoded.meta.width,
        decoded.meta.height,
        decoded.meta.bits,
        decoded.meta.photometric,
    )
    return decoded


def peek_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header announces it, without decoding any pixel.

    Lets a caller reserve memory for the decode before starting it. ``None`` when the bytes
    are no recognised image or the header cannot be read: decoding them then fails early,
    from the header, with the precise error and without allocating the pixels.
    """
    fmt = sniff_format(data)
    try:
        if fmt == "png":
            header = _png_header(data)
            return header.width, header.height
        if fmt == "jpeg":
            header = _jpeg_header(data)
            return header.width, header.height
        if fmt == "dicom":
            has_preamble = data[_DICM_OFFSET : _DICM_OFFSET + 4] == _DICM
            if _meta_transfer_syntax(data, has_preamble) == DeflatedExplicitVRLittleEndian:
                return None
            ds = pydicom.dcmread(
                io.BytesIO(data),
                force=not has_preamble,
                stop_before_pixels=True,
                specific_tags=["Rows", "Columns"],
            )
            return int(ds.Columns), int(ds.Rows)
    except MemoryError:
        raise
    except Exception:  # a malformed header: decode_image reports it properly
        return None
    return None


def decode_file(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Read ``path`` and :func:`decode_image` its bytes (the suffix is ignored).

    Raises:
        OSError: the file cannot be read (missing, unreadable): not an image problem.
        ImageDecodeError: as :func:`decode_image`.
    """
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"{max_pixels} allowed"
        )


def _check_shape(
    width: int, height: int, max_aspect_ratio: float | None, min_side: int | None
) -> None:
    if width <= 0 or height <= 0:
        return  # no size at all: the decode reports it as corrupt
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise AspectRatioError(
            f"image is {width}x{height}: one side is more than {max_aspect_ratio:g} times "
            "the other, which no radiograph is"
        )
    if min_side is not None and min(width, height) < min_side:
        raise ImageTooSmallError(
            f"image is {width}x{height}: a side is shorter than {min_side} pixels, too small "
            "to be a radiograph"
        )


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    has_preamble = data[_DICM_OFFSET : _DICM_OFFSET + 4] == _DICM
    # pydicom inflates a deflated dataset whole, without any bound, before anything else
    # can be checked: a few kilobytes could expand to gigabytes, so it is refused.
    if _meta_transfer_syntax(data, has_preamble) == DeflatedExplicitVRLittleEndian:
        raise UnsupportedTransferSyntaxError(
            "Deflated Explicit VR Little Endian is refused: its inflated size is unbounded"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many unrelated types on malformed input
        raise CorruptImageError(f"unreadable DICOM: {_reason(exc)}") from exc

    if "PixelData" not in ds and _PIXEL_DATA_TAG in data:
        # pydicom silently drops an encapsulated PixelData cut off before its sequence
        # delimiter (it only warns): the tag in the bytes shows the pixels were there.
        raise CorruptImageError("DICOM pixel data is unreadable: the file looks truncated")
    _check_complete(ds, data)
    try:
        rows, columns, bits_stored, photometric = _check_dicom_header(ds, max_pixels)
        raw = _dicom_pixels(ds, rows, columns)
        pixels = dicom_to_unit(raw, ds, photometric)
    except ImageDecodeError:
        raise
    except LutError as exc:
        raise CorruptImageError(str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # malformed attribute values surface as assorted errors
        raise CorruptImageError(f"malformed DICOM image attributes: {_reason(exc)}") from exc
    meta = ImageMeta(
        source_format="dicom",
        width=columns,
        height=rows,
        bits=bits_stored,
        photometric=photometric,
        view_position=dicom_text(ds, "ViewPosition"),
        modality=dicom_text(ds, "Modality"),
    )
    return DecodedImage(pixels=pixels, meta=meta)


_OBJECT_REPR: Final = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """A decoder's message for a client: object reprs (``<_io.BytesIO object at 0x…>``,
    which say nothing and leak addresses) are dropped."""
    return " ".join(_OBJECT_REPR.sub("", str(exc)).split()) or type(exc).__name__


def _check_complete(ds: Dataset, data: bytes) -> None:
    """Refuse a file cut short: pydicom reads a value that ends early without complaint.

    A top-level element whose value holds fewer bytes than its header declares, or
    encapsulated pixel data without its closing sequence delimiter, means bytes are
    missing, even when what is left still decodes to an image.
    """
    for element in ds._dict.values():  # raw elements: their values are not parsed yet
        if (
            isinstance(element, RawDataElement)
            and element.value is not None
            and element.length != _UNDEFINED_LENGTH
            and len(element.value) < element.length
        ):
            raise CorruptImageError(
                f"DICOM element ({element.tag.group:04X},{element.tag.element:04X}) has "
                f"{len(element.value)} of its {element.length} bytes: the file is truncated"
            )
    pixel_data = ds._dict.get(BaseTag(_PIXEL_DATA))
    if (
        isinstance(pixel_data, RawDataElement)
        and pixel_data.length == _UNDEFINED_LENGTH
        and data.rfind(_SEQUENCE_DELIMITER) < data.rfind(_PIXEL_DATA_TAG)
    ):
        raise CorruptImageError(
            "DICOM pixel data lacks its closing delimiter: the file is truncated"
        )


def _meta_transfer_syntax(data: bytes, has_preamble: bool) -> str | None:
    """The (0002,0010) value of the file meta group, read without parsing the dataset."""
    start = _DICM_OFFSET + 4 if has_preamble else 0
    try:
        for elem in data_element_generator(
            io.BytesIO(data[start:]),
            False,
            True,
            stop_when=lambda tag, _vr, _length: tag.group != 0x0002,
        ):
            if elem.tag == 0x00020010:
                value = elem.value
                if isinstance(value, bytes):
                    return value.decode("ascii", "replace").strip("\x00 ")
                return str(value).strip("\x00 ")
    except Exception:  # a broken meta group is reported by the full read that follows
        return None
    return None


def _check_dicom_header(ds: Dataset, max_pixels: int) -> tuple[int, int, int, str]:
    """Refuse what cannot be decoded into one grayscale frame, before touching pixels."""
    if "PixelData" not in ds:
        raise NoPixelDataError(
            "DICOM has no PixelData element (not an image, or cut off before the pixels)"
        )
    transfer_syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"no pixel decoder for transfer syntax {_uid_label(transfer_syntax)}"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(
            f"the decoder for transfer syntax {_uid_label(transfer_syntax)} is not installed"
        )

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = dicom_text(ds, "PhotometricInterpretation")
    if samples != 1 or (photometric is not None and photometric not in _MONOCHROME):
        raise ColorDicomError(
            f"colour DICOM ({photometric}, {samples} samples per pixel) is not a "
            "grayscale radiograph"
        )
    if photometric is None:
        raise CorruptImageError("DICOM has no Photometric Interpretation")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MultiFrameError(f"DICOM has {frames} frames; a single frame is required")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(keyword) is None:
            raise CorruptImageError(f"DICOM image has no {keyword}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    _check_size(columns, rows, max_pixels)
    return rows, columns, int(ds.BitsStored), photometric


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if uid:
        return UID(uid)
    # Old files may lack the element; an unencapsulated dataset's own encoding tells.
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise CorruptImageError("DICOM has no Transfer Syntax UID")
    uid = UID(
        "1.2.840.10008.1.2"
        if implicit
        else ("1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    )
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _uid_label(uid: UID) -> str:
    return f"{uid} ({uid.name})" if uid.name != uid else str(uid)


def _dicom_pixels(ds: Dataset, rows: int, columns: int) -> npt.NDArray[Any]:
    try:
        raw: npt.NDArray[Any] = ds.pixel_array  # (H, W) stored values
    except MemoryError:
        raise
    except Exception as exc:  # codec plugins raise their own types on broken streams
        raise CorruptImageError(f"cannot decode DICOM pixel data: {_reason(exc)}") from exc
    if raw.shape != (rows, columns):
        raise CorruptImageError(f"DICOM pixel data has shape {raw.shape}, not ({rows}, {columns})")
    return raw


def _decode_raster(data: bytes, fmt: Literal["png", "jpeg"], max_pixels: int) -> DecodedImage:
    header = _png_header(data) if fmt == "png" else _jpeg_header(data)
    # Checking Pillow's own bomb threshold here, from the header, keeps its
    # DecompressionBombWarning from ever firing: no global warning filter is needed,
    # which would not be thread-safe in the service's worker threads.
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    _check_size(header.width, header.height, limit)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as image:
            _check_size(image.width, image.height, limit)
            image.load()
            mode = image.mode
            pixels = _pillow_to_unit(_upright(image), header.bits)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused by Pillow's size limit: {_reason(exc)}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, zlib.error, ...
        raise CorruptImageError(f"cannot decode {fmt.upper()}: {_reason(exc)}") from exc
    meta = ImageMeta(
        source_format=fmt,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        bits=header.bits,
        photometric=mode,
        view_position=None,
        modality=None,
    )
    return DecodedImage(pixels=pixels, meta=meta)


#: EXIF's Orientation tag; 1 is "as stored".
_EXIF_ORIENTATION: Final = 0x0112


def _upright(image: Image.Image) -> Image.Image:
    """The picture the way a viewer shows it: an EXIF Orientation applied.

    Cameras, phones and some exporters store the pixels as captured and say in EXIF how
    to turn them; a radiograph embedded on its side would be compared on its side.
    """
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
            return image
        return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception:  # a malformed EXIF block says nothing reliable; the pixels are fine
        logger.debug("unreadable EXIF block ignored")
        return image


def _full_scale(values: FloatArray, bits: int) -> float:
    """The white of a 16-bit grayscale picture, as far as its samples tell.

    Exporters often write 10- to 12-bit detector values into 16-bit PNGs unscaled (PNG
    asks for them to be scaled up to the full depth); read against 65535, such a
    radiograph is almost black. The depth taken is the fewest bits (at least 8, at most
    the container's) that hold its brightest sample.
    """
    top = int(values.max()) if values.size else 0
    return float(2 ** min(bits, max(8, top.bit_length())) - 1)


def _pillow_to_unit(image: Image.Image, bits: int) -> FloatArray:
    """A loaded Pillow image → float32 ``(H, W)`` in ``[0, 1]``."""
    if image.mode.startswith("I"):  # 16-bit grayscale: "I;16" or "I" by Pillow's version
        pixels = np.array(image, dtype=np.float32)  # (H, W)
        scale = _full_scale(pixels, bits)
    else:
        if image.mode != "L":
            image = image.convert("L")
        pixels = np.array(image, dtype=np.float32)  # (H, W)
        scale = 255.0
    pixels *= np.float32(1.0 / scale)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return np.ascontiguousarray(pixels)


def _png_header(data: bytes) -> _RasterHeader:
    """Size and bit depth from IHDR; also require every chunk up to IEND to be present.

    Walking the chunk lengths finds truncation without relying on Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` being off.
    """
    ihdr_end = len(_PNG_SIGNATURE) + 8 + 13 + 4
    if len(data) < ihdr_end or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise CorruptImageError("PNG does not start with a complete IHDR chunk")
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(data[12:29]) != crc:
        raise CorruptImageError("PNG IHDR chunk fails its CRC check")
    width, height, bit_depth = struct.unpack(">IIB", data[16:25])
    header = _RasterHeader(width=width, height=height, bits=bit_depth)
    position = len(_PNG_SIGNATURE)
    while True:
        if position + 8 > len(data):
            raise CorruptImageError("truncated PNG: it ends before the IEND chunk")
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        position += 12 + length
        if position > len(data):
            raise CorruptImageError(f"truncated PNG: chunk {kind!r} is cut off")
        if kind == b"IEND":
            return header


def _jpeg_header(data: bytes) -> _RasterHeader:
    """Size and precision from the SOF segment; also require an EOI marker after the scan.

    Entropy-coded data escapes every 0xFF byte, so an EOI found after the first SOS is
    the real end of image: its absence means the file was cut off.
    """
    position = 2
    header: _RasterHeader | None = None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise CorruptImageError(f"malformed JPEG: no marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        segment_end = position + 2 + length
        if length < 2 or segment_end > len(data):
            raise CorruptImageError("truncated JPEG: a header segment is cut off")
        if marker in _JPEG_SOF:
            if length < 8:
                raise CorruptImageError("malformed JPEG: short frame header")
            precision, height, width = struct.unpack(">BHH", data[position + 4 : position + 9])
            header = _RasterHeader(width=width, height=height, bits=precision)
        elif marker == 0xDA:  # start of scan: the header is over
            if header is None:
                raise CorruptImageError("malformed JPEG: scan before frame header")
            if data.find(b"\xff\xd9", segment_end) < 0:
                raise CorruptImageError("truncated JPEG: no end-of-image marker")
            return header
        position = segment_end
    raise CorruptImageError("truncated JPEG: it ends before the image data")
