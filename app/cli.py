"""The ``convirt`` command line.

Each subcommand lives in its own module under :mod:`app.commands` and exposes
``register(subparsers)``; the module is imported only when the parser is built, so
``import app.cli`` does no work and a broken command cannot take the others down at import.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Order is the order shown in ``convirt --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "demo_data",
    "train",
    "export",
    "import_model",
    "db",
    "serve",
    "ingest",
    "dicom_node",
    "follow_dicomweb",
    "reindex",
    "worker",
    "evaluate",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt",
        description="ConVIRT chest X-ray retrieval: train, export, index, serve and evaluate.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"app.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    # Control characters in logged user text are escaped: one record, one line.
    from app.logsafe import configure_logging

    configure_logging(level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
