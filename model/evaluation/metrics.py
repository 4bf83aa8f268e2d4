"""Retrieval metrics of the CheXpert 8x200 protocol: precision@k and average precision.

Every query ranks the *same* candidate set. A candidate is relevant to a query when its
label for the query's category is positive (1); uncertain (-1), negative (0) and unknown
labels all count as not relevant, as in the ConVIRT evaluation.

Tie rule (deterministic, documented in the report as :data:`TIE_RULE`): candidates are
ranked by descending similarity and equal similarities keep the candidates' protocol order,
so of two candidates with the same score the one listed first ranks higher. FAISS gives no
such promise for ties, which is why rankings here are computed with a stable sort over the
full score matrix (80 × 1,600 for the official protocol: cheap).

Aggregation follows the paper: a metric is averaged over the queries of each category, and
the protocol-level figure is the unweighted mean of the per-category values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from model.evaluation.errors import EvaluationError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: The cut-offs the paper reports.
DEFAULT_KS: Final[tuple[int, ...]] = (5, 10, 50)
#: Name of the mean-average-precision metric in score tables.
MAP: Final = "map"

TIE_RULE: Final = (
    "candidates are ranked by descending cosine similarity; equal similarities keep the "
    "candidates' protocol order (the candidate listed first ranks higher)"
)


def precision_key(k: int) -> str:
    """The score-table key of precision@k: ``"p@10"``."""
    return f"p@{k}"


def rank_candidates(scores: npt.ArrayLike) -> IntArray:
    """Candidate indices of each query, best first, with ties kept in candidate order.

    Args:
        scores: (Q, N) similarities of Q queries to N candidates; must be finite.

    Returns:
        int64 (Q, N): row q lists the candidate indices by descending score.
    """
    matrix = np.asarray(scores, dtype=np.float64)  # (Q, N)
    if matrix.ndim != 2:
        raise EvaluationError(f"scores must be a (queries, candidates) matrix, got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise EvaluationError("scores hold NaN or infinite values", code="non_finite_scores")
    # A stable ascending sort of the negated scores is descending by score with ties left
    # in index order; -0.0 and 0.0 compare equal, so they tie as they should.
    return np.argsort(-matrix, axis=1, kind="stable").astype(np.int64)  # (Q, N)


def ranked_relevance(
    ranking: npt.ArrayLike, candidate_positive: npt.ArrayLike, query_category: npt.ArrayLike
) -> BoolArray:
    """Relevance of each query's ranked candidates.

    Args:
        ranking: int (Q, N) from :func:`rank_candidates`.
        candidate_positive: bool (N, C): candidate n is positive for category c.
        query_category: int (Q,): the category index of each query.

    Returns:
        bool (Q, N): entry (q, r) tells whether query q's rank-r candidate is relevant.
    """
    order = np.asarray(ranking, dtype=np.int64)  # (Q, N)
    positive = np.asarray(candidate_positive, dtype=bool)  # (N, C)
    category = np.asarray(query_category, dtype=np.int64)  # (Q,)
    if order.ndim != 2 or positive.ndim != 2 or category.ndim != 1:
        raise EvaluationError("ranking (Q, N), candidate_positive (N, C), query_category (Q,)")
    if order.shape != (category.shape[0], positive.shape[0]):
        raise EvaluationError(
            f"ranking has shape {order.shape}; expected ({category.shape[0]}, {positive.shape[0]})"
        )
    if category.size and (category.min() < 0 or category.max() >= positive.shape[1]):
        raise EvaluationError(f"query categories must lie in [0, {positive.shape[1]})")
    relevant_by_candidate = positive[:, category].T  # (Q, N), in candidate order
    return np.take_along_axis(relevant_by_candidate, order, axis=1)  # (Q, N), in rank order


def precision_at_k(relevance: npt.ArrayLike, k: int) -> FloatArray:
    """Fraction of relevant candidates among each query's top k.

    Args:
        relevance: bool (Q, N) in rank order (:func:`ranked_relevance`).
        k: cut-off, 1 ≤ k ≤ N.

    Returns:
        float64 (Q,).
    """
    ranked = np.asarray(relevance, dtype=bool)  # (Q, N)
    _check_k(k, ranked.shape[1])
    return ranked[:, :k].mean(axis=1, dtype=np.float64)  # (Q,)


def average_precision(relevance: npt.ArrayLike) -> FloatArray:
    """Average precision of each query over the full ranking.

    The mean, over the relevant candidates, of the precision at each one's rank.

    Args:
        relevance: bool (Q, N) in rank order; every query needs a relevant candidate.

    Returns:
        float64 (Q,).
    """
    ranked = np.asarray(relevance, dtype=bool)  # (Q, N)
    hits = np.cumsum(ranked, axis=1, dtype=np.float64)  # (Q, N)
    totals = hits[:, -1] if ranked.shape[1] else np.zeros(ranked.shape[0])  # (Q,)
    if np.any(totals == 0):
        raise EvaluationError(
            "a query has no relevant candidate: average precision is undefined",
            code="no_relevant_candidate",
        )
    ranks = np.arange(1, ranked.shape[1] + 1, dtype=np.float64)  # (N,)
    precision_at_hit = np.where(ranked, hits / ranks, 0.0)  # (Q, N)
    return precision_at_hit.sum(axis=1) / totals  # (Q,)


def expected_random_precision(n_relevant: int, n_candidates: int) -> float:
    """Expected precision@k of a uniformly random ranking: R / N for every k ≤ N."""
    _check_counts(n_relevant, n_candidates)
    return n_relevant / n_candidates


def expected_random_average_precision(n_relevant: int, n_candidates: int) -> float:
    """Expected average precision of a uniformly random ranking of N candidates, R relevant.

    E[AP] = ((R − 1)/(N − 1) · (N − H_N) + H_N) / N with H_N the N-th harmonic number
    (the precision at a relevant rank r counts itself, 1/r, plus each other relevant
    candidate ranked above it, (R − 1)/(N − 1) · (r − 1)/r in expectation).
    """
    _check_counts(n_relevant, n_candidates)
    if n_relevant == 0:
        raise EvaluationError("average precision needs a relevant candidate")
    harmonic = float(np.sum(1.0 / np.arange(1, n_candidates + 1, dtype=np.float64)))
    others = (n_relevant - 1) / (n_candidates - 1) if n_candidates > 1 else 0.0
    return (others * (n_candidates - harmonic) + harmonic) / n_candidates


def category_means(
    values: npt.ArrayLike, query_category: npt.ArrayLike, n_categories: int
) -> FloatArray:
    """Mean of per-query values within each category.

    Args:
        values: float (Q,).
        query_category: int (Q,) in [0, n_categories).

    Returns:
        float64 (C,); NaN for a category without queries.
    """
    per_query = np.asarray(values, dtype=np.float64)  # (Q,)
    category = np.asarray(query_category, dtype=np.int64)  # (Q,)
    sums = np.bincount(category, weights=per_query, minlength=n_categories)  # (C,)
    counts = np.bincount(category, minlength=n_categories).astype(np.float64)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)  # (C,)


@dataclass(frozen=True, eq=False)
class RetrievalScores:
    """Scores of one method on one retrieval task.

    ``per_query[m]`` is float64 (Q,) for each metric key ``m`` (``"p@5"``, …, ``"map"``);
    ``per_category[m]`` is float64 (C,) in the order of ``categories``; ``mean[m]`` is the
    unweighted mean over the categories that have queries.
    """

    categories: tuple[str, ...]
    ks: tuple[int, ...]
    query_category: IntArray
    per_query: dict[str, FloatArray]
    per_category: dict[str, FloatArray]
    mean: dict[str, float]

    @property
    def metrics(self) -> tuple[str, ...]:
        return (*(precision_key(k) for k in self.ks), MAP)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"mean": {...}, "per_category": {category: {...}}, "queries": {...}}``."""
        counts = np.bincount(self.query_category, minlength=len(self.categories))
        return {
            "mean": {m: _json_float(self.mean[m]) for m in self.metrics},
            "per_category": {
                name: {m: _json_float(self.per_category[m][c]) for m in self.metrics}
                for c, name in enumerate(self.categories)
            },
            "queries": {name: int(counts[c]) for c, name in enumerate(self.categories)},
        }


def score_retrieval(
    scores: npt.ArrayLike,
    candidate_positive: npt.ArrayLike,
    query_category: npt.ArrayLike,
    categories: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Rank (with the tie rule) and score one method on one task.

    Args:
        scores: (Q, N) similarities.
        candidate_positive: bool (N, C).
        query_category: int (Q,).
        categories: the C category names.
        ks: precision cut-offs.
    """
    relevance = ranked_relevance(rank_candidates(scores), candidate_positive, query_category)
    return scores_from_relevance(relevance, query_category, categories, ks)


def scores_from_relevance(
    relevance: npt.ArrayLike,
    query_category: npt.ArrayLike,
    categories: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Score rank-ordered relevance (Q, N) per query, per category and overall."""
    ranked = np.asarray(relevance, dtype=bool)  # (Q, N)
    category = np.asarray(query_category, dtype=np.int64)  # (Q,)
    names = tuple(categories)
    cutoffs = tuple(int(k) for k in ks)
    for k in cutoffs:
        _check_k(k, ranked.shape[1])
    per_query = {precision_key(k): precision_at_k(ranked, k) for k in cutoffs}
    per_query[MAP] = average_precision(ranked)
    return _aggregate(names, cutoffs, category, per_query)


def random_baseline(
    candidate_positive: npt.ArrayLike,
    query_category: npt.ArrayLike,
    categories: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    repeats: int = 20,
    seed: int = 0,
) -> RetrievalScores:
    """Empirical random baseline: the scores of ``repeats`` uniformly random rankings.

    Each repeat draws independent uniform scores for every (query, candidate) pair, so ties
    have probability zero; per-query values are averaged over the repeats.
    """
    if repeats < 1:
        raise EvaluationError(f"repeats must be at least 1, got {repeats}")
    positive = np.asarray(candidate_positive, dtype=bool)  # (N, C)
    category = np.asarray(query_category, dtype=np.int64)  # (Q,)
    rng = np.random.default_rng(seed)
    total: dict[str, FloatArray] | None = None
    for _ in range(repeats):
        scores = rng.random((category.shape[0], positive.shape[0]))  # (Q, N)
        run = score_retrieval(scores, positive, category, categories, ks)
        if total is None:
            total = {m: v.copy() for m, v in run.per_query.items()}
        else:
            for m, v in run.per_query.items():
                total[m] += v
    assert total is not None
    per_query = {m: v / repeats for m, v in total.items()}
    return _aggregate(tuple(categories), tuple(int(k) for k in ks), category, per_query)


def analytic_random_baseline(
    candidate_positive: npt.ArrayLike,
    query_category: npt.ArrayLike,
    categories: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Expected scores of a uniformly random ranking (exact, no sampling).

    For the official protocol every category has 200 of 1,600 candidates: 12.5 % at every k.
    """
    positive = np.asarray(candidate_positive, dtype=bool)  # (N, C)
    category = np.asarray(query_category, dtype=np.int64)  # (Q,)
    n_candidates = positive.shape[0]
    relevant = positive[:, category].sum(axis=0)  # (Q,)
    cutoffs = tuple(int(k) for k in ks)
    for k in cutoffs:
        _check_k(k, n_candidates)
    precision = np.array(
        [expected_random_precision(int(r), n_candidates) for r in relevant], dtype=np.float64
    )  # (Q,)
    per_query = {precision_key(k): precision.copy() for k in cutoffs}
    per_query[MAP] = np.array(
        [expected_random_average_precision(int(r), n_candidates) for r in relevant],
        dtype=np.float64,
    )  # (Q,)
    return _aggregate(tuple(categories), cutoffs, category, per_query)


def _aggregate(
    categories: tuple[str, ...],
    ks: tuple[int, ...],
    query_category: IntArray,
    per_query: dict[str, FloatArray],
) -> RetrievalScores:
    per_category = {
        m: category_means(v, query_category, len(categories)) for m, v in per_query.items()
    }
    mean = {
        m: float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan
        for m, v in per_category.items()
    }
    return RetrievalScores(
        categories=categories,
        ks=ks,
        query_category=query_category,
        per_query=per_query,
        per_category=per_category,
        mean=mean,
    )


def _check_k(k: int, n_candidates: int) -> None:
    if not 1 <= k <= n_candidates:
        raise EvaluationError(
            f"k={k} is outside [1, {n_candidates}] (the number of candidates)",
            code="k_out_of_range",
        )


def _check_counts(n_relevant: int, n_candidates: int) -> None:
    if n_candidates < 1 or not 0 <= n_relevant <= n_candidates:
        raise EvaluationError(
            f"need 0 ≤ relevant ({n_relevant}) ≤ candidates ({n_candidates}) and candidates ≥ 1"
        )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)
