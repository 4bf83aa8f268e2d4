"""rebuild(): one pass over batches, training from the head of the stream, bounded memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from index import IndexStateError, InvalidInputError, VectorIndex
from tests.index.oracle import assert_exact, clustered, sparse_ids

DIM = 32
K = 8


def _stream(
    ids: np.ndarray, x: np.ndarray, batch: int, consumed: list[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(ids), batch):
        consumed.append(start)
        yield ids[start : start + batch], x[start : start + batch]


@pytest.mark.parametrize(("factory", "params"), [("Flat", {}), ("IVF8,Flat", {"nprobe": 8})])
def test_rebuild_equals_the_oracle(factory: str, params: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    ids, x, queries = sparse_ids(rng, 1000), clustered(rng, 1000, DIM), clustered(rng, 30, DIM)
    consumed: list[int] = []
    index = VectorIndex.rebuild(
        _stream(ids, x, 128, consumed),
        factory=factory,
        dim=DIM,
        model_id="sha256:m",
        progress=False,
        train_sample=300,
    )
    assert consumed == list(range(0, 1000, 128))  # every batch read exactly once
    assert index.ntotal == 1000
    assert index.model_id == "sha256:m"
    assert index.is_trained
    scores, found = index.search(queries, K, **params)
    assert_exact(scores, found, x, ids, queries, K)


def test_rebuild_trains_on_what_it_has_when_the_stream_is_short() -> None:
    rng = np.random.default_rng(1)
    ids, x = np.arange(200), clustered(rng, 200, DIM)
    # The default sample (64 per list) is more than the stream holds: it trains on all 200.
    index = VectorIndex.rebuild(
        _stream(ids, x, 50, []), factory="IVF4,Flat", dim=DIM, progress=False
    )
    assert index.ntotal == 200
    _, found = index.search(x[:20], 1, nprobe=4)
    np.testing.assert_array_equal(found[:, 0], ids[:20])


def test_rebuild_with_too_few_vectors_to_train_fails_cleanly() -> None:
    rng = np.random.default_rng(2)
    x = clustered(rng, 5, DIM)
    with pytest.raises(IndexStateError) as caught:
        VectorIndex.rebuild(
            _stream(np.arange(5), x, 5, []), factory="IVF16,Flat", dim=DIM, progress=False
        )
    assert caught.value.code == "too_few_training_vectors"


def test_rebuild_of_nothing_is_an_empty_index() -> None:
    index = VectorIndex.rebuild(iter([]), factory="Flat", dim=DIM, progress=False)
    assert index.ntotal == 0
    _, found = index.search(clustered(np.random.default_rng(3), 2, DIM), 3)
    assert (found == -1).all()


def test_rebuild_refuses_an_id_seen_in_an_earlier_batch() -> None:
    rng = np.random.default_rng(4)
    x = clustered(rng, 20, DIM)
    batches = iter([(np.arange(10), x[:10]), (np.arange(9, 19), x[10:20])])
    with pytest.raises(InvalidInputError) as caught:
        VectorIndex.rebuild(batches, factory="Flat", dim=DIM, progress=False)
    assert caught.value.code == "duplicate_id"


def test_rebuild_shows_progress(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(5)
    x = clustered(rng, 100, DIM)
    VectorIndex.rebuild(_stream(np.arange(100), x, 25, []), dim=DIM, progress=True, total=100)
    err = capsys.readouterr().err
    assert "index rebuild" in err
    assert "100/100" in err


def test_rebuild_does_not_hold_the_stream_twice() -> None:
    dim, batch, batches = 256, 2000, 16  # 2 MB a batch, 32 MB in all

    def generated() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(6)
        for b in range(batches):
            x = rng.standard_normal((batch, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield np.arange(b * batch, (b + 1) * batch), x

    tracemalloc.start()
    try:
        index = VectorIndex.rebuild(generated(), factory="Flat", dim=dim, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.ntotal == batch * batches
    # FAISS's own copy lives outside Python's allocator; what Python holds at its peak is a
    # few batches and the id table, far below the 32 MB a concatenated copy would need.
    assert peak < 4 * batch * dim * 4, f"peak {peak / 1e6:.1f} MB"
