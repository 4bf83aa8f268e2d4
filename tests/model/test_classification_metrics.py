"""AUROC, its bootstrap interval, Youden's threshold, F1 and MCC on vectors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from model.evaluation.classification_metrics import (
    auroc,
    bootstrap_auroc,
    f1_mcc,
    roc_curve,
    score_binary,
    youden_threshold,
)


def test_a_perfect_classifier_scores_auroc_one() -> None:
    truth = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.where(truth == 1, 0.9, 0.1) + np.arange(7) * 1e-3
    assert auroc(truth, scores) == 1.0
    # A perfectly wrong one scores 0, and F1/MCC at Youden's threshold are perfect.
    assert auroc(truth, -scores) == 0.0
    result = score_binary(truth, scores, resamples=200)
    assert (result.f1, result.mcc) == (1.0, 1.0)
    assert result.auroc_low == result.auroc_high == 1.0


def test_a_constant_classifier_scores_one_half() -> None:
    truth = np.random.default_rng(3).random(50) < 0.3
    assert auroc(truth, np.full(50, 0.42)) == 0.5


def test_auroc_is_undefined_with_one_class() -> None:
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in bootstrap_auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(youden_threshold([0, 0], [0.1, 0.2]))


def test_auroc_agrees_with_scikit_learn_including_ties() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.4
    # Rounded scores: many ties, which count one half each.
    scores = np.round(truth * 0.3 + rng.random(300), 1)
    assert auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_the_bootstrap_interval_covers_the_true_auroc_on_a_seeded_example() -> None:
    # Scores are N(1, 1) for positives and N(0, 1) for negatives: the population AUROC is
    # Φ(1 / √2) = 0.76025.
    truth_auroc = 0.5 * (1.0 + math.erf(0.5))
    rng = np.random.default_rng(7)
    truth = rng.random(400) < 0.5
    scores = rng.normal(size=400) + truth
    low, high = bootstrap_auroc(truth, scores, resamples=1000, seed=0)
    assert low < truth_auroc < high
    assert 0.05 < high - low < 0.2  # an interval of sensible width, not [0, 1]
    # Fixed seed, fixed interval.
    assert bootstrap_auroc(truth, scores, resamples=1000, seed=0) == (low, high)


def test_roc_curve_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random(80) < 0.5
    scores = np.round(rng.random(80) + 0.5 * truth, 2)
    fpr, tpr, thresholds = roc_curve(truth, scores)
    expected_fpr, expected_tpr, _ = sklearn_roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    assert thresholds[0] == np.inf


def test_youden_threshold_separates_a_separable_example() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8])
    threshold = youden_threshold(truth, scores)
    assert 0.35 < threshold <= 0.6
    assert f1_mcc(truth, scores >= threshold) == (1.0, 1.0)


def test_f1_and_mcc_agree_with_hand_counts_and_scikit_learn() -> None:
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    guess = np.array([1, 0, 1, 1, 0, 0, 0, 0])
    f1, mcc = f1_mcc(truth, guess)
    # tp 2, fp 1, fn 2, tn 3.
    assert f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert mcc == pytest.approx(matthews_corrcoef(truth, guess))
    assert f1_mcc(truth, np.zeros(8, dtype=bool)) == (0.0, 0.0)
