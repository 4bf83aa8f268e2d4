"""Scores of a binary classifier: AUROC with a bootstrap interval, Youden's J, F1, MCC.

Every function takes ``y_true`` as bool or {0, 1} (N,) and ``scores`` as float (N,), higher
meaning "more likely positive". AUROC is the Mann–Whitney statistic (ties count one half),
so a constant score has AUROC 0.5 exactly and a perfect ranking 1.0; it is undefined (NaN)
when only one class is present. The bootstrap resamples cases with replacement from a
generator seeded by the caller and reports the 2.5 and 97.5 percentiles of the resampled
AUROCs (resamples that hold one class only are drawn again, up to a bound, then skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: Resamples of the bootstrap interval, and its coverage.
BOOTSTRAP_RESAMPLES: Final = 1000
CONFIDENCE: Final = 0.95

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _as_arrays(y_true: Any, scores: Any) -> tuple[BoolArray, FloatArray]:
    truth = np.asarray(y_true).astype(bool).reshape(-1)  # (N,)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)  # (N,)
    if truth.shape != values.shape:
        raise ValueError(f"{truth.size} labels but {values.size} scores")
    return truth, values


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks of ``values`` with tied values sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start..end-1, 1-based
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve; NaN when ``y_true`` holds one class only."""
    truth, values = _as_arrays(y_true, scores)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = float(_average_ranks(values)[truth].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def bootstrap_auroc(
    y_true: Any,
    scores: Any,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The percentile interval of AUROC over ``resamples`` bootstrap resamples.

    (NaN, NaN) when one class is absent or no resample holds both classes.
    """
    truth, values = _as_arrays(y_true, scores)
    if truth.all() or not truth.any():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n = truth.size
    drawn: list[float] = []
    for _ in range(resamples):
        pick = rng.integers(0, n, size=n)  # (N,)
        value = auroc(truth[pick], values[pick])
        if not math.isnan(value):
            drawn.append(value)
    if not drawn:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(np.asarray(drawn), [tail, 100.0 - tail])
    return float(low), float(high)


def roc_curve(y_true: Any, scores: Any) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(false-positive rates, true-positive rates, thresholds), from (0, 0) upwards.

    Threshold ``t`` predicts positive for ``score >= t``; the first threshold is +inf.
    """
    truth, values = _as_arrays(y_true, scores)
    order = np.argsort(-values, kind="mergesort")
    ordered = values[order]
    hits = truth[order]
    # One point per distinct score: the last index of each run of equal values.
    last = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), ordered.size - 1]
    tp = np.cumsum(hits)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    positives = max(float(truth.sum()), 1.0)
    negatives = max(float((~truth).sum()), 1.0)
    fpr = np.r_[0.0, fp / negatives]
    tpr = np.r_[0.0, tp / positives]
    thresholds = np.r_[np.inf, ordered[last]]
    return fpr, tpr, thresholds


def youden_threshold(y_true: Any, scores: Any) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity − 1.

    Ties go to the higher threshold (fewer positive calls). NaN with one class only.
    """
    truth, values = _as_arrays(y_true, scores)
    if truth.all() or not truth.any():
        return math.nan
    fpr, tpr, thresholds = roc_curve(truth, values)
    j = tpr - fpr
    return float(thresholds[int(np.argmax(j))])


def f1_mcc(y_true: Any, predicted: Any) -> tuple[float, float]:
    """F1 of the positive class and Matthews' correlation of bool predictions.

    MCC is 0 when a row or column of the confusion matrix is empty (the usual convention).
    """
    truth, _ = _as_arrays(y_true, np.zeros(np.asarray(y_true).size))
    guess = np.asarray(predicted).astype(bool).reshape(-1)
    tp = float(np.sum(truth & guess))
    fp = float(np.sum(~truth & guess))
    fn = float(np.sum(truth & ~guess))
    tn = float(np.sum(~truth & ~guess))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denominator if denominator > 0 else 0.0
    return f1, mcc


@dataclass(frozen=True)
class BinaryScores:
    """One finding's scores: AUROC with its interval, and F1/MCC at Youden's threshold."""

    positives: int
    negatives: int
    auroc: float
    auroc_low: float
    auroc_high: float
    threshold: float
    f1: float
    mcc: float

    def to_dict(self) -> dict[str, Any]:
        def num(value: float) -> float | None:
            return None if math.isnan(value) or math.isinf(value) else round(value, 6)

        return {
            "positives": self.positives,
            "negatives": self.negatives,
            "auroc": num(self.auroc),
            "auroc_ci95": [num(self.auroc_low), num(self.auroc_high)],
            "threshold": num(self.threshold),
            "f1": num(self.f1),
            "mcc": num(self.mcc),
        }


def score_binary(
    y_true: Any, scores: Any, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> BinaryScores:
    """Every score of one finding (NaN where only one class is present)."""
    truth, values = _as_arrays(y_true, scores)
    low, high = bootstrap_auroc(truth, values, resamples=resamples, seed=seed)
    threshold = youden_threshold(truth, values)
    if math.isnan(threshold):
        f1, mcc = math.nan, math.nan
    else:
        f1, mcc = f1_mcc(truth, values >= threshold)
    return BinaryScores(
        positives=int(truth.sum()),
        negatives=int((~truth).sum()),
        auroc=auroc(truth, values),
        auroc_low=low,
        auroc_high=high,
        threshold=threshold,
        f1=f1,
        mcc=mcc,
    )


def nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan
