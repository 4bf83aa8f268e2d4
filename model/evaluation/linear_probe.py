"""The linear-probe protocol: logistic regression on frozen image features (the paper's table).

Features are the pooled image-backbone features (the projection head's input, L2-normalised)
of three encoders, one row each:

- ``model``: the bundle's trained backbone;
- ``imagenet``: the same backbone with its initial ImageNet weights (the paper's
  "ImageNet" row), when the bundle's tower starts from pretrained weights;
- ``random_init``: the same backbone with seeded random weights.

The corpus needs ``train``, ``validate`` and ``test`` splits; records without a split are
assigned by patient (:func:`model.evaluation.labelled.assign_splits`). For each label
fraction (1 %, 10 %, 100 % by default) a share of the training split's *patients* is drawn
(all of a drawn patient's images come along, at least one patient), ``draws`` times for
fractions under 100 %. A standardise-then-logistic-regression model is fitted per draw:

- multi-label (CheXpert-style): one binary model per finding, its ``C`` chosen by
  validation AUROC, scored by test AUROC (mean over findings); a draw whose images hold
  one class only for a finding predicts that draw's prevalence, which scores 0.5;
- multi-class (COVIDx-style, every image has exactly one positive finding): one
  multinomial model, ``C`` chosen by validation accuracy, scored by test accuracy.

Scores are reported as mean ± sd over the draws. scikit-learn does the fitting; it is
imported when a probe runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from model.evaluation.cache import EmbeddingCache
from model.evaluation.classification_metrics import auroc, nanmean
from model.evaluation.errors import EvaluationError, ProtocolError
from model.evaluation.features import FeatureSpace, embed_records
from model.evaluation.labelled import (
    LabelledRecord,
    assign_splits,
    label_matrix,
    labelled_findings,
)
from model.evaluation.runner import EmbeddingStats, ProgressCallback, check_stop

logger = logging.getLogger(__name__)

LINEAR_PROBE: Final = "linear_probe"
MODEL_ROW: Final = "model"
IMAGENET_ROW: Final = "imagenet"
RANDOM_ROW: Final = "random_init"
ROW_TITLES: Final[dict[str, str]] = {
    MODEL_ROW: "ConVIRT (this bundle)",
    IMAGENET_ROW: "ImageNet",
    RANDOM_ROW: "Random init",
}
FRACTIONS: Final[tuple[float, ...]] = (0.01, 0.1, 1.0)
DRAWS: Final = 3
#: Inverse regularisation strengths tried on the validation split.
C_GRID: Final[tuple[float, ...]] = (0.001, 0.01, 0.1, 1.0, 10.0)
TASKS: Final[tuple[str, ...]] = ("auto", "multi-label", "multi-class")

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LinearProbeOptions:
    fractions: tuple[float, ...] = FRACTIONS
    draws: int = DRAWS
    c_grid: tuple[float, ...] = C_GRID
    task: str = "auto"
    seed: int = 0
    batch_size: int = 32
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise EvaluationError(f"label fractions must lie in (0, 1], got {self.fractions}")
        if self.draws < 1 or not self.c_grid or self.task not in TASKS:
            raise EvaluationError("draws ≥ 1, a non-empty C grid and a known task are needed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fractions": list(self.fractions),
            "draws": self.draws,
            "c_grid": list(self.c_grid),
            "task": self.task,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_iter": self.max_iter,
        }


def fraction_label(fraction: float) -> str:
    """0.01 → ``"1%"``."""
    return f"{100.0 * fraction:g}%"


def draw_patients(
    records: Sequence[LabelledRecord], fraction: float, draw: int, seed: int
) -> list[int]:
    """Indices of ``records`` of a random ``fraction`` of their patients (at least one).

    Patients are drawn, not images, so a patient's images are all in or all out.
    """
    patients = sorted({r.patient_id for r in records})
    if not patients:
        return []
    wanted = max(1, math.ceil(fraction * len(patients)))
    if wanted >= len(patients):
        return list(range(len(records)))
    rng = np.random.default_rng([seed, draw, round(fraction * 1_000_000)])
    chosen = {patients[i] for i in rng.permutation(len(patients))[:wanted]}
    return [i for i, r in enumerate(records) if r.patient_id in chosen]


def _fit(c: float, max_iter: int, x: FloatArray, y: npt.NDArray[Any], *, binary: bool) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Binary probes use liblinear's dual solver: with fewer images than feature dimensions
    # (the usual case at 1 % and 10 % of the labels) it converges several times faster
    # than lbfgs. The multinomial model needs lbfgs.
    solver: dict[str, Any] = {"solver": "liblinear", "dual": True} if binary else {}
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, **solver))
    with warnings.catch_warnings():
        # A small C on few images converges slowly; the validation score judges the result.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def probe_binary(
    train: tuple[FloatArray, BoolArray],
    validate: tuple[FloatArray, BoolArray],
    test: tuple[FloatArray, BoolArray],
    c_grid: Sequence[float],
    max_iter: int,
) -> tuple[float, float | None]:
    """(test AUROC, chosen C) of one finding; C None when the training labels are one class."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, validate, test
    if y_train.all() or not y_train.any():
        return auroc(y_test, np.full(len(y_test), float(y_train.mean()))), None
    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        model = _fit(c, max_iter, x_train, y_train, binary=True)
        score = auroc(y_val, model.predict_proba(x_val)[:, 1])
        score = -1.0 if math.isnan(score) else score
        if best is None or score > best[0]:
            best = (score, c, model)
    assert best is not None
    return auroc(y_test, best[2].predict_proba(x_test)[:, 1]), best[1]


def probe_multiclass(
    train: tuple[FloatArray, npt.NDArray[np.int64]],
    validate: tuple[FloatArray, npt.NDArray[np.int64]],
    test: tuple[FloatArray, npt.NDArray[np.int64]],
    c_grid: Sequence[float],
    max_iter: int,
) -> tuple[float, float | None]:
    """(test accuracy, chosen C) of one multinomial model; C None with one training class."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, validate, test
    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_test == y_train[0])), None
    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        model = _fit(c, max_iter, x_train, y_train, binary=False)
        score = float(np.mean(model.predict(x_val) == y_val))
        if best is None or score > best[0]:
            best = (score, c, model)
    assert best is not None
    return float(np.mean(best[2].predict(x_test) == y_test)), best[1]


@dataclass
class ProbeCell:
    """One row at one label fraction: a score per draw (and per finding, multi-label)."""

    scores: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    chosen_c: list[list[float | None]] = field(default_factory=list)
    per_finding: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return nanmean(self.scores)

    @property
    def sd(self) -> float:
        kept = [s for s in self.scores if not math.isnan(s)]
        return float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0 if kept else math.nan

    def to_dict(self) -> dict[str, Any]:
        def num(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 6)

        return {
            "mean": num(self.mean),
            "sd": num(self.sd),
            "draws": [num(s) for s in self.scores],
            "images": self.images,
            "chosen_c": self.chosen_c,
            "per_finding": {n: num(nanmean(v)) for n, v in self.per_finding.items()},
        }


@dataclass(frozen=True, eq=False)
class LinearProbeResult:
    model_id: str
    model_name: str | None
    task: str
    metric: str
    findings: tuple[str, ...]
    options: LinearProbeOptions
    rows: dict[str, dict[str, ProbeCell]]
    row_descriptions: dict[str, dict[str, Any]]
    counts: dict[str, Any]
    embedding_stats: dict[str, EmbeddingStats]
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the run (``report.json``)."""

        def num(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 6)

        return {
            "protocol": {"name": "linear-probe", "params": self.params, "counts": self.counts},
            "model": {"model_id": self.model_id, "name": self.model_name},
            "task": self.task,
            "metric": self.metric,
            "findings": list(self.findings),
            "options": self.options.to_dict(),
            "rows": {row: dict(d) for row, d in self.row_descriptions.items()},
            "results": {
                LINEAR_PROBE: {
                    row: {
                        "mean": {f"{self.metric}@{f}": num(c.mean) for f, c in cells.items()},
                        "sd": {f"{self.metric}@{f}": num(c.sd) for f, c in cells.items()},
                        "fractions": {f: c.to_dict() for f, c in cells.items()},
                    }
                    for row, cells in self.rows.items()
                }
            },
            "embeddings": {
                space: {"images": s.images, "cache_hits": s.cache_hits, "encoded": s.encoded}
                for space, s in self.embedding_stats.items()
            },
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Splits:
    train: list[int]
    validate: list[int]
    test: list[int]


def _splits(records: Sequence[LabelledRecord]) -> _Splits:
    splits = _Splits(
        train=[i for i, r in enumerate(records) if r.split == "train"],
        validate=[i for i, r in enumerate(records) if r.split == "validate"],
        test=[i for i, r in enumerate(records) if r.split == "test"],
    )
    for name in ("train", "validate", "test"):
        if not getattr(splits, name):
            raise ProtocolError(
                f"the linear probe needs images in the {name} split", code="not_enough_images"
            )
    return splits


def _task(positive: BoolArray, known: BoolArray, wanted: str) -> str:
    single = bool(np.all(positive.sum(axis=1) == 1) and known.all())
    if wanted == "auto":
        return "multi-class" if single else "multi-label"
    if wanted == "multi-class" and not single:
        raise ProtocolError(
            "multi-class needs exactly one positive finding per image", code="invalid_labels"
        )
    return wanted


def _probe_draw(
    x: FloatArray,
    positive: BoolArray,
    known: BoolArray,
    splits: _Splits,
    picked: Sequence[int],
    task: str,
    options: LinearProbeOptions,
) -> tuple[float, list[float | None], list[float]]:
    """(score, chosen C per model, per-finding scores) of one draw of one row."""
    if task == "multi-class":
        classes = positive.argmax(axis=1)

        def part(rows: Sequence[int]) -> tuple[FloatArray, npt.NDArray[np.int64]]:
            return x[list(rows)], classes[list(rows)]

        accuracy, c = probe_multiclass(
            part(picked), part(splits.validate), part(splits.test), options.c_grid, options.max_iter
        )
        return accuracy, [c], []
    per_finding: list[float] = []
    chosen: list[float | None] = []
    for col in range(positive.shape[1]):

        def rows_of(rows: Sequence[int], col: int = col) -> tuple[FloatArray, BoolArray]:
            keep = [i for i in rows if known[i, col]]
            return x[keep], positive[keep, col]

        score, c = probe_binary(
            rows_of(picked),
            rows_of(splits.validate),
            rows_of(splits.test),
            options.c_grid,
            options.max_iter,
        )
        per_finding.append(score)
        chosen.append(c)
    return nanmean(per_finding), chosen, per_finding


def _fit_rows(
    vectors: Mapping[str, FloatArray],
    positive: BoolArray,
    known: BoolArray,
    splits: _Splits,
    draws: Mapping[str, list[list[int]]],
    findings: Sequence[str],
    task: str,
    options: LinearProbeOptions,
    report: ProgressCallback,
    cancel: threading.Event | None,
) -> dict[str, dict[str, ProbeCell]]:
    """row → fraction label → the cell of its draws' scores."""
    rows: dict[str, dict[str, ProbeCell]] = {}
    total = len(vectors) * sum(len(v) for v in draws.values())
    done = 0
    for row, x in vectors.items():
        rows[row] = {}
        for label, picks in draws.items():
            cell = ProbeCell(per_finding={n: [] for n in findings} if task == "multi-label" else {})
            for picked in picks:
                check_stop(cancel)
                score, chosen, per = _probe_draw(x, positive, known, splits, picked, task, options)
                cell.scores.append(score)
                cell.images.append(len(picked))
                cell.chosen_c.append(chosen)
                for name, value in zip(findings, per, strict=False):
                    cell.per_finding[name].append(value)
                done += 1
                report(0.8 + 0.2 * done / total, f"fitting probes {done}/{total}")
            rows[row][label] = cell
    return rows


def run_linear_probe(
    records: Sequence[LabelledRecord],
    spaces: Mapping[str, FeatureSpace],
    findings: Sequence[str],
    *,
    model_id: str,
    model_name: str | None = None,
    cache: EmbeddingCache | None = None,
    options: LinearProbeOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    params: dict[str, Any] | None = None,
) -> LinearProbeResult:
    """Fit and score the probes of every row in ``spaces`` at every label fraction."""
    opts = options or LinearProbeOptions()
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    split_records = assign_splits(records, seed=opts.seed)
    splits = _splits(split_records)
    train_records = [split_records[i] for i in splits.train]
    test_records = [split_records[i] for i in splits.test]
    usable = [
        n
        for n in labelled_findings(test_records, findings)
        if n in set(labelled_findings(train_records, findings))
    ]
    if not usable:
        raise ProtocolError(
            "no finding has positive and negative labels in both the train and test splits",
            code="category_absent",
        )
    positive, known = label_matrix(split_records, usable)  # (N, C) each
    task = _task(positive, known, opts.task)
    vectors, stats = embed_records(
        split_records,
        spaces,
        cache=cache,
        batch_size=opts.batch_size,
        progress=lambda f, stage: report(0.8 * f, stage),
        cancel=cancel,
    )
    draws = {
        fraction_label(f): [
            [splits.train[i] for i in draw_patients(train_records, f, d, opts.seed)]
            for d in range(opts.draws if f < 1.0 else 1)
        ]
        for f in opts.fractions
    }
    rows = _fit_rows(vectors, positive, known, splits, draws, usable, task, opts, report, cancel)
    result = LinearProbeResult(
        model_id=model_id,
        model_name=model_name,
        task=task,
        metric="accuracy" if task == "multi-class" else "auroc",
        findings=tuple(usable),
        options=opts,
        rows=rows,
        row_descriptions={name: dict(space.description) for name, space in spaces.items()},
        counts={
            "train": len(splits.train),
            "validate": len(splits.validate),
            "test": len(splits.test),
            "train_patients": len({r.patient_id for r in train_records}),
        },
        embedding_stats=stats,
        seconds=time.perf_counter() - started,
        params=dict(params or {}),
    )
    report(1.0, "done")
    logger.info(
        "linear probe (%s) in %.1f s: %s",
        task,
        result.seconds,
        "; ".join(
            f"{row} " + ", ".join(f"{f} {c.mean:.3f}" for f, c in cells.items())
            for row, cells in rows.items()
        ),
    )
    return result
