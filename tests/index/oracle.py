"""Test data and the exact-search oracle (``faiss.IndexFlatIP``) for the index tests."""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt

from index import l2_normalize

Floats = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 16) -> Floats:
    """(n, dim) unit vectors drawn around ``clusters`` random centres."""
    centres = rng.standard_normal((clusters, dim))  # (C, D)
    members = rng.integers(0, clusters, size=n)  # (n,)
    x = centres[members] + 0.35 * rng.standard_normal((n, dim))  # (n, D)
    return l2_normalize(x)


def sparse_ids(rng: np.random.Generator, n: int) -> Ids:
    """``n`` distinct ids spread over the whole int64 range, in no particular order."""
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)
    ids[0] = 2**63 - 1  # the largest id a database could hand out
    return ids


def exact_topk(vectors: Floats, ids: Ids, queries: Floats, k: int) -> tuple[Floats, Ids]:
    """The oracle: exact inner-product top-k over (ids, vectors) with IndexFlatIP."""
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(ids):
        flat.add_with_ids(vectors, ids)
    return flat.search(queries, k)


def assert_exact(
    scores: Floats,
    found: Ids,
    vectors: Floats,
    ids: Ids,
    queries: Floats,
    k: int,
    atol: float = 1e-5,
) -> None:
    """Assert ``(scores, found)`` are an exact top-k of ``queries`` over (ids, vectors).

    Ties are tolerated: the scores must equal the oracle's, and each returned id must be a
    live id whose own similarity equals the score reported for it, but among vectors with
    equal similarity any id may be returned.
    """
    want_scores, _ = exact_topk(vectors, ids, queries, k)
    assert scores.shape == found.shape == (queries.shape[0], k)
    assert scores.dtype == np.float32
    assert found.dtype == np.int64
    live = min(k, len(ids))
    np.testing.assert_allclose(scores[:, :live], want_scores[:, :live], atol=atol)
    assert (found[:, live:] == -1).all()
    assert np.isneginf(scores[:, live:]).all()
    position = {int(i): row for row, i in enumerate(ids)}
    for q, row_scores, row_ids in zip(queries, scores, found[:, :live], strict=True):
        assert len(set(row_ids.tolist())) == live, "an id was returned twice"
        own = np.array([vectors[position[int(i)]] @ q for i in row_ids])
        np.testing.assert_allclose(row_scores[:live], own, atol=atol)


def recall(found: Ids, truth: Ids) -> float:
    """Mean share of the true top-k ids that ``found`` contains."""
    hits = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)
