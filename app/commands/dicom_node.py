"""``convirt dicom-node``: receive chest radiographs from modalities and PACS over DICOM.

A C-STORE SCP (with C-ECHO): CR and DX instances are decoded, de-identified, stored,
embedded and indexed like an upload; anything else is answered with a failure status
(0xA900: not stored here; 0xC000: cannot understand; 0xA700: out of resources) and
counted (logged at the stop; Prometheus metrics with ``--metrics-port``). Associations
from calling AE titles not listed are rejected unless ``--accept-any-caller`` is given.

Received instances are staged (fsynced) under DATA_DIR/dicom-staging before the success
status and removed once committed; a start ingests what an earlier run left there.
Run it beside ``convirt serve`` on the same database only once the service follows other
writers; otherwise restart the service to see the new images (as after ``convirt ingest``).

Stops on SIGINT/SIGTERM after ingesting everything acknowledged. Exit status: 0 after a
clean stop, 1 when it cannot start, 2 for unusable arguments or settings.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from app.commands.serve import (
    add_settings_arguments,
    command_settings,
    start_runtime,
    stop_on_signals,
)

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dicom-node",
        help="receive radiographs over DICOM (C-STORE SCP) and ingest them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ae-title", help="this node's AE title (CONVIRT_DICOM_AE_TITLE)")
    parser.add_argument("--host", help="address to listen on (CONVIRT_DICOM_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (CONVIRT_DICOM_PORT, 11112)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (CONVIRT_DICOM_METRICS_PORT; default: none)",
    )
    callers = parser.add_mutually_exclusive_group()
    callers.add_argument(
        "--calling-ae",
        action="append",
        metavar="AE",
        help="a calling AE title to accept; repeat for more (CONVIRT_DICOM_CALLING_AES)",
    )
    callers.add_argument(
        "--accept-any-caller",
        action="store_true",
        default=None,
        help="accept any calling AE title (CONVIRT_DICOM_ACCEPT_ANY_CALLER)",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    extra = {
        "dicom_ae_title": args.ae_title,
        "dicom_host": args.host,
        "dicom_port": args.port,
        "dicom_metrics_port": args.metrics_port,
        "dicom_calling_aes": args.calling_ae,
        "dicom_accept_any_caller": args.accept_any_caller,
    }
    settings = command_settings(args, **extra)
    if settings is None:
        return 2
    if not settings.dicom_calling_aes and not settings.dicom_accept_any_caller:
        logger.error(
            "no calling AE title accepted: give --calling-ae AE (repeatable) or "
            "--accept-any-caller (CONVIRT_DICOM_CALLING_AES / CONVIRT_DICOM_ACCEPT_ANY_CALLER)"
        )
        return 2
    from app.services.dicom_node import DicomNode

    runtime = start_runtime(settings)
    if runtime is None:
        return 1
    stop = stop_on_signals()
    node = DicomNode(runtime)
    try:
        try:
            node.start()
        except OSError as exc:
            logger.error(
                "cannot listen on %s:%d: %s", settings.dicom_host, settings.dicom_port, exc
            )
            return 1
        stop.wait()
    finally:
        node.stop()
        runtime.close()
    return 0
