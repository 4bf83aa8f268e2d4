"""``convirt demo-data``: write a synthetic paired corpus (and optionally a CheXpert tree).

The corpus (``DIR/images/*.png`` and ``DIR/manifest.csv``) is what the demo and the
trainer's smoke runs read. With ``--chexpert-root`` the command also renders one image per
row of the given CheXpert-format CSVs (e.g. the 8x200 protocol's ``candidate.csv`` and
``query.csv``) at the path the row names, so that the retrieval evaluation can run end to
end without CheXpert. Re-running with the same arguments reuses what is already there.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write a synthetic chest X-ray corpus with reports and labels",
        description=(
            "Render synthetic chest radiographs with matching reports into DIR/images and"
            " DIR/manifest.csv; optionally lay images out as a CheXpert-style tree for the"
            " rows of CheXpert-format CSVs."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--n", type=int, required=True, metavar="N", help="number of studies (0 for none)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="corpus seed (0)")
    parser.add_argument(
        "--size", type=int, default=256, metavar="PX", help="image side in pixels (256)"
    )
    parser.add_argument(
        "--chexpert-root",
        type=Path,
        metavar="ROOT",
        help="also render an image at ROOT/<Path> for every row of the --chexpert-csv files",
    )
    parser.add_argument(
        "--chexpert-csv",
        type=Path,
        action="append",
        default=[],
        metavar="CSV",
        help="a CheXpert-format CSV (label columns, or Variable,Path); repeatable",
    )
    parser.add_argument(
        "--chexpert-size",
        type=int,
        default=320,
        metavar="PX",
        help="image side of the CheXpert tree's images (320, as CheXpert-v1.0-small)",
    )
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Write the corpus and, when asked, the CheXpert tree; 0 on success, 2 on bad input."""
    # Imported here: the CLI must start fast and ``import app.cli`` must do no work.
    from model.data.synthetic import SyntheticDataError, generate_corpus, write_chexpert_tree

    if args.chexpert_root is None and args.chexpert_csv:
        args.parser.error("--chexpert-csv needs --chexpert-root")
    if args.chexpert_root is not None and not args.chexpert_csv:
        args.parser.error("--chexpert-root needs at least one --chexpert-csv")
    try:
        manifest = generate_corpus(args.out, args.n, seed=args.seed, size=args.size)
        logger.info("manifest: %s", manifest)
        if args.chexpert_root is not None:
            written = write_chexpert_tree(
                args.chexpert_root,
                args.chexpert_csv,
                seed=args.seed,
                size=args.chexpert_size,
                progress=True,
            )
            logger.info("CheXpert tree under %s: %d new images", args.chexpert_root, written)
    except SyntheticDataError as exc:
        logger.error("demo-data failed (%s): %s", exc.code, exc.message)
        return 2
    return 0
