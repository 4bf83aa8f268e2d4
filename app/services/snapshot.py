"""The feed position a saved index holds: ``feed.json`` beside the index's manifest.

A saved index (``manifest.json`` and its data files, written atomically by
:meth:`index.VectorIndex.save`) is a snapshot of the database; ``feed.json`` says up to
which change feed ``seq`` it is complete: every change with a lower or equal ``seq`` is
in it (changes after it may be in it too, since replaying a change is harmless). A
starting process loads the snapshot and replays only the feed past that position.

The position names the index save it belongs to by the save's checksum. A save that
died between the index and this file leaves the old position beside a new index: the
checksums differ, the position is not trusted, and the index is checked against the
database instead. The file lives in the application, not in :mod:`index`, because the
feed is the database's and the index package knows nothing of databases.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from index import IndexManifest, VectorIndex

logger = logging.getLogger(__name__)

FEED_POSITION_NAME: Final = "feed.json"
SAVE_LOCK_NAME: Final = ".save.lock"


@dataclass(frozen=True)
class FeedPosition:
    """The last feed ``seq`` contained in the index save whose checksum is ``checksum``."""

    sequence: int
    model_id: str
    checksum: str


def write_position(directory: Path, manifest: IndexManifest, sequence: int) -> None:
    """Record that the save described by ``manifest`` holds the feed up to ``sequence``."""
    position = FeedPosition(sequence, manifest.model_id, manifest.checksum)
    target = directory / FEED_POSITION_NAME
    temporary = directory / f".{FEED_POSITION_NAME}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(position), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def read_position(directory: Path, index: VectorIndex) -> int | None:
    """The feed position of the loaded ``index``, or None when it is unknown.

    Unknown: no file, an unreadable one, or one written for another save or model.
    """
    manifest = index.manifest
    if manifest is None:
        return None
    try:
        raw = json.loads((directory / FEED_POSITION_NAME).read_text(encoding="utf-8"))
        position = FeedPosition(
            sequence=int(raw["sequence"]),
            model_id=str(raw["model_id"]),
            checksum=str(raw["checksum"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("feed position in %s is unreadable: %s", directory, exc)
        return None
    if position.checksum != manifest.checksum or position.model_id != manifest.model_id:
        logger.info("feed position in %s belongs to another index save", directory)
        return None
    if position.sequence < 0:
        return None
    return position.sequence


def save_snapshot(index: VectorIndex, directory: Path, sequence: int) -> None:
    """Save ``index`` atomically, then the feed position it holds.

    Several processes may save into one directory (workers of one service, a command
    beside it): an exclusive ``flock`` on ``.save.lock`` makes them take turns, so that
    no save removes another's half-written files and the position always follows its
    own index.
    """
    import fcntl  # POSIX only, like the deployments this serves

    directory.mkdir(parents=True, exist_ok=True)
    with (directory / SAVE_LOCK_NAME).open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            manifest = index.save(directory)
            write_position(directory, manifest, sequence)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
