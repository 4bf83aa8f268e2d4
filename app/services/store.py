"""Files of the stored images: the de-identified PNG derivative, its thumbnail, the original.

Every file is named by the content hash (sha256 of the uploaded bytes) and lives under
``data_dir``; the database keeps paths relative to ``data_dir`` so that the folder can move
as a whole. What is written is a derivative of the decoded pixel array only: PNG files
carry no text chunks, so no DICOM header (patient name, id, birth date, accession) ever
reaches the disk. The uploaded bytes themselves are kept only when the operator asks for
it (``store_originals``).

Writes go to a temporary file in the target folder and are renamed into place, so a crash
never leaves half a PNG under a final name; the same bytes always map to the same names,
so an interrupted ingest that is run again simply overwrites them.

Because the same bytes map to the same names, a delete and a re-upload of those bytes
touch the same files. :meth:`ImageStore.lock` serialises them per content hash, across
threads and processes (``flock`` on a lock file per hash prefix): the upload holds it from
writing its files to committing its row, the delete from committing the removal to
removing the files, and the orphan sweep while it checks and removes. So a delete can never
remove the files of a row that a re-upload committed meanwhile.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.errors import AppError

IMAGES_DIR: Final = "images"
THUMBNAILS_DIR: Final = "thumbnails"
ORIGINALS_DIR: Final = "originals"
LOCKS_DIR: Final = "locks"

logger = logging.getLogger(__name__)

#: Suffix of a kept original, by ``ImageMeta.source_format``.
_ORIGINAL_SUFFIX: Final[dict[str, str]] = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}


class StoreError(AppError):
    """A stored file that is missing or unreadable."""

    code = "stored_file_unreadable"


@dataclass(frozen=True)
class StoredFiles:
    """Paths of one image's files, relative to the store's root."""

    image_path: str
    thumbnail_path: str
    original_path: str | None


def quantize(pixels: npt.NDArray[np.floating], bits: int) -> npt.NDArray[np.uint8 | np.uint16]:
    """Quantise a (H, W) array in [0, 1] to 8-bit (``bits`` ≤ 8) or 16-bit integers.

    The service embeds the de-quantised result (see :func:`dequantize`), not the float
    array, so that re-embedding from the stored PNG later reproduces the same vector.
    """
    # One float copy, worked on in place: a large image must not cost several temporaries.
    scaled = np.clip(pixels, 0.0, 1.0).astype(np.float32, copy=False)  # (H, W)
    scaled *= np.float32(255.0 if bits <= 8 else 65535.0)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8 if bits <= 8 else np.uint16)  # (H, W)


def dequantize(levels: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
    """Map a (H, W) uint8/uint16 array back to float32 in [0, 1]."""
    scale = 255.0 if levels.dtype == np.uint8 else 65535.0
    return (levels.astype(np.float32) / np.float32(scale)).astype(np.float32)  # (H, W)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: on radiographs (noisy low bits) higher levels save ~2 % of the size for
    # 1.5-2x the time, and writing the PNG is a large share of ingesting a big DICOM.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _thumbnail(levels: npt.NDArray[np.uint8 | np.uint16], size: int) -> Image.Image:
    """An 8-bit greyscale thumbnail whose longer side is at most ``size`` pixels."""
    eight = (levels >> 8).astype(np.uint8) if levels.dtype == np.uint16 else levels  # (H, W)
    thumb = Image.fromarray(eight)
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return thumb


class ImageStore:
    """The files under ``root`` (``settings.data_dir``)."""

    def __init__(self, root: Path, *, thumbnail_size: int, store_originals: bool) -> None:
        self.root = root
        self.thumbnail_size = thumbnail_size
        self.store_originals = store_originals

    def prepare_locks(self) -> None:
        """Create every lock file up front (best effort), so that a delete on a disk that
        has since filled up never needs to create one."""
        folder = self.root / LOCKS_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stripe in range(256):
                (folder / f"{stripe:02x}.lock").touch(exist_ok=True)
        except OSError as exc:
            logger.warning("lock files not prepared: %s", exc.strerror or exc)

    @contextmanager
    def lock(self, content_hashes: Iterable[str]) -> Iterator[None]:
        """Hold the write locks of these content hashes (see the module docstring).

        One lock per two-character prefix, taken in sorted order so that two holders of
        overlapping sets never wait on each other in a cycle. ``flock`` locks belong to the
        open file, so threads of one process exclude each other as processes do.
        """
        stripes = sorted({h[:2] for h in content_hashes})
        folder = self.root / LOCKS_DIR
        with ExitStack() as stack:
            for stripe in stripes:
                folder.mkdir(parents=True, exist_ok=True)
                handle = stack.enter_context(open(folder / f"{stripe}.lock", "a+b"))
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield

    def _relative(self, folder: str, content_hash: str, suffix: str) -> str:
        # Two-character fan-out keeps any one folder small at millions of images.
        return f"{folder}/{content_hash[:2]}/{content_hash}{suffix}"

    def _write_atomic(self, relative: str, data: bytes) -> None:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def write(
        self,
        content_hash: str,
        levels: npt.NDArray[np.uint8 | np.uint16],
        *,
        original: bytes | None = None,
        source_format: str | None = None,
    ) -> StoredFiles:
        """Write the PNG of ``levels`` (H, W), its thumbnail and, if kept, the original.

        ``original`` is written only when the store keeps originals; otherwise it is ignored.
        """
        image_path = self._relative(IMAGES_DIR, content_hash, ".png")
        thumbnail_path = self._relative(THUMBNAILS_DIR, content_hash, ".png")
        self._write_atomic(image_path, _png_bytes(Image.fromarray(levels)))
        self._write_atomic(thumbnail_path, _png_bytes(_thumbnail(levels, self.thumbnail_size)))
        original_path: str | None = None
        if self.store_originals and original is not None:
            suffix = _ORIGINAL_SUFFIX.get(source_format or "", ".bin")
            original_path = self._relative(ORIGINALS_DIR, content_hash, suffix)
            self._write_atomic(original_path, original)
        return StoredFiles(image_path, thumbnail_path, original_path)

    def path(self, relative: str) -> Path:
        """Absolute path of a stored file (``relative`` as kept in the database)."""
        return self.root / relative

    def read_levels(self, relative: str) -> npt.NDArray[np.uint8 | np.uint16]:
        """Read a stored PNG back as its (H, W) uint8 or uint16 array."""
        target = self.root / relative
        try:
            with Image.open(target) as image:
                image.load()
                array = np.asarray(image)
        except (OSError, ValueError) as exc:
            raise StoreError(f"stored image {relative} cannot be read: {exc}") from exc
        if array.dtype == np.uint8:
            return array
        # Pillow may hand a 16-bit PNG back as int32 ("I" mode); the values fit uint16.
        return array.astype(np.uint16)

    def read_pixels(self, relative: str) -> npt.NDArray[np.float32]:
        """Read a stored PNG back as float32 (H, W) in [0, 1], as the encoder saw it."""
        return dequantize(self.read_levels(relative))

    def read_bytes(self, relative: str) -> bytes:
        target = self.root / relative
        try:
            return target.read_bytes()
        except OSError as exc:
            raise StoreError(f"stored file {relative} cannot be read: {exc}") from exc

    def delete(self, *relatives: str | None) -> None:
        """Remove files; a file already gone is not an error (deletes may be retried)."""
        for relative in relatives:
            if relative:
                (self.root / relative).unlink(missing_ok=True)
