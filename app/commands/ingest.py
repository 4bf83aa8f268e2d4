"""``convirt ingest PATH``: bulk-load images into the service's database and index.

PATH is a paired manifest (``.csv``/``.jsonl``, see :mod:`model.data.manifest`: reports,
labels, views and study ids come with the images; patient ids are *not* stored), a
directory (every ``.dcm``/``.dicom``/``.png``/``.jpg``/``.jpeg`` file below it, and
files without a suffix, which DICOM exports often are) or a single image file.

Safe to re-run after an interruption: images are deduplicated by content hash, each batch
commits its rows with their embeddings in one transaction, and the start-up reconcile
rebuilds the index from the database if the last run died between a commit and an index
save. Run it while the service serves: each batch's commit writes change feed records that
every serving process follows, so the images become searchable there within a second or
two, and ``/ready`` stays 200.

Several processes can ingest one archive together into a shared (PostgreSQL) database:
``--shard I/N`` takes every N-th file of the input from the I-th on (0-based), and under
``torchrun`` the shard is ``RANK``/``WORLD_SIZE`` (each rank on the GPU ``LOCAL_RANK``)::

    torchrun --nnodes 4 --nproc_per_node 8 ... -m app.cli ingest /archive/manifest.csv

Every shard writes idempotently, by content hash: a rank that died is simply run again
and fills its gap, and the same image in two shards is stored once.

Exit status: 0 when every file was stored (or already was), 1 when some failed (listed in
the log), 2 for unusable arguments or settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from tqdm import tqdm

from app.commands.serve import add_settings_arguments, settings_from_args, start_runtime
from model.data.manifest import read_manifest
from model.errors import ModelError

if TYPE_CHECKING:
    # Importing these loads torch; the command line imports its modules only to build --help.
    from app.services.runtime import Runtime

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg"})
#: Seconds between index saves during a run (always saved at the end).
SAVE_INTERVAL_S: Final = 10.0


@dataclass(frozen=True)
class Source:
    """One file to ingest and what is known about it besides its bytes."""

    path: Path
    report_text: str | None = None
    labels: dict[str, float | None] | None = None
    study_ref: str | None = None
    view_position: str | None = None


def discover(path: Path) -> list[Source]:
    """The files to ingest from a manifest, a directory or a single file, in a stable order."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == "")
        )
        return [Source(p) for p in files]
    if path.suffix.lower() in (".csv", ".jsonl"):
        return [
            Source(
                path=record.image_path,
                report_text=record.report or None,
                labels=dict(record.labels) or None,
                study_ref=record.study_id or None,
                view_position=record.view_position,
            )
            for record in read_manifest(path)
        ]
    if path.is_file():
        return [Source(path)]
    raise FileNotFoundError(f"{path}: no such file or directory")


@dataclass(frozen=True)
class Shard:
    """This process's part of the input: files ``index``, ``index + count``, …"""

    index: int
    count: int

    def take(self, sources: Sequence[Source]) -> list[Source]:
        return list(sources[self.index :: self.count])


def parse_shard(text: str) -> Shard:
    """``I/N`` with 0 <= I < N; raises ValueError otherwise."""
    index_text, slash, count_text = text.partition("/")
    if not slash:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    index, count = int(index_text), int(count_text)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: needs 0 <= I < N")
    return Shard(index, count)


def shard_from_environment(environ: Mapping[str, str]) -> Shard | None:
    """The shard of a ``torchrun`` rank (``RANK``/``WORLD_SIZE``), or None outside one."""
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    shard = parse_shard(f"{environ['RANK']}/{environ['WORLD_SIZE']}")
    return shard if shard.count > 1 else None


def _use_local_gpu(environ: Mapping[str, str]) -> None:
    """Under torchrun, encode on this rank's GPU (the bundle loads on the current device)."""
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is None:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))


def _batches(sources: Sequence[Source], size: int) -> Iterator[Sequence[Source]]:
    for start in range(0, len(sources), size):
        yield sources[start : start + size]


def describe_source(position: int, path: Path, *, log_paths: bool) -> str:
    """How a log line names an input file: its position (1-based) and a short path hash.

    Archive file names often carry patient names or record numbers, so the path itself is
    logged only when ``CONVIRT_LOG_PATHS`` asks for it; the hash (sha256 of the path, 12
    hex digits) still lets an operator who has the list find the file.
    """
    if log_paths:
        return f"file {position} ({path})"
    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"file {position} (path sha256 {digest})"


def ingest_sources(
    runtime: Runtime, sources: Sequence[Source], *, batch_size: int, progress: bool
) -> dict[str, int]:
    """Ingest ``sources`` in batches; returns the counts per outcome.

    A failing file is logged by :func:`describe_source` (its position in ``sources``).
    """
    log_paths = runtime.settings.log_paths
    positions = {id(source): n for n, source in enumerate(sources, 1)}
    from app.services.ingest import IngestItem

    counts = {"created": 0, "existing": 0, "failed": 0}
    last_save = time.monotonic()
    with tqdm(total=len(sources), unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in _batches(sources, batch_size):
            items: list[IngestItem] = []
            readable: list[Source] = []
            for source in batch:
                try:
                    data = source.path.read_bytes()
                except OSError as exc:
                    where = describe_source(positions[id(source)], source.path, log_paths=log_paths)
                    logger.warning("%s: cannot be read: %s", where, exc.strerror)
                    counts["failed"] += 1
                    continue
                readable.append(source)
                items.append(
                    IngestItem(
                        data=data,
                        report_text=source.report_text,
                        labels=source.labels,
                        study_ref=source.study_ref,
                        view_position=source.view_position,
                    )
                )
            for source, result in zip(readable, runtime.ingest.ingest(items), strict=True):
                counts[result.status] += 1
                if result.error is not None:
                    where = describe_source(positions[id(source)], source.path, log_paths=log_paths)
                    logger.warning("%s: %s (%s)", where, result.error.code, result.error)
            if time.monotonic() - last_save >= SAVE_INTERVAL_S:
                runtime.index.save_if_dirty()
                last_save = time.monotonic()
            bar.update(len(batch))
            bar.set_postfix(counts, refresh=False)
    return counts


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="bulk-load images from a manifest, a directory or a file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="manifest (.csv/.jsonl), directory or image")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per commit and forward pass"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="ingest only every N-th file from the I-th (default: RANK/WORLD_SIZE under torchrun)",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        logger.error("--batch-size must be at least 1")
        return 2
    try:
        settings = settings_from_args(args)
        shard = parse_shard(args.shard) if args.shard else shard_from_environment(os.environ)
        sources = discover(args.path)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    except (ModelError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if shard is not None:
        total = len(sources)
        sources = shard.take(sources)
        logger.info("shard %d/%d: %d of %d files", shard.index, shard.count, len(sources), total)
        _use_local_gpu(os.environ)
    logger.info("%d files to ingest from %s", len(sources), args.path)
    runtime = start_runtime(settings)
    if runtime is None:
        return 1
    start = time.perf_counter()
    try:
        counts = ingest_sources(
            runtime, sources, batch_size=args.batch_size, progress=not args.no_progress
        )
    finally:
        runtime.close()
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        **counts,
        "seconds": round(elapsed, 3),
        "vectors": runtime.index.ntotal,
    }
    if shard is not None:
        summary["shard"] = f"{shard.index}/{shard.count}"
    sys.stdout.write(json.dumps(summary) + "\n")
    return 1 if counts["failed"] else 0
