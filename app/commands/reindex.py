"""``convirt reindex``: re-embed every stored image with the current bundle, rebuild the index.

Use it after replacing the encoder bundle (``CONVIRT_BUNDLE_DIR``). Each image is read
back from its stored de-identified PNG (the uploads themselves are not kept), embedded,
and its vector for the bundle's model stored (replacing an older one of the same model);
vectors of other models stay in the database. Then the bundle's model becomes the active
one and the index is rebuilt from the stored vectors and saved atomically.

It runs while the service serves. The switch to a new model is explicit and happens only
once every image has its new vector: it is written to the change feed, and every serving
process then answers ``/ready`` with 503 ``model_switched`` until it finds the new bundle
in its own bundle directory, which it loads and serves (it keeps answering searches with
the old model meanwhile). Install the new bundle where the servers look for it
(``CONVIRT_BUNDLE_DIR``) before or after the reindex. A server started with a bundle whose
model is not the active one refuses to start (``model_not_active``) rather than switch
every other process back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from app.commands.serve import add_settings_arguments, settings_from_args
from app.db import create_engine_for, session_factory
from app.errors import AppError
from app.models import Image
from app.settings import Settings
from model.errors import ModelError

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reindex",
        help="re-embed every stored image with the current bundle and rebuild the index",
        description=__doc__,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def _count_images(settings: Settings) -> int | None:
    """How many images are stored (for the progress bar), or None before any migration."""
    engine = create_engine_for(settings)
    try:
        with session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Image)) or 0)
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    start = time.perf_counter()
    with tqdm(
        total=_count_images(settings), unit="img", disable=args.no_progress, file=sys.stderr
    ) as bar:
        try:
            from app.services.runtime import Runtime

            runtime = Runtime.start(
                settings, reembed_all=True, switch_model=True, progress=bar.update
            )
        except (AppError, ModelError) as exc:
            logger.error("reindex failed: %s", exc)
            return 1
    runtime.close()
    report = runtime.report
    summary = {
        "model_id": report.model_id,
        "embedded": report.embedded,
        "unembeddable": len(report.unembeddable),
        "vectors": report.vectors,
        "seconds": round(time.perf_counter() - start, 3),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 1 if report.unembeddable else 0
