"""Reports of the classification protocols: ``report.json``, ``report.md`` and a figure.

- zero-shot: ``roc.png``, one panel per scored finding with the ROC curves of the prompts
  and the k-NN vote against the chance diagonal;
- linear probe: ``linear_probe.png``, score against label fraction per row, with the
  spread of the draws.

The Markdown files lay the figures out as the papers do: per finding AUROC with its 95 %
interval for zero-shot; datasets down and label fractions across for the linear probe.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Final

from model.evaluation.linear_probe import ROW_TITLES, LinearProbeResult
from model.evaluation.report_files import REPORT_JSON, REPORT_MD, write_atomic
from model.evaluation.zeroshot import CHANCE, KNN, PROMPTS, ZeroShotResult

logger = logging.getLogger(__name__)

ROC_PLOT: Final = "roc.png"
PROBE_PLOT: Final = "linear_probe.png"
ZERO_SHOT_TITLES: Final[dict[str, str]] = {
    PROMPTS: "prompts",
    KNN: "k-NN vote",
    CHANCE: "chance",
}


def _pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100.0 * value:.1f}"


def zero_shot_markdown(result: ZeroShotResult) -> str:
    counts = result.counts
    lines = [
        f"# Zero-shot classification: prompt set {result.prompt_set.key}",
        "",
        f"- model: `{result.model_id}`" + (f" ({result.model_name})" if result.model_name else ""),
        f"- temperature τ = {result.temperature:g}; probability = softmax of the positive and "
        "negative ensemble similarities over τ",
        f"- {counts['images']} images; k-NN vote over the {result.options.knn_k} nearest of "
        f"{counts['knn_pool']} labelled images ({counts['knn_pool_rule']}), "
        f"{counts['knn_mean_voters']} voters per finding on average",
        f"- AUROC with a 95 % interval from {result.options.bootstrap} bootstrap resamples "
        f"(seed {result.options.seed}); F1 and MCC at the threshold maximising Youden's J",
        "",
        f"## Means (%) over the competition findings ({', '.join(result.competition) or 'none'})",
        "",
        "| row | AUROC (competition) | AUROC (all findings) | F1 | MCC |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result.scores:
        mean = result.mean(row)
        lines.append(
            f"| {ZERO_SHOT_TITLES.get(row, row)} | {_pct(mean['auroc_competition'])} | "
            f"{_pct(mean['auroc_all'])} | {_pct(mean['f1_competition'])} | "
            f"{_pct(mean['mcc_competition'])} |"
        )
    lines += [
        "",
        "## Per finding (%)",
        "",
        "| finding | positives / images | prompts AUROC [95 % CI] | F1 | MCC | "
        "k-NN AUROC [95 % CI] | chance AUROC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in result.findings:
        p, k, c = (result.scores[row][name] for row in (PROMPTS, KNN, CHANCE))
        lines.append(
            f"| {name} | {p.positives} / {p.positives + p.negatives} | {_pct(p.auroc)} "
            f"[{_pct(p.auroc_low)}, {_pct(p.auroc_high)}] | {_pct(p.f1)} | {_pct(p.mcc)} | "
            f"{_pct(k.auroc)} [{_pct(k.auroc_low)}, {_pct(k.auroc_high)}] | {_pct(c.auroc)} |"
        )
    lines += ["", f"Figure: `{ROC_PLOT}` (ROC curve per finding).", ""]
    return "\n".join(lines)


def _plot_roc(result: ZeroShotResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.findings)
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for index, name in enumerate(names):
        ax = axes[index // cols][index % cols]
        for row, colour in ((PROMPTS, "tab:blue"), (KNN, "tab:orange")):
            fpr, tpr = result.roc(row, name)
            value = result.scores[row][name].auroc
            ax.plot(fpr, tpr, color=colour, label=f"{ZERO_SHOT_TITLES[row]} {_pct(value)}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
    for index in range(len(names), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.supxlabel("false-positive rate")
    fig.supylabel("true-positive rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def linear_probe_markdown(result: LinearProbeResult) -> str:
    fractions = [f"{100.0 * f:g}%" for f in result.options.fractions]
    dataset = str(result.params.get("dataset") or "corpus")
    counts = result.counts
    metric = "AUROC" if result.metric == "auroc" else "accuracy"
    lines = [
        f"# Linear probe ({result.task}, {metric}, %)",
        "",
        f"- model: `{result.model_id}`" + (f" ({result.model_name})" if result.model_name else ""),
        f"- splits: {counts['train']} training images ({counts['train_patients']} patients), "
        f"{counts['validate']} validation, {counts['test']} test",
        f"- features: pooled image-backbone features (the projection head's input), frozen; "
        f"logistic regression with C chosen on the validation split from "
        f"{list(result.options.c_grid)}",
        f"- label fractions drawn by patient from the training split, "
        f"{result.options.draws} draws under 100 % (mean ± sd)",
        f"- findings ({len(result.findings)}): {', '.join(result.findings)}",
        "",
        "| dataset | method | " + " | ".join(fractions) + " |",
        "|---|---|" + "---:|" * len(fractions),
    ]
    for row, cells in result.rows.items():
        values = []
        for label in fractions:
            cell = cells[label]
            spread = f" ± {100.0 * cell.sd:.1f}" if len(cell.scores) > 1 else ""
            values.append(f"{_pct(cell.mean)}{spread}")
        lines.append(f"| {dataset} | {ROW_TITLES.get(row, row)} | " + " | ".join(values) + " |")
    lines += [
        "",
        "Images per draw: "
        + "; ".join(
            f"{label} {result.rows[next(iter(result.rows))][label].images}" for label in fractions
        ),
    ]
    lines += ["", f"Figure: `{PROBE_PLOT}`.", ""]
    return "\n".join(lines)


def _plot_probe(result: LinearProbeResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    xs = [100.0 * f for f in result.options.fractions]
    for row, cells in result.rows.items():
        means = [100.0 * c.mean for c in cells.values()]
        sds = [100.0 * c.sd for c in cells.values()]
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=ROW_TITLES.get(row, row))
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}%" for x in xs])
    ax.set_xlabel("labels used (share of the training split)")
    ax.set_ylabel(f"test {result.metric} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(
    out_dir: str | os.PathLike[str], document: dict[str, Any], markdown: str
) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / REPORT_JSON, json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_atomic(out / REPORT_MD, markdown)
    return out / REPORT_JSON, out / REPORT_MD


def write_zero_shot_report(
    result: ZeroShotResult, out_dir: str | os.PathLike[str], *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``report.json``, ``report.md`` and ``roc.png``; returns the JSON's path."""
    document = {**result.to_dict(), **(extra or {})}
    json_path, _ = _write(out_dir, document, zero_shot_markdown(result))
    _plot_roc(result, Path(out_dir) / ROC_PLOT)
    logger.info("zero-shot report written to %s", out_dir)
    return json_path


def write_linear_probe_report(
    result: LinearProbeResult,
    out_dir: str | os.PathLike[str],
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.json``, ``report.md`` and ``linear_probe.png``; returns the JSON's path."""
    document = {**result.to_dict(), **(extra or {})}
    json_path, _ = _write(out_dir, document, linear_probe_markdown(result))
    _plot_probe(result, Path(out_dir) / PROBE_PLOT)
    logger.info("linear-probe report written to %s", out_dir)
    return json_path
