"""``convirt import SOURCE --out BUNDLE``: a published image–text model as an encoder bundle.

    convirt import openai/clip-vit-base-patch32 --out bundles/clip      # hub id (network)
    convirt import ./pubmedclip --out bundles/pubmedclip --training-data "ROCO figures"

SOURCE is a transformers model with ``get_image_features``/``get_text_features``
(``CLIPModel``, ``SiglipModel``, …) given by a local directory or a hub id; a hub id needs
the network once (or the local hub cache; ``HF_HUB_OFFLINE=1`` forbids the network). The
bundle keeps the model's own embedding size and its image processor's preprocessing, and
serves, evaluates and fine-tunes (``convirt train --init-from BUNDLE``) like a trained one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``import`` to the ``convirt`` subparsers."""
    parser = subparsers.add_parser(
        "import",
        help="write an encoder bundle from a published image-text model (CLIP, SigLIP, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="model directory or hub id")
    parser.add_argument("--out", metavar="DIR", required=True, help="bundle directory to write")
    parser.add_argument("--name", help="model name stored in the bundle (default: from SOURCE)")
    parser.add_argument(
        "--training-data",
        metavar="TEXT",
        help="what the model was trained on, shown with its results (default: as published)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it already holds files"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.bundle import read_bundle_manifest
    from model.errors import ModelError
    from model.importing import import_model

    try:
        out = import_model(
            args.source,
            args.out,
            name=args.name,
            training_data=args.training_data,
            overwrite=args.overwrite,
        )
        manifest = read_bundle_manifest(out)
    except ModelError as exc:
        logger.error("import failed (%s): %s", exc.code, exc)
        return 1
    summary = {"bundle": str(out), "model_id": manifest["model_id"], "dim": manifest["dim"]}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
