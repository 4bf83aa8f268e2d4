"""The orphan sweep: stored files that no database row refers to are removed.

An upload writes its files before it commits its row (so that a committed row never
points at a missing file). When the process dies in between, or the commit fails (the
database down, the disk full), the files stay behind with no row: on a full disk they go
on holding the space. The sweep, run at start-up and then periodically, removes them.

A file is only a candidate once it is older than the grace period: an upload in flight
(in this process or in another one on the same data directory) has written its files but
not yet committed. Each candidate is then re-checked under the content hash's store lock,
which an upload holds from writing to committing, so a row committed meanwhile is seen.
Leftover temporary files of interrupted atomic writes go the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Image
from app.services.store import IMAGES_DIR, ORIGINALS_DIR, THUMBNAILS_DIR, ImageStore

logger = logging.getLogger(__name__)

#: Content hashes looked up in the database per query.
LOOKUP_BATCH: Final = 500
_HASH_CHARS: Final = 64


@dataclass
class SweepReport:
    """What one sweep removed."""

    files: int = 0
    bytes: int = 0
    spared: int = 0


def _stored_files(root: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, content hash or None for a file that is no stored file) under the folders."""
    for folder in (IMAGES_DIR, THUMBNAILS_DIR, ORIGINALS_DIR):
        top = root / folder
        if not top.is_dir():
            continue
        for fan in os.scandir(top):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan.path):
                if not entry.is_file(follow_symlinks=False):
                    continue
                # "<hash>.png", or ".<hash>.png.<random>.tmp" of a write that never finished.
                name = entry.name.lstrip(".")
                digest = name[:_HASH_CHARS]
                is_temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
                valid = len(digest) == _HASH_CHARS and all(c in "0123456789abcdef" for c in digest)
                yield Path(entry.path), (digest if valid and not is_temporary else None)


def _known(sessions: sessionmaker[Session], digests: list[str]) -> set[str]:
    found: set[str] = set()
    with sessions() as session:
        for start in range(0, len(digests), LOOKUP_BATCH):
            chunk = digests[start : start + LOOKUP_BATCH]
            found.update(
                session.scalars(select(Image.content_hash).where(Image.content_hash.in_(chunk)))
            )
    return found


def _remove(path: Path, cutoff: float, report: SweepReport) -> None:
    try:
        stat = path.stat()
        if stat.st_mtime > cutoff:
            report.spared += 1  # rewritten since it was listed: an upload is at work
            return
        path.unlink()
    except FileNotFoundError:
        return
    report.files += 1
    report.bytes += stat.st_size


def sweep_orphans(
    sessions: sessionmaker[Session], store: ImageStore, *, grace_s: float
) -> SweepReport:
    """Remove files older than ``grace_s`` seconds whose content hash has no row."""
    cutoff = time.time() - grace_s
    report = SweepReport()
    by_hash: dict[str, list[Path]] = {}
    for path, digest in _stored_files(store.root):
        try:
            if path.stat().st_mtime > cutoff:
                report.spared += 1
                continue
        except FileNotFoundError:
            continue
        if digest is None:
            _remove(path, cutoff, report)
        else:
            by_hash.setdefault(digest, []).append(path)
    candidates = sorted(set(by_hash) - _known(sessions, sorted(by_hash)))
    for digest in candidates:
        # An upload of these bytes holds the lock from writing to committing.
        with store.lock([digest]):
            if _known(sessions, [digest]):
                continue
            for path in by_hash[digest]:
                _remove(path, cutoff, report)
    if report.files or report.spared:
        logger.info(
            "orphan sweep removed %d files (%d bytes), spared %d young or rewritten ones",
            report.files,
            report.bytes,
            report.spared,
        )
    return report
