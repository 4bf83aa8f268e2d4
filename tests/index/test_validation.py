"""Bad inputs are refused with typed errors and leave the index untouched."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from index import (
    MAX_K,
    IndexConfigError,
    IndexStateError,
    InvalidInputError,
    VectorIndex,
    VectorIndexError,
    l2_normalize,
)
from tests.index.oracle import clustered

DIM = 16


@pytest.fixture
def populated() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = clustered(rng, 50, DIM)
    ids = np.arange(100, 150, dtype=np.int64)
    index = VectorIndex.build("Flat", DIM, "model-a")
    index.add(ids, x)
    return index, ids, x


def _unit(n: int, seed: int = 1) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, DIM)))


def _with_nan() -> np.ndarray:
    x = _unit(3)
    x[1, 4] = np.nan
    return x


def _with_inf() -> np.ndarray:
    x = _unit(3)
    x[2, 0] = np.inf
    return x


BAD_VECTORS: list[tuple[str, Any, str]] = [
    ("int dtype", np.ones((2, DIM), dtype=np.int32), "bad_dtype"),
    ("object dtype", np.array([["a"] * DIM, ["b"] * DIM], dtype=object), "bad_dtype"),
    ("1-D", _unit(1)[0], "bad_shape"),
    ("3-D", _unit(4).reshape(2, 2, DIM), "bad_shape"),
    ("wrong dim", l2_normalize(np.ones((2, DIM + 1))), "dim_mismatch"),
    ("NaN", _with_nan(), "non_finite"),
    ("inf", _with_inf(), "non_finite"),
    ("not unit", 2.0 * _unit(2), "not_normalized"),
    ("zero row", np.vstack([_unit(1), np.zeros((1, DIM))]).astype(np.float32), "not_normalized"),
]


@pytest.mark.parametrize(
    ("vectors", "code"), [(v, c) for _, v, c in BAD_VECTORS], ids=[n for n, _, _ in BAD_VECTORS]
)
def test_bad_vectors_are_refused_by_add_and_search(populated, vectors, code) -> None:
    index, ids, _ = populated
    n = len(vectors) if np.ndim(vectors) == 2 else 1
    with pytest.raises(InvalidInputError) as caught:
        index.add(np.arange(1000, 1000 + n), vectors)
    assert caught.value.code == code
    with pytest.raises(InvalidInputError) as caught:
        index.search(vectors, 3)
    assert caught.value.code == code
    assert index.ntotal == len(ids)
    np.testing.assert_array_equal(index.ids(), ids)


BAD_IDS: list[tuple[str, Any, str]] = [
    ("float ids", np.array([1.0, 2.0]), "bad_dtype"),
    ("bool ids", np.array([True, False]), "bad_dtype"),
    ("2-D ids", np.array([[1, 2]]), "bad_shape"),
    ("negative id", np.array([5, -1]), "bad_id"),
    ("too large for int64", np.array([1, 2**63], dtype=np.uint64), "bad_id"),
    ("count mismatch", np.array([1, 2, 3]), "bad_shape"),
    ("repeated in batch", np.array([7, 7]), "duplicate_id"),
    ("already present", np.array([149, 1000]), "duplicate_id"),
]


@pytest.mark.parametrize(
    ("bad_ids", "code"), [(i, c) for _, i, c in BAD_IDS], ids=[n for n, _, _ in BAD_IDS]
)
def test_bad_ids_are_refused_and_nothing_is_added(populated, bad_ids, code) -> None:
    index, ids, x = populated
    with pytest.raises(InvalidInputError) as caught:
        index.add(bad_ids, _unit(2))
    assert caught.value.code == code
    np.testing.assert_array_equal(index.ids(), ids)
    # The index still answers exactly as before the refused call.
    _, found = index.search(x[:5], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:5])


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, True, "3"])
def test_k_out_of_range(populated, k) -> None:
    index, _, x = populated
    with pytest.raises(InvalidInputError) as caught:
        index.search(x[:1], k)
    assert caught.value.code == "k_out_of_range"


@pytest.mark.parametrize("params", [{"nprobe": 0}, {"ef_search": -3}, {"nprobe": 1.5}])
def test_bad_search_params(params) -> None:
    index = VectorIndex.build("IVF4,Flat", DIM, "m")
    with pytest.raises(InvalidInputError) as caught:
        index.search(_unit(1), 1, **params)
    assert caught.value.code == "bad_search_param"


def test_accepted_inputs_are_converted() -> None:
    index = VectorIndex.build("Flat", DIM, "m")
    x64 = _unit(6).astype(np.float64)
    # float64, a strided (non-contiguous) view and uint32 ids are all fine.
    index.add(np.arange(6, dtype=np.uint32), x64)
    strided = np.asfortranarray(x64)
    scores, found = index.search(strided, 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(6))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.add([], np.empty((0, DIM), dtype=np.float32)) == 0
    scores, found = index.search(np.empty((0, DIM), dtype=np.float32), 4)
    assert scores.shape == found.shape == (0, 4)


def test_slightly_off_unit_norm_is_within_tolerance() -> None:
    index = VectorIndex.build("Flat", DIM, "m")
    # float16 round-trips shift norms by ~1e-4: still a unit vector for the index.
    x = _unit(4).astype(np.float16).astype(np.float32)
    index.add(np.arange(4), x)
    assert index.ntotal == 4


@pytest.mark.parametrize(
    ("factory", "dim", "code"),
    [
        ("NoSuchIndex", DIM, "bad_factory"),
        ("", DIM, "bad_factory"),
        ("IDMap,Flat", DIM, "unsupported_factory"),
        ("PCA8,Flat", DIM, "unsupported_factory"),
        ("IVF4,Flat,RFlat", DIM, "unsupported_factory"),
        ("Flat", 0, "bad_dim"),
    ],
)
def test_bad_factory(factory, dim, code) -> None:
    with pytest.raises(IndexConfigError) as caught:
        VectorIndex.build(factory, dim, "m")
    assert caught.value.code == code


def test_training_rules() -> None:
    index = VectorIndex.build("IVF8,Flat", DIM, "m")
    assert not index.is_trained
    with pytest.raises(IndexStateError) as caught:
        index.add(np.arange(3), _unit(3))
    assert caught.value.code == "not_trained"
    with pytest.raises(IndexStateError) as caught:
        index.train(_unit(5))
    assert caught.value.code == "too_few_training_vectors"
    index.train(clustered(np.random.default_rng(3), 400, DIM))
    with pytest.raises(IndexStateError) as caught:
        index.train(_unit(50))
    assert caught.value.code == "already_trained"
    assert index.add(np.arange(3), _unit(3)) == 3


def test_errors_are_typed_with_stable_codes() -> None:
    for cls in (InvalidInputError, IndexConfigError, IndexStateError):
        assert issubclass(cls, VectorIndexError)
        assert not issubclass(cls, IndexError)
    err = InvalidInputError("boom", code="bad_id")
    assert err.code == "bad_id"
    assert err.message == "boom"


def test_index_package_imports_neither_model_nor_app() -> None:
    code = (
        "import sys, index\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'app'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
