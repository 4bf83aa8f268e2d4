"""A run's metrics file (``metrics.jsonl``, one JSON record per line) and its loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Training and validation loss against the optimizer step, as a PNG (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not metrics_path.is_file():
        return None
    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("event") == "step"]
    epochs = [r for r in records if r.get("event") == "epoch" and r.get("val_loss") is not None]
    if not steps:
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    if epochs:
        axes.plot(
            [r["step"] for r in epochs],
            [r["val_loss"] for r in epochs],
            marker="o",
            label="validation",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("ConVIRT loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path)
    return out_path
