"""The evaluation report's files: ``report.json``, ``report.md`` and two figures.

- ``report.json``: :meth:`EvaluationResult.to_dict` (every score, per category and mean).
- ``report.md``: the headline table (mean P@k and mAP of the model against the
  baselines, per task), then per-category precision of the model.
- ``precision_at_k.png``: per task (rows) and cut-off (columns), precision per category
  of the model, the backbone and random rankings, with the expected random level dashed.
- ``embedding_map.png``: the model's candidate embeddings in 2-D (PCA or t-SNE), coloured
  by category, as in the paper's figure.

matplotlib is imported (with the file-only Agg backend) when the figures are drawn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from model.evaluation.embedding_map import embedding_map
from model.evaluation.metrics import MAP, RetrievalScores, precision_key
from model.evaluation.runner import (
    BACKBONE,
    IMAGE_TO_IMAGE,
    MODEL,
    RANDOM,
    RANDOM_EXPECTED,
    TEXT_TO_IMAGE,
    EvaluationResult,
)

logger = logging.getLogger(__name__)

REPORT_JSON: Final = "report.json"
REPORT_MD: Final = "report.md"
PRECISION_PLOT: Final = "precision_at_k.png"
MAP_PLOT: Final = "embedding_map.png"

TASK_TITLES: Final[dict[str, str]] = {
    IMAGE_TO_IMAGE: "image → image",
    TEXT_TO_IMAGE: "text → image",
}
#: Fixed colours, so a method looks the same in every panel whichever methods a task has.
METHOD_COLOURS: Final[dict[str, str]] = {
    MODEL: "tab:blue",
    BACKBONE: "tab:orange",
    RANDOM: "tab:green",
}
METHOD_TITLES: Final[dict[str, str]] = {
    MODEL: "model (ConVIRT)",
    BACKBONE: "backbone before training",
    RANDOM: "random (empirical)",
    RANDOM_EXPECTED: "random (expected)",
}


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    precision_plot: Path
    embedding_map: Path


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100.0 * value:.1f}"


def describe_provenance(provenance: Mapping[str, Any]) -> str:
    """One plain sentence: where the model comes from and what it was trained on."""
    source = provenance.get("source")
    if provenance.get("origin") == "imported":
        where = f"imported from {source}" if source else "imported"
    else:
        where = "trained here" + (f" ({source})" if source else "")
    text = f"{where}; training data: {provenance.get('training_data') or 'not recorded'}"
    if provenance.get("synthetic_data"):
        text += " (synthetic images: results on real radiographs are not meaningful)"
    return text


def markdown_summary(result: EvaluationResult, document: dict[str, Any] | None = None) -> str:
    """A short Markdown summary of ``result`` (figures in percent)."""
    doc = document if document is not None else result.to_dict()
    protocol = result.protocol
    metrics = (*(precision_key(k) for k in result.options.ks), MAP)
    headers = [f"P@{k}" for k in result.options.ks] + ["mAP"]
    counts = protocol.counts()
    lines = [
        f"# Retrieval evaluation: {protocol.name}",
        "",
        f"- model: `{result.model_id}`" + (f" ({result.model_name})" if result.model_name else ""),
        *([f"- {describe_provenance(result.provenance)}"] if result.provenance else []),
        f"- categories ({len(protocol.categories)}): {', '.join(protocol.categories)}",
        f"- image → image: {counts['image_queries']} query images over "
        f"{counts['image_candidates']} candidates; text → image: {counts['text_queries']} "
        f"text queries over {counts['text_candidates']} candidates",
        f"- a hit is a candidate whose label for the query's category is 1; ties: "
        f"{doc['metrics']['tie_rule']}",
        *(
            [
                f"- backbone baseline: {result.backbone['tower']} with "
                f"{result.backbone['weights']} weights, no contrastive training"
            ]
            if result.backbone
            else []
        ),
        f"- run time {result.seconds:.1f} s; "
        + "; ".join(
            f"{space} vectors: {s.cache_hits} cached, {s.encoded} encoded"
            for space, s in result.embedding_stats.items()
        ),
        "",
        "## Mean over categories (%)",
        "",
        "| task | method | " + " | ".join(headers) + " |",
        "|---|---|" + "---:|" * len(headers),
    ]
    for task, methods in result.scores.items():
        for method, scores in methods.items():
            cells = " | ".join(_pct(scores.mean[m]) for m in metrics)
            lines.append(
                f"| {TASK_TITLES.get(task, task)} | {METHOD_TITLES.get(method, method)} | {cells} |"
            )
    for task, methods in result.scores.items():
        model = methods[MODEL]
        lines += [
            "",
            f"## {TASK_TITLES.get(task, task)}: model per category (%)",
            "",
            "| category | queries | " + " | ".join(headers) + " |",
            "|---|---:|" + "---:|" * len(headers),
        ]
        queries = np.bincount(model.query_category, minlength=len(model.categories))
        for c, name in enumerate(model.categories):
            cells = " | ".join(_pct(model.per_category[m][c]) for m in metrics)
            lines.append(f"| {name} | {int(queries[c])} | {cells} |")
    lines += [
        "",
        f"Figures: `{PRECISION_PLOT}` (precision per category against the baselines), "
        f"`{MAP_PLOT}` (candidate embeddings in 2-D).",
        "",
    ]
    return "\n".join(lines)


def _plot_precision(result: EvaluationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result.scores)
    ks = result.options.ks
    categories = result.protocol.categories
    fig, axes = plt.subplots(
        len(tasks),
        len(ks),
        figsize=(4.2 * len(ks), 3.4 * len(tasks)),
        squeeze=False,
        sharey=True,
    )
    positions = np.arange(len(categories))
    for row, task in enumerate(tasks):
        methods = [m for m in (MODEL, BACKBONE, RANDOM) if m in result.scores[task]]
        width = 0.8 / len(methods)
        for col, k in enumerate(ks):
            ax = axes[row][col]
            key = precision_key(k)
            for i, method in enumerate(methods):
                scores: RetrievalScores = result.scores[task][method]
                ax.bar(
                    positions + (i - (len(methods) - 1) / 2) * width,
                    100.0 * np.nan_to_num(scores.per_category[key]),
                    width,
                    label=METHOD_TITLES[method],
                    color=METHOD_COLOURS[method],
                )
            expected = result.scores[task].get(RANDOM_EXPECTED)
            if expected is not None:
                ax.axhline(100.0 * expected.mean[key], color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{TASK_TITLES.get(task, task)}, P@{k}")
            ax.set_xticks(positions)
            ax.set_xticklabels(categories, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 100)
            if col == 0:
                ax.set_ylabel("precision (%)")
                ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_map(result: EvaluationResult, path: Path, method: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = embedding_map(result.candidate_embeddings, method, seed=seed)  # (N, 2)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(result.protocol.categories):
        mask = result.candidate_categories == c
        ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=cmap(c % 10), label=name)
    other = result.candidate_categories < 0
    if other.any():
        ax.scatter(coords[other, 0], coords[other, 1], s=6, color="lightgrey", label="other")
    ax.set_title(f"candidate embeddings ({method.upper()}), {result.protocol.name}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    result: EvaluationResult,
    out_dir: str | os.PathLike[str],
    *,
    map_method: str = "pca",
    extra: dict[str, Any] | None = None,
) -> ReportFiles:
    """Write the JSON, the Markdown summary and both figures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = result.to_dict()
    document["report"] = {"embedding_map": map_method}
    document.update(extra or {})
    files = ReportFiles(
        json=out / REPORT_JSON,
        markdown=out / REPORT_MD,
        precision_plot=out / PRECISION_PLOT,
        embedding_map=out / MAP_PLOT,
    )
    write_atomic(files.json, json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_atomic(files.markdown, markdown_summary(result, document))
    _plot_precision(result, files.precision_plot)
    _plot_map(result, files.embedding_map, map_method, result.options.seed)
    logger.info("report written to %s", out)
    return files
