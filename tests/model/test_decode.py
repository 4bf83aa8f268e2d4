"""Decoding of DICOM / PNG / JPEG uploads into float32 (H, W) in [0, 1], air dark."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from model.errors import ModelError
from model.inputs.decode import (
    DEFAULT_MAX_PIXELS,
    ColorDicomError,
    CorruptImageError,
    DecodedImage,
    ImageDecodeError,
    ImageMeta,
    ImageTooLargeError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedTransferSyntaxError,
    decode_file,
    decode_image,
    sniff_format,
)

RG1_SHAPE = (1955, 1841)
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-774411",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-99812",
    "StudyDate": "20240117",
    "InstitutionName": "Saint Example Hospital",
}


def pydicom_file(name: str) -> Path:
    # download=False: the pydicom-data wheel holds the files; nothing may be fetched.
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is missing: install pydicom-data"
    return Path(path)


@pytest.fixture(scope="module")
def rg1() -> dict[str, DecodedImage]:
    names = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
    return {name: decode_file(pydicom_file(name)) for name in names}


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    return pydicom_file("RG1_UNCR.dcm").read_bytes()


@pytest.fixture(scope="session")
def shared_pngs(shared_dir: Path) -> list[Path]:
    paths = sorted((shared_dir / "data").glob("*/images/*.png"))
    assert len(paths) == 71, "expected 55 figure1-covid + 16 kermany-16 PNGs"
    return paths


def ramp(rows: int = 8, columns: int = 512, high: int = 4095) -> np.ndarray:
    """uint16 (rows, columns) covering 0..high evenly, row after row."""
    return np.linspace(0, high, rows * columns).round().astype(np.uint16).reshape(rows, columns)


def make_dicom(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    **attributes: Any,
) -> bytes:
    """A single-frame DICOM file holding ``pixels`` (rows, columns[, samples])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.ViewPosition = "AP"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
        if ds.SamplesPerPixel > 1:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[132:]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) announcing ``width`` × ``height`` 8-bit gray."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def expect_code(code: str, call: Callable[[], object]) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        call()
    assert caught.value.code == code, f"{caught.value.code}: {caught.value}"
    return caught.value


# ------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ImageDecodeError, "image_decode_error"),
        (NotAnImageError, "not_an_image"),
        (CorruptImageError, "corrupt_image"),
        (NoPixelDataError, "no_pixel_data"),
        (MultiFrameError, "multi_frame"),
        (ColorDicomError, "color_dicom"),
        (UnsupportedTransferSyntaxError, "unsupported_transfer_syntax"),
        (ImageTooLargeError, "image_too_large"),
    ],
)
def test_error_codes_are_stable(error: type[ImageDecodeError], code: str) -> None:
    assert issubclass(error, ImageDecodeError)
    assert issubclass(error, ModelError)
    assert error("message").code == code


def test_meta_has_only_non_identifying_fields() -> None:
    names = [field.name for field in dataclasses.fields(ImageMeta)]
    assert names == [
        "source_format",
        "width",
        "height",
        "bits",
        "photometric",
        "view_position",
        "modality",
    ]
    assert DEFAULT_MAX_PIXELS >= 4096 * 4096


def test_sniff_format(rg1_bytes: bytes, shared_pngs: list[Path]) -> None:
    png = shared_pngs[0].read_bytes()
    jpeg = io.BytesIO()
    Image.open(shared_pngs[0]).save(jpeg, format="JPEG")
    assert sniff_format(rg1_bytes) == "dicom"
    assert sniff_format(rg1_bytes[132:]) == "dicom"  # preamble-less
    assert sniff_format(png) == "png"
    assert sniff_format(jpeg.getvalue()) == "jpeg"
    assert sniff_format(b"") is None
    assert sniff_format(b"GIF89a" + bytes(200)) is None
    # A near miss of the magic is not DICOM (nor the PNG that follows it).
    assert sniff_format(bytes(128) + b"DIC" + png) is None


# ----------------------------------------------------------------- real DICOM


def test_rg1_meta_and_array_contract(rg1: dict[str, DecodedImage]) -> None:
    for name, decoded in rg1.items():
        assert decoded.meta == ImageMeta(
            source_format="dicom",
            width=RG1_SHAPE[1],
            height=RG1_SHAPE[0],
            bits=15,
            photometric="MONOCHROME1",
            view_position="PA",
            modality="CR",
        ), name
        pixels = decoded.pixels
        assert pixels.shape == RG1_SHAPE
        assert pixels.dtype == np.float32
        assert pixels.flags.c_contiguous
        assert 0.0 <= pixels.min() < pixels.max() <= 1.0


def test_rg1_encodings_decode_to_the_same_picture(rg1: dict[str, DecodedImage]) -> None:
    reference = rg1["RG1_UNCR.dcm"].pixels
    # Lossless JPEG 2000 reproduces the uncompressed file bit for bit.
    np.testing.assert_array_equal(rg1["RG1_J2KR.dcm"].pixels, reference)
    # RG1_UNCI is the lossy J2KI stream stored uncompressed: same pixels.
    np.testing.assert_array_equal(rg1["RG1_J2KI.dcm"].pixels, rg1["RG1_UNCI.dcm"].pixels)
    lossy = rg1["RG1_J2KI.dcm"].pixels
    assert float(np.abs(lossy - reference).mean()) < 0.005
    assert np.corrcoef(lossy.ravel(), reference.ravel())[0, 1] > 0.99


def region_mean(pixels: np.ndarray, top: float, bottom: float, left: float, right: float) -> float:
    """Mean of a box given as fractions of the image height and width."""
    rows, columns = pixels.shape
    box = pixels[int(top * rows) : int(bottom * rows), int(left * columns) : int(right * columns)]
    return float(box.mean())


def test_rg1_monochrome1_is_inverted_so_lungs_are_dark(rg1: dict[str, DecodedImage]) -> None:
    for name, decoded in rg1.items():
        pixels = decoded.pixels
        right_lung = region_mean(pixels, 0.30, 0.50, 0.18, 0.35)  # patient's right: image left
        left_lung = region_mean(pixels, 0.30, 0.50, 0.62, 0.80)
        spine = region_mean(pixels, 0.30, 0.60, 0.45, 0.55)
        liver = region_mean(pixels, 0.80, 0.95, 0.10, 0.40)
        for lung in (right_lung, left_lung):
            assert lung < spine - 0.15, name
            assert lung < liver - 0.15, name


def test_rg1_window_is_applied(rg1: dict[str, DecodedImage], rg1_bytes: bytes) -> None:
    ds = pydicom.dcmread(io.BytesIO(rg1_bytes))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (15000.0, 30000.0)
    stored = ds.pixel_array.astype(np.float64)
    # LINEAR window of PS3.3 C.11.2.1.2 onto [0, 1], then MONOCHROME1 inverted.
    expected = 1.0 - np.clip((stored - 14999.5) / 29999.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(rg1["RG1_UNCR.dcm"].pixels, expected, atol=1e-5)


def test_metadata_never_carries_patient_identifiers(rg1_bytes: bytes) -> None:
    source = pydicom.dcmread(io.BytesIO(rg1_bytes), stop_before_pixels=True)
    identifiers = [
        str(source.PatientName),
        str(source.PatientID),
        str(source.PatientBirthDate),
        str(source.AccessionNumber),
        str(source.StudyDate),
        str(source.InstitutionName),
        str(source.StudyInstanceUID),
    ]
    synthetic = decode_image(make_dicom(ramp()))
    for decoded, values in (
        (decode_image(rg1_bytes), identifiers),
        (synthetic, list(PATIENT.values())),
    ):
        text = repr(decoded.meta) + repr(dataclasses.asdict(decoded.meta))
        for value in values:
            assert value not in text


def test_rle_and_jpeg_lossless_dicom_match_their_uncompressed_twin() -> None:
    rle = decode_file(pydicom_file("MR_small_RLE.dcm"))
    plain = decode_file(pydicom_file("MR_small.dcm"))
    np.testing.assert_array_equal(rle.pixels, plain.pixels)
    jpeg_lossless = decode_file(pydicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert jpeg_lossless.pixels.shape == (768, 1024)
    assert jpeg_lossless.meta.bits == 8


def test_preamble_less_dicom_decodes_like_the_full_file(
    rg1_bytes: bytes, rg1: dict[str, DecodedImage]
) -> None:
    decoded = decode_image(rg1_bytes[132:])
    np.testing.assert_array_equal(decoded.pixels, rg1["RG1_UNCR.dcm"].pixels)
    assert decoded.meta == rg1["RG1_UNCR.dcm"].meta


def test_real_colour_multiframe_and_pixelless_dicoms_are_refused() -> None:
    expect_code("color_dicom", lambda: decode_file(pydicom_file("SC_rgb.dcm")))
    expect_code("color_dicom", lambda: decode_file(pydicom_file("OBXXXX1A.dcm")))  # PALETTE COLOR
    expect_code("multi_frame", lambda: decode_file(pydicom_file("emri_small.dcm")))
    expect_code("no_pixel_data", lambda: decode_file(pydicom_file("rtplan.dcm")))
    expect_code("unsupported_transfer_syntax", lambda: decode_file(pydicom_file("image_dfl.dcm")))
    expect_code("corrupt_image", lambda: decode_file(pydicom_file("MR_truncated.dcm")))


def test_dicom_size_is_checked_before_pixel_data(rg1_bytes: bytes) -> None:
    expect_code("image_too_large", lambda: decode_image(rg1_bytes, max_pixels=1_000_000))
    # 65535 × 65535 claimed, 8 bytes present: refused from the header, never decoded.
    liar = make_dicom(np.zeros((2, 2), np.uint16), Rows=65535, Columns=65535)
    started = time.perf_counter()
    error = expect_code("image_too_large", lambda: decode_image(liar))
    assert time.perf_counter() - started < 1.0
    assert "65535x65535" in str(error)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_truncated_real_dicoms_are_corrupt(rg1_bytes: bytes) -> None:
    expect_code("corrupt_image", lambda: decode_image(rg1_bytes[: len(rg1_bytes) // 2]))
    j2k = pydicom_file("RG1_J2KR.dcm").read_bytes()
    expect_code("corrupt_image", lambda: decode_image(j2k[: len(j2k) // 2]))
    # Cut inside the header, before (7FE0,0010): nothing left that holds pixels.
    expect_code("no_pixel_data", lambda: decode_image(rg1_bytes[:1000]))


# ------------------------------------------------------------ generated DICOM


def test_monochrome2_without_window_is_scaled_by_bits_stored() -> None:
    stored = ramp()
    decoded = decode_image(make_dicom(stored))
    np.testing.assert_allclose(decoded.pixels, stored / 4095.0, atol=1e-6)
    assert decoded.meta == ImageMeta("dicom", 512, 8, 12, "MONOCHROME2", "AP", "DX")


def test_generated_monochrome1_is_inverted() -> None:
    stored = ramp()
    decoded = decode_image(make_dicom(stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(decoded.pixels, 1.0 - stored / 4095.0, atol=1e-6)
    assert decoded.pixels[0, 0] == 1.0  # stored 0 is white in MONOCHROME1
    assert decoded.pixels[-1, -1] == 0.0


def test_signed_pixels_use_the_signed_range() -> None:
    stored = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    decoded = decode_image(make_dicom(stored))
    np.testing.assert_allclose(decoded.pixels, (stored + 2048) / 4095.0, atol=1e-6)


def test_linear_window_is_applied() -> None:
    stored = ramp()
    decoded = decode_image(make_dicom(stored, WindowCenter=2048, WindowWidth=1024))
    expected = np.clip((stored - 2047.5) / 1023.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    flat = decoded.pixels.ravel()
    assert (flat[stored.ravel() <= 1536] == 0.0).all()
    assert (flat[stored.ravel() >= 2560] == 1.0).all()


def test_first_of_several_windows_is_used_and_monochrome1_inverts_after_it() -> None:
    stored = ramp()
    decoded = decode_image(
        make_dicom(
            stored, photometric="MONOCHROME1", WindowCenter=[1000, 3000], WindowWidth=[500, 100]
        )
    )
    expected = 1.0 - np.clip((stored - 999.5) / 499.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "formula"),
    [
        ("LINEAR_EXACT", lambda x: np.clip((x - 2048) / 1024 + 0.5, 0, 1)),
        ("SIGMOID", lambda x: 1.0 / (1.0 + np.exp(-4.0 * (x - 2048) / 1024))),
    ],
)
def test_voi_lut_functions(function: str, formula: Callable[[np.ndarray], np.ndarray]) -> None:
    stored = ramp()
    decoded = decode_image(
        make_dicom(stored, WindowCenter=2048, WindowWidth=1024, VOILUTFunction=function)
    )
    np.testing.assert_allclose(decoded.pixels, formula(stored.astype(np.float64)), atol=1e-5)


def test_rescale_is_applied_before_the_window() -> None:
    stored = ramp()
    # CT-style: stored 0..4095 → -1024..3071 HU; a lung-ish window at -600 / 1500.
    decoded = decode_image(
        make_dicom(
            stored,
            RescaleSlope=1,
            RescaleIntercept=-1024,
            WindowCenter=-600,
            WindowWidth=1500,
        )
    )
    values = stored.astype(np.float64) - 1024.0
    expected = np.clip((values + 600.5) / 1499.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)


def test_rescale_without_window_keeps_the_full_stored_range() -> None:
    stored = ramp()
    decoded = decode_image(make_dicom(stored, RescaleSlope=-2, RescaleIntercept=100))
    # A negative slope flips the range; the normalisation follows the values.
    np.testing.assert_allclose(decoded.pixels, 1.0 - stored / 4095.0, atol=1e-6)


def lut_item(first: int, data: list[int], *, words: bool = True) -> Dataset:
    """A LUT item; LUT Data as OW bytes (the usual encoding) or as a US list."""
    item = Dataset()
    item.LUTDescriptor = [len(data), first, 16]
    if words:
        item.LUTData = np.asarray(data, dtype="<u2").tobytes()
    else:
        item.add_new(0x00283006, "US", data)
    return item


def test_voi_lut_sequence_takes_precedence_over_the_window() -> None:
    stored = ramp()
    inverse = [4095 - value for value in range(4096)]
    decoded = decode_image(
        make_dicom(
            stored,
            VOILUTSequence=Sequence([lut_item(0, inverse)]),
            WindowCenter=2048,
            WindowWidth=16,
        )
    )
    np.testing.assert_allclose(decoded.pixels, 1.0 - stored / 4095.0, atol=1e-6)


def test_voi_lut_clamps_inputs_outside_its_entries() -> None:
    stored = ramp()
    # 1001 entries mapping 1000..2000 onto 0..1000; outside, the end entries hold.
    decoded = decode_image(
        make_dicom(stored, VOILUTSequence=Sequence([lut_item(1000, list(range(1001)))]))
    )
    expected = np.clip(stored.astype(np.float64) - 1000.0, 0.0, 1000.0) / 1000.0
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)


def test_modality_lut_sequence_is_applied() -> None:
    stored = ramp(high=255)
    squares = [value * value for value in range(256)]
    decoded = decode_image(
        make_dicom(
            stored, bits_stored=8, ModalityLUTSequence=Sequence([lut_item(0, squares, words=False)])
        )
    )
    np.testing.assert_allclose(decoded.pixels, (stored / 255.0) ** 2, atol=1e-6)


def test_rle_compressed_generated_dicom() -> None:
    stored = ramp()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(stored)))
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded = decode_image(buffer.getvalue())
    np.testing.assert_allclose(decoded.pixels, stored / 4095.0, atol=1e-6)


def test_generated_colour_and_multiframe_dicoms_are_refused() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    expect_code(
        "color_dicom", lambda: decode_image(make_dicom(rgb, photometric="RGB", bits_stored=8))
    )
    # One sample per pixel but a colour interpretation is still colour.
    expect_code(
        "color_dicom",
        lambda: decode_image(make_dicom(ramp(), photometric="YBR_FULL")),
    )
    frames = np.concatenate([ramp(), ramp()])  # two 8 × 512 frames stacked
    expect_code(
        "multi_frame",
        lambda: decode_image(make_dicom(frames, NumberOfFrames=2, Rows=8)),
    )


def test_generated_dicom_without_pixel_data() -> None:
    expect_code("no_pixel_data", lambda: decode_image(make_dicom(None)))


def test_unsupported_transfer_syntaxes_are_refused() -> None:
    stored = ramp()
    mpeg = make_dicom(
        None,
        transfer_syntax=MPEG2MPML,
        Rows=8,
        Columns=512,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=0,
        PixelData=encapsulate([stored.tobytes()]),
    )
    error = expect_code("unsupported_transfer_syntax", lambda: decode_image(mpeg))
    assert "MPEG2" in str(error)
    private = make_dicom(stored, transfer_syntax="1.2.826.0.1.3680043.2.1143.999")
    expect_code("unsupported_transfer_syntax", lambda: decode_image(private))


def test_implicit_vr_dicom_decodes() -> None:
    stored = ramp()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(stored)))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=True)
    np.testing.assert_allclose(decode_image(buffer.getvalue()).pixels, stored / 4095.0, atol=1e-6)


@pytest.mark.parametrize("implicit", [True, False])
def test_missing_transfer_syntax_is_taken_from_the_dataset_encoding(implicit: bool) -> None:
    stored = ramp()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(stored)))
    del ds.file_meta.TransferSyntaxUID  # older writers omit it
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    decoded = decode_image(buffer.getvalue())
    np.testing.assert_allclose(decoded.pixels, stored / 4095.0, atol=1e-6)


# ----------------------------------------------------------------- PNG / JPEG


def test_shared_pngs_decode_to_float32_unit_range(shared_pngs: list[Path]) -> None:
    for path in shared_pngs:
        decoded = decode_file(path)
        with Image.open(path) as image:
            expected = np.asarray(image, dtype=np.float64) / 255.0
            width, height = image.size
        assert decoded.meta == ImageMeta("png", width, height, 8, "L", None, None), path.name
        assert decoded.pixels.shape == (height, width)
        assert decoded.pixels.dtype == np.float32
        assert decoded.pixels.flags.c_contiguous
        assert decoded.pixels.min() >= 0.0
        assert decoded.pixels.max() <= 1.0
        np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)


def test_sixteen_bit_png_is_scaled_by_65535() -> None:
    stored = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    data = png_bytes(Image.fromarray(stored))
    assert data[24] == 16  # IHDR bit depth
    decoded = decode_image(data)
    assert decoded.meta.bits == 16
    assert decoded.meta.photometric is not None
    assert decoded.meta.photometric.startswith("I")
    np.testing.assert_allclose(decoded.pixels, stored / 65535.0, atol=1e-6)
    assert decoded.pixels.max() == 1.0


def test_colour_palette_alpha_and_bilevel_pngs_become_luminance(shared_pngs: list[Path]) -> None:
    with Image.open(shared_pngs[0]) as image:
        gray = image.convert("L")
    reference = decode_image(png_bytes(gray)).pixels
    for mode in ("RGB", "RGBA", "LA"):
        decoded = decode_image(png_bytes(gray.convert(mode)))
        assert decoded.meta.photometric == mode
        np.testing.assert_array_equal(decoded.pixels, reference)

    red = decode_image(png_bytes(Image.new("RGB", (4, 4), (255, 0, 0)))).pixels
    np.testing.assert_allclose(red, 0.299, atol=1.0 / 255.0)

    palette = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="P")
    palette.putpalette([level for index in range(256) for level in (index, index, index)])
    decoded = decode_image(png_bytes(palette))
    assert decoded.meta.photometric == "P"
    np.testing.assert_allclose(decoded.pixels.ravel(), np.arange(256) / 255.0, atol=1e-6)

    bilevel = Image.fromarray(np.eye(8, dtype=bool))
    decoded = decode_image(png_bytes(bilevel))
    assert decoded.meta.bits == 1
    np.testing.assert_array_equal(decoded.pixels, np.eye(8, dtype=np.float32))


def test_jpeg_decodes_close_to_its_source(shared_pngs: list[Path]) -> None:
    source = decode_file(shared_pngs[0])
    buffer = io.BytesIO()
    Image.open(shared_pngs[0]).save(buffer, format="JPEG", quality=95)
    decoded = decode_image(buffer.getvalue())
    assert decoded.meta == dataclasses.replace(source.meta, source_format="jpeg")
    assert float(np.abs(decoded.pixels - source.pixels).mean()) < 0.01

    colour = io.BytesIO()
    Image.open(shared_pngs[0]).convert("RGB").save(colour, format="JPEG", quality=95)
    decoded = decode_image(colour.getvalue())
    assert decoded.meta.photometric == "RGB"
    assert float(np.abs(decoded.pixels - source.pixels).mean()) < 0.01


def test_png_claiming_100k_square_is_refused_fast_without_allocating() -> None:
    data = png_claiming(100_000, 100_000)
    assert len(data) < 100
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = expect_code("image_too_large", lambda: decode_image(data))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1_000_000
    assert "100000x100000" in str(error)


def test_raster_size_limit_follows_max_pixels_and_pillows_bomb_limit(
    shared_pngs: list[Path],
) -> None:
    expect_code("image_too_large", lambda: decode_file(shared_pngs[0], max_pixels=1000))
    # Between Pillow's warning threshold and the caller's limit: refused, never warned.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000
    expect_code(
        "image_too_large", lambda: decode_image(png_claiming(10_000, 10_000), max_pixels=10**9)
    )


def test_truncated_png_and_jpeg_are_corrupt(
    shared_pngs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    png = shared_pngs[0].read_bytes()
    jpeg = io.BytesIO()
    Image.open(shared_pngs[0]).save(jpeg, format="JPEG")
    cut_jpeg = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    cut_png = png[: len(png) // 2]
    for strict in (False, True):
        # Another library may turn Pillow's global leniency on: truncation still counts.
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", strict)
        expect_code("corrupt_image", lambda: decode_image(cut_png))
        expect_code("corrupt_image", lambda: decode_image(cut_jpeg))
        expect_code("corrupt_image", lambda: decode_image(png[:40]))
        expect_code("corrupt_image", lambda: decode_image(jpeg.getvalue()[:20]))


def test_png_with_a_damaged_header_is_corrupt() -> None:
    data = bytearray(png_claiming(8, 8))
    data[20] ^= 0xFF  # width byte changed, CRC not
    expect_code("corrupt_image", lambda: decode_image(bytes(data)))


# --------------------------------------------------------------- not an image


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello, world",
        np.random.default_rng(0).bytes(4096),
        b"%PDF-1.7\n" + bytes(300),
    ],
    ids=["empty", "text", "random", "pdf"],
)
def test_non_images_are_refused(payload: bytes) -> None:
    expect_code("not_an_image", lambda: decode_image(payload))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_image_formats_are_refused(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format=fmt)
    expect_code("not_an_image", lambda: decode_image(buffer.getvalue()))


def test_dicm_magic_over_garbage_is_a_typed_error() -> None:
    data = bytes(128) + b"DICM" + np.random.default_rng(1).bytes(2048)
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_damaged_payloads_never_escape_untyped(shared_pngs: list[Path]) -> None:
    """Bytes flipped at random in small DICOM, PNG and JPEG files: decode or typed error."""
    with Image.open(shared_pngs[0]) as image:
        small = image.convert("L").resize((48, 40))
    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG")
    sources = [make_dicom(ramp()), png_bytes(small), jpeg.getvalue()]
    rng = np.random.default_rng(2024)
    outcomes = {"decoded": 0, "refused": 0}
    for source in sources:
        for _ in range(150):
            damaged = bytearray(source)
            for position in rng.integers(0, len(source), size=int(rng.integers(1, 6))):
                damaged[position] = int(rng.integers(0, 256))
            try:
                decoded = decode_image(bytes(damaged))
            except ImageDecodeError:
                outcomes["refused"] += 1
                continue
            outcomes["decoded"] += 1
            assert decoded.pixels.dtype == np.float32
            assert decoded.pixels.shape == (decoded.meta.height, decoded.meta.width)
            assert np.isfinite(decoded.pixels).all()
            assert decoded.pixels.min() >= 0.0
            assert decoded.pixels.max() <= 1.0
    assert outcomes["decoded"] > 0, outcomes
    assert outcomes["refused"] > 0, outcomes


def test_decode_file_reads_any_suffix_and_reports_missing_files(
    tmp_path: Path, rg1_bytes: bytes
) -> None:
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(make_dicom(ramp()))
    assert decode_file(disguised).meta.source_format == "dicom"
    assert decode_file(str(disguised)).meta.source_format == "dicom"
    with pytest.raises(FileNotFoundError):
        decode_file(tmp_path / "missing.dcm")


def test_strips_are_refused_from_the_header_only_when_asked() -> None:
    from model.inputs.decode import AspectRatioError, peek_size

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 9000), np.uint8)).save(buffer, format="PNG")
    strip = buffer.getvalue()
    assert peek_size(strip) == (9000, 1)
    with pytest.raises(AspectRatioError) as caught:
        decode_image(strip, max_aspect_ratio=4.0)
    assert caught.value.code == "aspect_ratio_out_of_range"
    assert decode_image(strip).pixels.shape == (1, 9000)
    assert peek_size(b"not an image") is None
    dicom = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert dicom is not None
    ds = pydicom.dcmread(dicom, stop_before_pixels=True)
    assert peek_size(Path(dicom).read_bytes()) == (int(ds.Columns), int(ds.Rows))


def test_icons_are_refused_only_when_asked() -> None:
    from model.inputs.decode import ImageTooSmallError

    def png(height: int, width: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((height, width), 90, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    for height, width in ((1, 1), (31, 40), (40, 31)):
        with pytest.raises(ImageTooSmallError) as caught:
            decode_image(png(height, width), min_side=32)
        assert caught.value.code == "image_too_small"
        assert f"{width}x{height}" in str(caught.value)
        assert decode_image(png(height, width)).pixels.shape == (height, width)
    assert decode_image(png(32, 32), min_side=32).pixels.shape == (32, 32)
    # A DICOM too, from its Rows and Columns.
    with pytest.raises(ImageTooSmallError):
        decode_image(make_dicom(np.zeros((8, 8), np.uint16)), min_side=32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    """A picture stored on its side with EXIF Orientation 6 decodes the way viewers show it."""
    from PIL import Image

    stored = np.zeros((20, 40), np.uint8)  # (H, W): the left half bright
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format=fmt, exif=exif.tobytes())

    decoded = decode_image(buffer.getvalue())

    assert decoded.pixels.shape == (40, 20)
    assert (decoded.meta.width, decoded.meta.height) == (20, 40)
    # The stored left half is the displayed top half.
    assert decoded.pixels[:20].mean() > 0.9
    assert decoded.pixels[20:].mean() < 0.1


def test_a_malformed_exif_block_does_not_refuse_the_picture() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(
        buffer, format="JPEG", exif=b"Exif\x00\x00garbage-not-tiff"
    )
    decoded = decode_image(buffer.getvalue())
    assert decoded.pixels.shape == (20, 30)


@pytest.mark.parametrize(
    ("top", "white"),
    [
        (4095, 4095),  # 12-bit detector values in a 16-bit PNG, unscaled
        (1000, 1023),  # 10-bit
        (65535, 65535),  # the full 16-bit range
        (200, 255),  # 8-bit values in a 16-bit container
    ],
)
def test_sixteen_bit_png_is_read_against_the_depth_its_samples_use(top: int, white: int) -> None:
    """A 12-bit radiograph exported into a 16-bit PNG is not decoded almost black."""
    from PIL import Image

    ramp = np.linspace(0, top, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")

    pixels = decode_image(buffer.getvalue()).pixels

    np.testing.assert_allclose(pixels, ramp / white, atol=1e-6)
