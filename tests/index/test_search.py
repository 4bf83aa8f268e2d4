"""Search results against the exact oracle: add, remove, ids, padding, per-call parameters."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, VectorIndex
from tests.index.oracle import assert_exact, clustered, exact_topk, recall, sparse_ids

DIM = 32
K = 10


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return sparse_ids(rng, n), clustered(rng, n, DIM), clustered(rng, 40, DIM)


def _build(factory: str, ids: np.ndarray, x: np.ndarray) -> VectorIndex:
    index = VectorIndex.build(factory, DIM, "model-a")
    if not index.is_trained:
        index.train(x)
    index.add(ids, x)
    return index


# IVF with nprobe = nlist scans every list, which makes it exact: the oracle applies as is.
EXACT_KINDS = [("Flat", {}), ("IVF8,Flat", {"nprobe": 8})]


@pytest.mark.parametrize(("factory", "params"), EXACT_KINDS, ids=["flat", "ivf"])
def test_exact_kinds_match_the_oracle_through_adds_and_removes(factory, params) -> None:
    ids, x, queries = _data(600)
    index = _build(factory, ids[:400], x[:400])
    scores, found = index.search(queries, K, **params)
    assert_exact(scores, found, x[:400], ids[:400], queries, K)

    index.add(ids[400:], x[400:])
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    keep = ~np.isin(ids, gone)
    scores, found = index.search(queries, K, **params)
    assert_exact(scores, found, x[keep], ids[keep], queries, K)
    assert not np.isin(found, gone).any()
    assert index.ntotal == int(keep.sum())
    np.testing.assert_array_equal(index.ids(), np.sort(ids[keep]))


def test_scalar_quantised_flat_scores_are_close_to_exact() -> None:
    ids, x, queries = _data(500)
    index = _build("SQ8", ids, x)
    _, truth = exact_topk(x, ids, queries, K)
    _, found = index.search(queries, K)
    assert recall(found, truth) >= 0.9


def test_hnsw_recall_and_removal_by_tombstones() -> None:
    ids, x, queries = _data(1500, seed=1)
    index = _build("HNSW16", ids, x)
    _, truth = exact_topk(x, ids, queries, K)
    scores, found = index.search(queries, K, ef_search=128)
    assert recall(found, truth) >= 0.97
    # Whatever the graph returns, its scores are the true similarities of those ids.
    lookup = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    for q, row_scores, row_ids in zip(queries, scores, found, strict=True):
        np.testing.assert_allclose(row_scores, [x[lookup[int(i)]] @ q for i in row_ids], atol=1e-5)

    gone = ids[: len(ids) // 10]
    assert index.remove(gone) == len(gone)
    assert index.tombstones == len(gone)
    keep = ~np.isin(ids, gone)
    _, truth = exact_topk(x[keep], ids[keep], queries, K)
    _, found = index.search(queries, K, ef_search=128)
    assert not np.isin(found, gone).any()
    assert recall(found, truth) >= 0.95
    # Default parameters take the same filtered path.
    _, found = index.search(queries, K)
    assert not np.isin(found, gone).any()

    # A removed id can come back at once, with a new vector, before any compaction.
    index.add(gone[:1], x[-1:])
    _, found = index.search(x[-1:], 2, ef_search=64)
    assert set(found[0].tolist()) == {int(gone[0]), int(ids[-1])}


def test_hnsw_compaction_keeps_results_and_drops_dead_slots() -> None:
    ids, x, queries = _data(800, seed=2)
    index = _build("HNSW16", ids, x)
    gone = ids[:100]
    index.remove(gone)
    before = index.search(queries, K, ef_search=256)
    assert index.compact() == 100
    assert index.tombstones == 0
    assert index.faiss_index.ntotal == 700
    after = index.search(queries, K, ef_search=256)
    keep = ~np.isin(ids, gone)
    _, truth = exact_topk(x[keep], ids[keep], queries, K)
    assert recall(after[1], truth) >= 0.97
    assert recall(before[1], truth) >= 0.97
    assert index.compact() == 0


def test_hnsw_compacts_by_itself_past_the_ratio() -> None:
    ids, x, _ = _data(300, seed=3)
    index = _build("HNSW16", ids, x)
    index.remove(ids[:30])
    assert index.tombstones == 30
    index.remove(ids[30:90])  # 90 of 300 stored slots dead: past COMPACT_RATIO (0.2)
    assert index.tombstones == 0
    assert index.faiss_index.ntotal == 210
    _, found = index.search(x[90:100], 1, ef_search=64)
    np.testing.assert_array_equal(found[:, 0], ids[90:100])


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_ids_round_trip(factory) -> None:
    ids, x, _ = _data(200, seed=4)
    index = _build(factory, ids, x)
    _, found = index.search(x, 1, nprobe=4, ef_search=64)
    # Each stored vector finds itself, under its own (sparse, int64-max) id.
    np.testing.assert_array_equal(found[:, 0], ids)
    assert 2**63 - 1 in index.ids()
    assert 12345 not in index.ids()
    index.remove(ids[:5])
    np.testing.assert_array_equal(index.ids(), np.sort(ids[5:]))
    assert index.remove(ids[:5]) == 0  # removing again is a no-op


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_fewer_vectors_than_k_are_padded(factory) -> None:
    ids, x, queries = _data(60, seed=5)
    index = _build(factory, ids, x)
    index.remove(ids[3:])
    scores, found = index.search(queries[:4], 5, nprobe=4, ef_search=64)
    assert_exact(scores, found, x[:3], ids[:3], queries[:4], 5)

    empty = VectorIndex.build(factory, DIM, "m")
    scores, found = empty.search(queries[:2], 3)
    assert (found == -1).all()
    assert np.isneginf(scores).all()


def test_ties_any_of_the_equal_ids_is_accepted() -> None:
    rng = np.random.default_rng(6)
    x = clustered(rng, 20, DIM)
    twins = np.repeat(x[:1], 4, axis=0)  # four identical vectors under four ids
    vectors = np.vstack([twins, x[1:]])
    ids = np.arange(500, 500 + len(vectors), dtype=np.int64)
    index = _build("Flat", ids, vectors)
    scores, found = index.search(x[:1], 2)
    assert set(found[0].tolist()) <= {500, 501, 502, 503}
    np.testing.assert_allclose(scores[0], [1.0, 1.0], atol=1e-5)
    assert_exact(scores, found, vectors, ids, x[:1], 2)


def test_search_parameters_are_per_call_and_never_stored() -> None:
    ids, x, queries = _data(2000, seed=7)
    ivf = _build("IVF32,Flat", ids, x)
    _, truth = exact_topk(x, ids, queries, K)
    narrow = ivf.search(queries, K, nprobe=1)[1]
    wide = ivf.search(queries, K, nprobe=32)[1]
    assert recall(wide, truth) == 1.0
    assert recall(narrow, truth) < recall(wide, truth)
    assert ivf.faiss_index.nprobe == min(DEFAULT_NPROBE, 32)
    np.testing.assert_array_equal(ivf.search(queries, K)[1], ivf.search(queries, K, nprobe=32)[1])

    hnsw = _build("HNSW8", ids, x)
    hnsw.search(queries, K, ef_search=8)
    hnsw.search(queries, K, ef_search=400)
    assert hnsw.faiss_index.hnsw.efSearch == DEFAULT_EF_SEARCH
    # nprobe means nothing to HNSW and ef_search nothing to IVF: ignored, not an error.
    hnsw.search(queries, K, nprobe=3)
    ivf.search(queries, K, ef_search=3)


def test_concurrent_searches_with_different_parameters_do_not_interfere() -> None:
    ids, x, queries = _data(2000, seed=8)
    index = _build("IVF32,Flat", ids, x)
    expected = {p: index.search(queries, K, nprobe=p) for p in (1, 32)}
    failures: list[str] = []

    def worker(nprobe: int) -> None:
        for _ in range(30):
            _, found = index.search(queries, K, nprobe=nprobe)
            if not np.array_equal(found, expected[nprobe][1]):
                failures.append(f"nprobe={nprobe} saw other results")

    threads = [threading.Thread(target=worker, args=(p,)) for p in (1, 32, 1, 32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
