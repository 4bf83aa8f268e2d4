"""``convirt evaluate``: score an encoder bundle by retrieval precision@k.

Two protocols:

- ``--protocol chexpert-8x200 --root DIR``: the ConVIRT authors' CheXpert 8x200 files
  (``image-retrieval/`` and ``text-retrieval/`` CSVs, read from ``--protocol-dir`` or
  found under DIR) over the CheXpert images under DIR. Image → image with 80 query images
  and text → image with 40 expert queries, among 1,600 candidates.
- ``--protocol manifest --manifest FILE``: the same scoring on any labelled corpus. Per
  category, images with exactly one positive label among ``--categories`` are shuffled
  with ``--seed``; ``--queries-per-category`` become query images and the next
  ``--candidates-per-category`` candidates. Text queries come from ``--text-queries``
  (CSV: ``Variable,Text`` or ``category,text``) or, by default, from the project's own
  queries for the eight CheXpert 8x200 categories.

Two classification protocols over a labelled ``--manifest FILE`` (a paired manifest, or
CheXpert's own ``valid.csv``/``test.csv``/``train.csv`` as downloaded, images under
``--root`` or next to the CSV):

- ``--protocol zero-shot``: each finding of ``--prompt-set`` (default ``chexpert-14``)
  scored on the test split (or every image) by AUROC with a 95 % bootstrap interval
  (``--bootstrap`` resamples), F1 and MCC at Youden's threshold, against the k-NN vote of
  the ``--knn-k`` nearest labelled images and chance; writes ``roc.png``.
- ``--protocol linear-probe``: logistic regression on the frozen pooled backbone features
  of the bundle, its ImageNet start and a random start (``--no-backbone`` keeps only the
  bundle), at ``--fractions`` of the training split's patients (``--draws`` draws each
  under 100 %); writes ``linear_probe.png``.

Writes into ``--out``: ``report.json`` (every score), ``report.md`` (summary),
``precision_at_k.png`` and ``embedding_map.png``. Image embeddings are cached by (model
id, sha256 of the file) in ``--cache`` (default ``OUT/embedding-cache.sqlite``), so a
second run decodes and encodes nothing. Prints a one-line JSON summary.

Exit status: 0 on success, 1 when the evaluation fails (missing image, invalid protocol,
unreadable bundle: the message names the file and row), 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.evaluation.protocol import RetrievalProtocol
    from model.evaluation.runner import EvaluationResult, ProgressCallback

logger = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("chexpert-8x200", "manifest", "zero-shot", "linear-probe")


def register(subparsers: Any) -> None:
    """Add ``evaluate`` to the ``convirt`` subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="retrieval precision@k of a bundle (CheXpert 8x200 or a labelled manifest)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="chexpert-8x200")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder")
    parser.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help="encoder bundle (default: the service's, CONVIRT_BUNDLE_DIR or data/bundle)",
    )
    official = parser.add_argument_group("chexpert-8x200")
    official.add_argument(
        "--root", type=Path, metavar="DIR", help="CheXpert root the protocol's paths start at"
    )
    official.add_argument(
        "--protocol-dir",
        type=Path,
        metavar="DIR",
        help="folder holding image-retrieval/ and text-retrieval/ (default: found under ROOT)",
    )
    corpus = parser.add_argument_group("manifest")
    corpus.add_argument("--manifest", type=Path, metavar="FILE", help="labelled .csv/.jsonl")
    corpus.add_argument(
        "--categories",
        nargs="+",
        metavar="NAME",
        help="categories (quote names with spaces, or separate by commas); "
        "default: the eight CheXpert 8x200 categories",
    )
    corpus.add_argument("--candidates-per-category", type=int, default=200, metavar="N")
    corpus.add_argument("--queries-per-category", type=int, default=10, metavar="Q")
    corpus.add_argument(
        "--text-queries", type=Path, metavar="FILE", help="CSV of category,text queries"
    )
    from app.commands.evaluate_classification import add_classification_arguments

    add_classification_arguments(parser)
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--seed", type=int, default=0, help="sampling and random-baseline seed (0)"
    )
    run_group.add_argument(
        "--ks", default="5,10,50", metavar="K,K,...", help="precision cut-offs (5,10,50)"
    )
    run_group.add_argument(
        "--cache",
        type=Path,
        metavar="FILE",
        help="embedding cache (default: OUT/embedding-cache.sqlite)",
    )
    run_group.add_argument("--no-cache", action="store_true", help="embed every image afresh")
    run_group.add_argument(
        "--no-backbone",
        action="store_true",
        help="skip the baseline of the image backbone before training (ImageNet weights)",
    )
    run_group.add_argument("--random-repeats", type=int, default=20, metavar="N")
    run_group.add_argument("--batch-size", type=int, default=32, metavar="N")
    run_group.add_argument(
        "--map", choices=("pca", "tsne"), default="pca", help="2-D map of the embeddings (pca)"
    )
    run_group.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    parser.set_defaults(func=run, parser=parser)


def _categories(raw: list[str] | None) -> list[str]:
    """Category names given as separate words or comma-separated (empty: the default)."""
    return [name.strip() for item in raw or () for name in item.split(",") if name.strip()]


def _ks(raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ks must be comma-separated integers, got {raw!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {raw!r}")
    return values


def _bundle_dir(args: argparse.Namespace) -> Path:
    if args.bundle is not None:
        return Path(args.bundle)
    from app.settings import Settings

    return Settings().bundle_dir


def _load_protocol(args: argparse.Namespace) -> tuple[RetrievalProtocol, Path | None]:
    """(validated protocol, image root) for the arguments."""
    from model.evaluation.assemble import OFFICIAL, assemble_protocol
    from model.evaluation.protocol import read_text_queries

    if args.protocol == OFFICIAL:
        root = Path(args.root)
        return assemble_protocol(OFFICIAL, root=root, protocol_dir=args.protocol_dir), root
    queries = read_text_queries(args.text_queries) if args.text_queries is not None else None
    protocol = assemble_protocol(
        "manifest",
        manifest=Path(args.manifest),
        categories=_categories(args.categories),
        text_queries=queries,
        candidates_per_category=args.candidates_per_category,
        queries_per_category=args.queries_per_category,
        seed=args.seed,
        params={
            "manifest": str(Path(args.manifest).resolve()),
            "text_queries": str(args.text_queries) if args.text_queries else "built-in",
        },
    )
    return protocol, None


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.protocol in ("zero-shot", "linear-probe"):
        return _run_classification(args, parser)
    if args.protocol == "chexpert-8x200" and args.root is None:
        parser.error("--protocol chexpert-8x200 needs --root (the CheXpert image root)")
    if args.protocol == "manifest" and args.manifest is None:
        parser.error("--protocol manifest needs --manifest FILE")
    try:
        ks = _ks(args.ks)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    from pydantic import ValidationError

    from model.bundle import EncoderBundle
    from model.errors import ModelError
    from model.evaluation.baseline import InitialBackbone, has_backbone_baseline
    from model.evaluation.cache import CACHE_FILE, SqliteEmbeddingCache
    from model.evaluation.report_files import write_report
    from model.evaluation.runner import EvaluationOptions, run_evaluation

    started = time.perf_counter()
    out = Path(args.out)
    try:
        bundle_dir = _bundle_dir(args)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    try:
        # Validated before the bundle loads (seconds): a missing image fails at once.
        protocol, root = _load_protocol(args)
        bundle = EncoderBundle.load(bundle_dir, device=args.device)
        cache = None if args.no_cache else SqliteEmbeddingCache(args.cache or out / CACHE_FILE)
        # An imported model is one network: there is no untrained backbone of its own.
        wanted = not args.no_backbone and has_backbone_baseline(bundle)
        backbone = InitialBackbone.from_bundle(bundle) if wanted else None
        options = EvaluationOptions(
            ks=ks,
            random_repeats=args.random_repeats,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        result = run_evaluation(
            protocol,
            bundle,
            root=root,
            backbone=backbone,
            cache=cache,
            options=options,
            model_name=bundle.name,
            progress=_progress_logger(),
        )
        wall = time.perf_counter() - started
        files = write_report(
            result,
            out,
            map_method=args.map,
            extra={
                "command": {
                    "argv": sys.argv[1:],
                    "bundle": str(bundle_dir),
                    "root": str(root) if root is not None else None,
                    "wall_seconds": round(wall, 3),
                }
            },
        )
    except ModelError as exc:
        logger.error("evaluation failed (%s): %s", exc.code, exc)
        return 1
    summary = _summary(result, files.json, time.perf_counter() - started)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _summary(result: EvaluationResult, report: Path, seconds: float) -> dict[str, Any]:
    """The one-line summary printed at the end: where the report is, the mean scores."""
    from model.evaluation.runner import IMAGE_TO_IMAGE, MODEL, TEXT_TO_IMAGE

    summary: dict[str, Any] = {
        "report": str(report),
        "model_id": result.model_id,
        "protocol": result.protocol.name,
        "seconds": round(seconds, 1),
    }
    for task in (IMAGE_TO_IMAGE, TEXT_TO_IMAGE):
        summary[task] = {k: round(v, 4) for k, v in result.scores[task][MODEL].mean.items()}
    return summary


def _run_classification(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from app.commands.evaluate_classification import run_classification_command

    return run_classification_command(args, parser, _bundle_dir, _progress_logger())


def _progress_logger() -> ProgressCallback:
    """A progress callback that logs each stage change and every tenth of the way."""
    last: dict[str, Any] = {"stage": None, "tenth": -1}

    def report(fraction: float, stage: str) -> None:
        tenth = int(fraction * 10)
        name = stage.split(" ")[0:2]
        if name != last["stage"] or tenth != last["tenth"]:
            last["stage"], last["tenth"] = name, tenth
            logger.info("%3.0f%% %s", 100 * fraction, stage)

    return report
