"""``convirt evaluate --protocol zero-shot|linear-probe``: the classification protocols.

The options are registered by :mod:`app.commands.evaluate`; this module turns them into a
:class:`model.evaluation.classification.ClassificationRequest`, the same request
``POST /evaluations`` builds, runs it and writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.evaluation.classification import ClassificationRequest
    from model.evaluation.runner import ProgressCallback

logger = logging.getLogger(__name__)


def add_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the two classification protocols (``--manifest``/``--root`` are shared)."""
    classify = parser.add_argument_group("zero-shot and linear-probe (also --manifest, --root)")
    classify.add_argument(
        "--prompt-set", metavar="ID", help="zero-shot: a shipped prompt set (chexpert-14)"
    )
    classify.add_argument("--knn-k", type=int, default=10, metavar="K", help="k-NN voters (10)")
    classify.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="AUROC resamples (1000)"
    )
    classify.add_argument(
        "--fractions",
        default="1,10,100",
        metavar="P,P,...",
        help="linear probe: percentages of the training split's labels (1,10,100)",
    )
    classify.add_argument("--draws", type=int, default=3, help="draws per fraction under 100%%")
    classify.add_argument("--task", choices=("auto", "multi-label", "multi-class"), default="auto")


def _fractions(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) / 100.0 for part in raw.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions must be percentages, got {raw!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--fractions must lie in (0, 100], got {raw!r}")
    return tuple(sorted(set(values)))


def request_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> ClassificationRequest:
    """The request the arguments describe; ``parser.error`` (exit 2) on unusable ones."""
    from model.evaluation.classification import ClassificationRequest

    if args.manifest is None:
        parser.error(f"--protocol {args.protocol} needs --manifest FILE")
    for name in ("knn_k", "bootstrap", "draws", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        fractions = _fractions(args.fractions)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    findings = [name.strip() for item in args.categories or () for name in item.split(",")]
    return ClassificationRequest(
        protocol=args.protocol,
        manifest=str(Path(args.manifest).resolve()),
        root=str(Path(args.root).resolve()) if args.root is not None else None,
        findings=tuple(name for name in findings if name) or None,
        prompt_set=args.prompt_set,
        knn_k=args.knn_k,
        bootstrap=args.bootstrap,
        fractions=fractions,
        draws=args.draws,
        task=args.task,
        baselines=not args.no_backbone,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def run_classification_command(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    bundle_dir: Callable[[argparse.Namespace], Path],
    progress: ProgressCallback,
) -> int:
    """Exit status 0 on success, 1 when the evaluation fails, 2 for unusable arguments."""
    from pydantic import ValidationError

    from model.bundle import EncoderBundle
    from model.errors import ModelError
    from model.evaluation.cache import CACHE_FILE, SqliteEmbeddingCache
    from model.evaluation.classification import prepare_classification, run_classification

    request = request_from_args(args, parser)
    started = time.perf_counter()
    out = Path(args.out)
    try:
        directory = bundle_dir(args)
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        return 2
    try:
        # Before the bundle loads (seconds): a missing image or an unknown set fails at once.
        prepared = prepare_classification(request)
        bundle = EncoderBundle.load(directory, device=args.device)
        cache = None if args.no_cache else SqliteEmbeddingCache(args.cache or out / CACHE_FILE)
        outcome = run_classification(prepared, bundle, cache=cache, progress=progress)
        extra = {
            "command": {
                "argv": sys.argv[1:],
                "bundle": str(directory),
                "wall_seconds": round(time.perf_counter() - started, 3),
            }
        }
        report = outcome.write(out, extra)
    except ModelError as exc:
        logger.error("evaluation failed (%s): %s", exc.code, exc)
        return 1
    summary: dict[str, Any] = {
        "report": str(report),
        "model_id": bundle.model_id,
        "protocol": request.protocol,
        "seconds": round(time.perf_counter() - started, 1),
        "results": {
            row: {k: None if math.isnan(v) else round(v, 4) for k, v in scores.items()}
            for row, scores in outcome.headline.items()
        },
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
