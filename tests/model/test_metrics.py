"""Precision@k, average precision, the tie rule and the random baselines, on hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from model.evaluation.errors import EvaluationError
from model.evaluation.metrics import (
    MAP,
    analytic_random_baseline,
    average_precision,
    category_means,
    expected_random_average_precision,
    expected_random_precision,
    precision_at_k,
    random_baseline,
    rank_candidates,
    ranked_relevance,
    score_retrieval,
)

# One query, six candidates, three of them relevant (candidates 1, 2 and 5).
SCORES = np.array([[0.9, 0.5, 0.9, 0.1, 0.5, 0.7]])
POSITIVE = np.array([[0], [1], [1], [0], [0], [1]], dtype=bool)  # (N=6, C=1)


def test_ties_keep_candidate_order() -> None:
    # 0 and 2 tie at 0.9, 1 and 4 tie at 0.5: the one listed first ranks higher.
    assert rank_candidates(SCORES).tolist() == [[0, 2, 5, 1, 4, 3]]


def test_all_equal_scores_rank_in_protocol_order() -> None:
    assert rank_candidates(np.zeros((2, 4))).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # Negative zero ties with zero instead of sorting before it.
    assert rank_candidates(np.array([[0.0, -0.0, 0.0]])).tolist() == [[0, 1, 2]]


def test_precision_at_k_hand_computed_with_ties() -> None:
    relevance = ranked_relevance(rank_candidates(SCORES), POSITIVE, np.array([0]))
    assert relevance.tolist() == [[False, True, True, True, False, False]]
    # Breaking the 0.9 tie the other way would put candidate 2 first and give P@1 = 1.
    assert precision_at_k(relevance, 1).tolist() == [0.0]
    assert precision_at_k(relevance, 2).tolist() == [0.5]
    assert precision_at_k(relevance, 3)[0] == pytest.approx(2 / 3)
    assert precision_at_k(relevance, 4)[0] == pytest.approx(3 / 4)
    assert precision_at_k(relevance, 5)[0] == pytest.approx(3 / 5)
    assert precision_at_k(relevance, 6)[0] == pytest.approx(1 / 2)


def test_average_precision_hand_computed() -> None:
    relevance = ranked_relevance(rank_candidates(SCORES), POSITIVE, np.array([0]))
    # Relevant at ranks 2, 3, 4: (1/2 + 2/3 + 3/4) / 3.
    assert average_precision(relevance)[0] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    perfect = np.array([[True, True, False, False]])
    assert average_precision(perfect)[0] == pytest.approx(1.0)
    last = np.array([[False, False, False, True]])
    assert average_precision(last)[0] == pytest.approx(0.25)


def test_label_rule_uses_the_query_category_column() -> None:
    # Two categories; candidate 0 is positive for category 1 only.
    positive = np.array([[False, True], [True, False], [False, False]])
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    relevance = ranked_relevance(rank_candidates(scores), positive, np.array([0, 1]))
    assert relevance.tolist() == [[False, True, False], [True, False, False]]


def test_category_mean_is_unweighted_over_categories() -> None:
    # Category 0 has two queries (P@1 = 1 and 0), category 1 one query (P@1 = 1).
    positive = np.array([[True, False], [False, True], [False, False]])
    scores = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    result = score_retrieval(scores, positive, np.array([0, 0, 1]), ("a", "b"), ks=(1,))
    assert result.per_category["p@1"].tolist() == [0.5, 1.0]
    assert result.mean["p@1"] == pytest.approx(0.75)  # not 2/3, the mean over queries
    table = result.to_dict()
    assert table["per_category"]["a"]["p@1"] == 0.5
    assert table["queries"] == {"a": 2, "b": 1}
    assert set(table["mean"]) == {"p@1", MAP}


def test_category_without_queries_is_nan_and_left_out_of_the_mean() -> None:
    means = category_means(np.array([1.0, 0.0]), np.array([0, 0]), 2)
    assert means[0] == 0.5
    assert math.isnan(means[1])


def test_expected_random_average_precision_matches_enumeration() -> None:
    for n, r in ((5, 2), (6, 1), (6, 3), (4, 4)):
        values = []
        for relevant in itertools.combinations(range(n), r):
            ranked = np.zeros((1, n), dtype=bool)
            ranked[0, list(relevant)] = True
            values.append(average_precision(ranked)[0])
        assert expected_random_average_precision(r, n) == pytest.approx(np.mean(values))
    assert expected_random_precision(200, 1600) == 0.125


def test_random_baselines_of_the_8x200_shape() -> None:
    categories = tuple("abcdefgh")
    positive = np.repeat(np.eye(8, dtype=bool), 200, axis=0)  # (1600, 8)
    query_category = np.repeat(np.arange(8), 10)  # (80,)
    analytic = analytic_random_baseline(positive, query_category, categories)
    assert analytic.mean["p@5"] == analytic.mean["p@50"] == 0.125
    empirical = random_baseline(positive, query_category, categories, repeats=10, seed=3)
    for k in ("p@10", "p@50"):
        assert abs(empirical.mean[k] - 0.125) < 0.02
    assert empirical.mean[MAP] == pytest.approx(analytic.mean[MAP], abs=0.01)
    again = random_baseline(positive, query_category, categories, repeats=10, seed=3)
    assert again.mean == empirical.mean


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(EvaluationError) as info:
        rank_candidates(np.array([[0.1, np.nan]]))
    assert info.value.code == "non_finite_scores"
    with pytest.raises(EvaluationError) as info:
        precision_at_k(np.ones((1, 3), dtype=bool), 4)
    assert info.value.code == "k_out_of_range"
    with pytest.raises(EvaluationError) as info:
        average_precision(np.zeros((1, 3), dtype=bool))
    assert info.value.code == "no_relevant_candidate"
    with pytest.raises(EvaluationError):
        ranked_relevance(np.zeros((1, 3), dtype=np.int64), POSITIVE, np.array([0]))
    with pytest.raises(EvaluationError):
        ranked_relevance(rank_candidates(SCORES), POSITIVE, np.array([1]))
