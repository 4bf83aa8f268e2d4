"""Durable files of a saved index: content-named data files, checksums, the manifest.

Data files are written to a temporary name, fsynced and renamed to a name derived from
their sha256; ``manifest.json`` is replaced last and is the commit point, so a crash
leaves the previous save readable. Reading checks every checksum before FAISS parses a
byte, because a torn or altered file must lead to a rebuild, not to a crash in C++.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from index.checks import IdArray
from index.errors import IndexCorruptError, IndexMismatchError
from index.kinds import Kind, kind_of
from index.manifest import MANIFEST_NAME, IndexManifest

logger = logging.getLogger(__name__)


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        return self._file.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_hashed(
    directory: Path, stem: str, suffix: str, write: Callable[[_HashingWriter], None]
) -> tuple[str, str]:
    """Write a file durably under a content-derived name; return (name, "sha256:<hex>")."""
    tmp = directory / f".{stem}-{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        digest = writer.sha256.hexdigest()
        name = f"{stem}-{digest[:16]}{suffix}"
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name, f"sha256:{digest}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _verify_file(path: Path, checksum: str) -> None:
    try:
        actual = _sha256_file(path)
    except FileNotFoundError as exc:
        raise IndexCorruptError(f"{path} is missing", code="file_missing") from exc
    except OSError as exc:
        raise IndexCorruptError(f"{path} cannot be read: {exc}", code="file_missing") from exc
    if actual != checksum:
        raise IndexCorruptError(
            f"{path} has {actual}, the manifest says {checksum}: torn or altered file",
            code="checksum_mismatch",
        )


@dataclass(frozen=True)
class DataFiles:
    """Names and checksums of the data files of one save (labels only for HNSW)."""

    index_file: str
    checksum: str
    labels_file: str | None = None
    labels_checksum: str | None = None


def write_data_files(path: Path, faiss_index: Any, labels: IdArray | None) -> DataFiles:
    """Write the FAISS index (and the HNSW slot labels) durably under content names."""

    def write_index(writer: _HashingWriter) -> None:
        # PyCallbackIOWriter is missing from faiss's bundled stubs.
        callback = faiss.PyCallbackIOWriter(writer.write)  # type: ignore[attr-defined]
        faiss.write_index(faiss_index, callback)

    index_file, checksum = _write_hashed(path, "index", ".faiss", write_index)
    if labels is None:
        return DataFiles(index_file, checksum)

    def write_labels(writer: _HashingWriter) -> None:
        np.save(writer, labels, allow_pickle=False)

    labels_file, labels_checksum = _write_hashed(path, "labels", ".npy", write_labels)
    return DataFiles(index_file, checksum, labels_file, labels_checksum)


def commit_manifest(path: Path, manifest: IndexManifest) -> None:
    """Replace the manifest (the commit point), then delete the data files it no longer names.

    The caller holds the index's writer mutex, so a concurrent save's temporary files are
    never taken for stale ones.
    """
    _write_text_atomic(path / MANIFEST_NAME, manifest.to_json())
    _fsync_dir(path)
    keep = {manifest.index_file, manifest.labels_file}
    for pattern in ("index-*.faiss", "labels-*.npy", ".index-*.tmp", ".labels-*.tmp"):
        for stale in path.glob(pattern):
            if stale.name not in keep:
                try:
                    stale.unlink()
                except OSError as exc:
                    # The new save is committed already; a leftover file only costs space.
                    logger.warning("cannot delete stale index file %s: %s", stale, exc)


@dataclass(frozen=True)
class SavedIndex:
    """A saved index read back and checked against its manifest."""

    faiss_index: Any
    kind: Kind
    labels: IdArray | None
    manifest: IndexManifest


def read_saved(
    path: Path, *, expected_model_id: str | None, expected_dim: int | None
) -> SavedIndex:
    """Read the index saved in ``path`` after checking its manifest and every checksum.

    Raises :class:`IndexMismatchError` when it belongs to another model or dimension and
    :class:`IndexCorruptError` when a file is missing, torn or altered.
    """
    manifest = _read_manifest(path)
    if expected_model_id is not None and manifest.model_id != expected_model_id:
        raise IndexMismatchError(
            f"index at {path} was built for model {manifest.model_id!r}, "
            f"expected {expected_model_id!r}",
            code="model_mismatch",
        )
    if expected_dim is not None and manifest.dim != expected_dim:
        raise IndexMismatchError(
            f"index at {path} holds {manifest.dim}-d vectors, expected {expected_dim}",
            code="dim_mismatch",
        )
    # Checksums first: FAISS must never parse bytes that might be torn or tampered with.
    _verify_file(path / manifest.index_file, manifest.checksum)
    labels = _read_labels(path, manifest)
    try:
        # read_index returns the most derived class already (and owns it).
        raw = faiss.read_index(str(path / manifest.index_file))
    except RuntimeError as exc:
        raise IndexCorruptError(
            f"FAISS cannot read {manifest.index_file}: {exc}", code="content_mismatch"
        ) from exc
    kind = kind_of(raw)
    _check_matches_manifest(path, raw, kind, labels, manifest)
    return SavedIndex(raw, kind, labels, manifest)


def _read_manifest(path: Path) -> IndexManifest:
    try:
        text = (path / MANIFEST_NAME).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise IndexCorruptError(f"no {MANIFEST_NAME} in {path}", code="manifest_missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(
            f"cannot read {path / MANIFEST_NAME}: {exc}", code="manifest_invalid"
        ) from exc
    return IndexManifest.from_json(text)


def _read_labels(path: Path, manifest: IndexManifest) -> IdArray | None:
    if manifest.labels_file is None:
        return None
    if manifest.labels_checksum is None:
        raise IndexCorruptError("labels file without a checksum", code="manifest_invalid")
    _verify_file(path / manifest.labels_file, manifest.labels_checksum)
    try:
        labels: IdArray = np.load(path / manifest.labels_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read the labels: {exc}", code="content_mismatch") from exc
    return labels


def _check_matches_manifest(
    path: Path, raw: Any, kind: Kind, labels: IdArray | None, manifest: IndexManifest
) -> None:
    problems: list[str] = []
    if kind != manifest.kind:
        problems.append(f"kind {kind} != {manifest.kind}")
    if raw.d != manifest.dim:
        problems.append(f"dim {raw.d} != {manifest.dim}")
    if raw.metric_type != faiss.METRIC_INNER_PRODUCT:
        problems.append("metric is not inner product")
    if kind == "hnsw":
        if labels is None or labels.dtype != np.int64 or labels.shape != (raw.ntotal,):
            problems.append("HNSW labels missing or not one int64 per stored vector")
    elif labels is not None:
        problems.append(f"labels file for a {kind} index")
    if problems:
        raise IndexCorruptError(
            f"index at {path} does not match its manifest: {'; '.join(problems)}",
            code="content_mismatch",
        )
