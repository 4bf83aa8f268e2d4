"""``convirt export CHECKPOINT --out DIR``: write the encoder bundle the service loads.

The bundle holds the weights (safetensors), the model and preprocessing config (JSON),
the tokenizer files and a manifest with the model id (``sha256:…`` over weights and config),
the sha256 of every file and the model's provenance (trained here, on ``--training-data``:
by default a description of the run's data source). CHECKPOINT is a checkpoint file
(``best.pt``, ``last.pt``) or a run directory, whose ``best.pt`` is used when present,
else ``last.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``export`` to the ``convirt`` subparsers."""
    parser = subparsers.add_parser(
        "export", help="write an encoder bundle from a training checkpoint", description=__doc__
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    parser.add_argument("--out", metavar="DIR", required=True, help="bundle directory to write")
    parser.add_argument("--name", help="model name stored in the bundle (default: the run's)")
    parser.add_argument(
        "--training-data",
        metavar="TEXT",
        help="what the model was trained on, shown with its results (default: the run's data)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="the training images were generated: the page warns that real results mean nothing",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it already holds files"
    )
    parser.set_defaults(func=run)


def _checkpoint_file(path: str) -> Path:
    from model.training.trainer import BEST_CHECKPOINT, LAST_CHECKPOINT

    candidate = Path(path)
    if not candidate.is_dir():
        return candidate
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        if (candidate / "checkpoints" / name).is_file():
            return candidate / "checkpoints" / name
    return candidate / "checkpoints" / LAST_CHECKPOINT


def run(args: argparse.Namespace) -> int:
    from model.bundle import export_bundle, read_bundle_manifest
    from model.errors import ModelError

    try:
        out = export_bundle(
            _checkpoint_file(args.checkpoint),
            args.out,
            name=args.name,
            overwrite=args.overwrite,
            training_data=args.training_data,
            synthetic=args.synthetic,
        )
        manifest = read_bundle_manifest(out)
    except ModelError as exc:
        logger.error("export failed (%s): %s", exc.code, exc)
        return 1
    summary = {"bundle": str(out), "model_id": manifest["model_id"], "dim": manifest["dim"]}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
