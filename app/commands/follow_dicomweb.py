"""``convirt follow-dicomweb URL``: follow a PACS over DICOMweb and ingest its radiographs.

URL is the server's DICOMweb root (Orthanc: ``http://HOST:8042/dicom-web``). New CR and DX
instances are found through Orthanc's ``/changes`` feed when the server is an Orthanc, by
QIDO-RS series searches otherwise (``--mode`` forces one), fetched over WADO-RS and
ingested like uploads. The position reached is kept in the database, so a restart resumes
where the last committed batch stopped; nothing is stored twice.

Credentials come from CONVIRT_DICOMWEB_USERNAME and CONVIRT_DICOMWEB_PASSWORD (basic) or
CONVIRT_DICOMWEB_TOKEN (bearer), never from the URL. Polls every
CONVIRT_DICOMWEB_POLL_SECONDS (10) until SIGINT/SIGTERM; ``--once`` stops when caught up.

Exit status: 0 after a clean stop (or a complete ``--once`` pass), 1 when it cannot start
or the server fails a ``--once`` pass, 2 for unusable arguments or settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from app.commands.serve import (
    add_settings_arguments,
    command_settings,
    start_runtime,
    stop_on_signals,
)
from app.errors import AppError

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "follow-dicomweb",
        help="follow a PACS over DICOMweb (QIDO-RS, WADO-RS) and ingest its radiographs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", help="DICOMweb root, e.g. http://orthanc:8042/dicom-web")
    parser.add_argument(
        "--mode",
        choices=("auto", "orthanc", "qido"),
        default="auto",
        help="how to find new instances (default: Orthanc's change feed when available)",
    )
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="instances per commit (default: 8)"
    )
    parser.add_argument(
        "--poll-seconds", type=float, help="pause between polls (CONVIRT_DICOMWEB_POLL_SECONDS)"
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        logger.error("--batch-size must be at least 1")
        return 2
    extra = {} if args.poll_seconds is None else {"dicomweb_poll_seconds": args.poll_seconds}
    settings = command_settings(args, **extra)
    if settings is None:
        return 2
    from app.services.dicomweb_follower import DicomwebFollower, source_key

    try:
        source_key(args.url)
    except AppError as exc:
        logger.error("%s", exc)
        return 2
    runtime = start_runtime(settings)
    if runtime is None:
        return 1
    import requests

    stop = stop_on_signals()
    try:
        follower = DicomwebFollower(runtime, args.url, mode=args.mode, batch_size=args.batch_size)
        if not args.once:
            follower.run(stop)
            return 0
        try:
            follower.poll_once(stop)
        except requests.RequestException as exc:
            logger.error("the DICOMweb server failed: %s", type(exc).__name__)
            return 1
        sys.stdout.write(json.dumps(dict(follower.counts)) + "\n")
        return 0
    except AppError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        runtime.close()
