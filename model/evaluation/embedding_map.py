"""2-D maps of embeddings for the report's figure: PCA, or a small exact t-SNE in numpy.

The t-SNE is the plain O(N²) method of van der Maaten & Hinton (2008): Gaussian input
affinities calibrated by binary search to a perplexity, a Student-t output kernel, early
exaggeration and gradient descent with momentum and per-parameter gains. It is meant for
the report's few thousand points (1,600 candidates: about 0.1 s per iteration on one busy
core), not for large sets. Both maps are deterministic for a given seed.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from model.evaluation.errors import EvaluationError

FloatArray = npt.NDArray[np.float64]
MAP_METHODS: Final[tuple[str, ...]] = ("pca", "tsne")
#: Largest point count the dense t-SNE accepts (memory grows as N²).
TSNE_MAX_POINTS: Final = 5000


def pca_2d(points: npt.ArrayLike) -> FloatArray:
    """Project (N, D) points on their first two principal components → float64 (N, 2).

    Each component's sign is fixed so that its largest-magnitude loading is positive,
    which makes the map reproducible across BLAS builds.
    """
    x = _points(points)  # (N, D)
    centred = x - x.mean(axis=0, keepdims=True)  # (N, D)
    components = _principal_axes(centred, 2)  # (2, D)
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])  # (2,)
    signs[signs == 0] = 1.0
    return centred @ (components * signs[:, None]).T  # (N, 2)


def _principal_axes(centred: FloatArray, count: int) -> FloatArray:
    """The ``count`` leading principal axes (count, D) of centred (N, D) points.

    An eigendecomposition of the D × D covariance rather than an SVD of the data: it is
    several times cheaper for N ≫ D and the axes are the same up to sign.
    """
    covariance = centred.T @ centred  # (D, D)
    _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues; columns are axes
    axes = vectors[:, ::-1][:, :count].T  # (min(count, D), D)
    if axes.shape[0] < count:
        axes = np.vstack([axes, np.zeros((count - axes.shape[0], centred.shape[1]))])
    return axes


def _points(points: npt.ArrayLike) -> FloatArray:
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise EvaluationError(f"a map needs an (N ≥ 2, D) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise EvaluationError("cannot map NaN or infinite embeddings", code="non_finite_scores")
    return x


def _squared_distances(x: FloatArray) -> FloatArray:
    sq = np.sum(x * x, axis=1)  # (N,)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)  # (N, N)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def _affinities(distances: FloatArray, perplexity: float) -> FloatArray:
    """Symmetric joint probabilities P (N, N) with each row's conditional at ``perplexity``."""
    n = distances.shape[0]
    target = np.log(perplexity)
    beta = np.ones(n)  # (N,) precision of each point's Gaussian
    low = np.full(n, -np.inf)
    high = np.full(n, np.inf)
    off_diagonal = ~np.eye(n, dtype=bool)
    # Vectorised bisection over all rows at once: 64 halvings reach float precision.
    for _ in range(64):
        logits = -distances * beta[:, None]  # (N, N)
        logits[~off_diagonal] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)  # (N, N)
        total = weights.sum(axis=1)  # (N,)
        cond = weights / total[:, None]  # (N, N)
        entropy = np.log(total) + beta * np.sum(distances * cond, axis=1)  # (N,)
        # Shift by the row's max made logits relative; entropy needs the absolute scale.
        entropy -= beta * np.min(np.where(off_diagonal, distances, np.inf), axis=1)
        too_flat = entropy > target
        low = np.where(too_flat, beta, low)
        high = np.where(too_flat, high, beta)
        beta = np.where(
            too_flat,
            np.where(np.isinf(high), beta * 2.0, (beta + high) / 2.0),
            np.where(np.isinf(low), beta / 2.0, (beta + low) / 2.0),
        )
    joint = cond + cond.T  # (N, N)
    return np.maximum(joint / joint.sum(), 1e-12)


def tsne_2d(
    points: npt.ArrayLike,
    *,
    perplexity: float = 30.0,
    iterations: int = 300,
    seed: int = 0,
    learning_rate: float | None = None,
) -> FloatArray:
    """Exact t-SNE of (N, D) points → float64 (N, 2).

    ``perplexity`` is clipped to (N − 1) / 3; ``learning_rate`` defaults to max(N / 12, 50).
    Inputs are PCA-reduced to at most 50 dimensions first, as is customary.
    """
    x = _points(points)  # (N, D)
    n = x.shape[0]
    if n > TSNE_MAX_POINTS:
        raise EvaluationError(f"t-SNE here is exact (N²); {n} points exceed {TSNE_MAX_POINTS}")
    if iterations < 1:
        raise EvaluationError("t-SNE needs at least one iteration")
    centred = x - x.mean(axis=0, keepdims=True)
    if centred.shape[1] > 50:
        centred = centred @ _principal_axes(centred, 50).T  # (N, 50)
    distances = _squared_distances(centred)  # (N, N)
    scale = np.median(distances[~np.eye(n, dtype=bool)]) if n > 1 else 1.0
    distances = distances / max(float(scale), 1e-12)
    p = _affinities(distances, min(perplexity, max((n - 1) / 3.0, 1.0)))  # (N, N)
    rate = learning_rate if learning_rate is not None else max(n / 12.0, 50.0)
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1e-4, size=(n, 2))  # (N, 2)
    velocity = np.zeros_like(y)
    gains = np.ones_like(y)
    exaggeration_until = min(250, iterations // 4)
    for step in range(iterations):
        exaggeration = 12.0 if step < exaggeration_until else 1.0
        momentum = 0.5 if step < exaggeration_until else 0.8
        kernel = 1.0 / (1.0 + _squared_distances(y))  # (N, N)
        np.fill_diagonal(kernel, 0.0)
        q = np.maximum(kernel / kernel.sum(), 1e-12)  # (N, N)
        w = (exaggeration * p - q) * kernel  # (N, N)
        gradient = 4.0 * (w.sum(axis=1)[:, None] * y - w @ y)  # (N, 2)
        same_sign = np.sign(gradient) == np.sign(velocity)
        gains = np.where(same_sign, gains * 0.8, gains + 0.2)
        np.maximum(gains, 0.01, out=gains)
        velocity = momentum * velocity - rate * gains * gradient
        y = y + velocity
        y -= y.mean(axis=0, keepdims=True)
    return y


def embedding_map(points: npt.ArrayLike, method: str = "pca", *, seed: int = 0) -> FloatArray:
    """(N, D) → float64 (N, 2) by ``method`` (``"pca"`` or ``"tsne"``)."""
    if method == "pca":
        return pca_2d(points)
    if method == "tsne":
        return tsne_2d(points, seed=seed)
    raise EvaluationError(f"unknown map method {method!r}; expected one of {MAP_METHODS}")
