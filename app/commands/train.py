"""``convirt train``: train ConVIRT encoders on paired radiographs and reports.

    convirt train --config cpu-small --data pairs.csv [key.path=value ...]
    convirt train --config paper --data mimic-cxr:/data/mimic-cxr-jpg optim.lr=3e-4
    convirt train --resume runs/cpu-small            # continue exactly where it stopped
    convirt train --init-from bundles/clip --data pairs.csv optim.lr=1e-5   # fine-tune

``--config`` is a YAML file or a shipped config name (``cpu-small``, ``paper``); overrides
are ``key.path=value`` with YAML values. ``--data`` accepts a manifest (CSV/JSONL) or
``mimic-cxr:ROOT`` / ``iu-xray:ROOT``. SIGINT or SIGTERM saves a checkpoint and exits
with status 130 or 143; ``--resume`` (a checkpoint or the run directory) continues it.
``--init-from BUNDLE`` starts from an exported or imported (``convirt import``) bundle:
its model and weights replace the config's ``model`` section and pretrained towers, and
training continues with the ConVIRT loss; keep the bundle until the run is exported.
Several GPUs: ``torchrun --nproc_per_node=N -m app.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model.training.config import TrainConfig

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``train`` to the ``convirt`` subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train the image and text encoders (writes checkpoints)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML config file or shipped name: cpu-small (default), paper",
    )
    parser.add_argument(
        "--data", metavar="SOURCE", help="manifest path, mimic-cxr:ROOT or iu-xray:ROOT"
    )
    parser.add_argument("--out", metavar="DIR", help="run directory (train.out_dir)")
    parser.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint (last.pt) or a run directory; its config is reused",
    )
    parser.add_argument(
        "--init-from",
        metavar="BUNDLE",
        help="start from an encoder bundle's model and weights (fine-tune an imported model)",
    )
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    parser.add_argument(
        "--time-budget", type=float, metavar="SECONDS", help="stop after this much wall time"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs and metrics only)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4"
    )
    parser.set_defaults(func=run)


def _resume_checkpoint(path: str) -> Path:
    from model.training.trainer import LAST_CHECKPOINT

    candidate = Path(path)
    if candidate.is_dir():
        return candidate / "checkpoints" / LAST_CHECKPOINT
    return candidate


def _init_config(
    config_name: str, bundle: str, overrides: list[str]
) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The run's config with the bundle's model section (overrides on top), and its weights."""
    from model.bundle import bundle_init
    from model.config import config_to_dict
    from model.training.config import (
        apply_overrides,
        load_train_config,
        train_config_from_dict,
        train_config_to_dict,
    )

    model_config, weights = bundle_init(bundle)
    data = train_config_to_dict(load_train_config(config_name))
    data["model"] = config_to_dict(model_config)
    return train_config_from_dict(apply_overrides(data, overrides)), weights


def run(args: argparse.Namespace) -> int:
    from model.errors import ModelError
    from model.training.config import load_train_config, resume_config
    from model.training.trainer import train

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.time_budget is not None:
        overrides.append(f"train.time_budget_s={args.time_budget}")
    if args.no_progress:
        overrides.append("train.progress=false")
    for text in overrides:
        if "=" not in text:
            logger.error("override %r is not of the form key.path=value", text)
            return 2
    if args.resume and args.init_from:
        logger.error("--resume and --init-from exclude each other")
        return 2
    try:
        if args.init_from:
            config, weights = _init_config(args.config or "cpu-small", args.init_from, overrides)
            result = train(config, init_weights=weights)
        elif args.resume:
            checkpoint = _resume_checkpoint(args.resume)
            if args.config:
                logger.warning("--config ignored: a resumed run keeps its checkpoint's config")
            config = resume_config(checkpoint, overrides)
            result = train(config, resume_from=checkpoint)
        else:
            config = load_train_config(args.config or "cpu-small", overrides)
            result = train(config)
    except ModelError as exc:
        logger.error("training failed (%s): %s", exc.code, exc)
        return 1
    summary = {
        "stop_reason": result.stop_reason,
        "step": result.step,
        "epoch": result.epoch,
        "best_val_loss": result.best_val_loss,
        "last_checkpoint": str(result.last_checkpoint),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    if result.signal is not None:
        # The shell convention for "ended by signal N", though the state was saved.
        return 128 + int(signal.Signals(result.signal))
    return 0
