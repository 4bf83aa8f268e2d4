"""save/load: round trips, manifest, and detection of torn, altered or foreign files."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from index import (
    IndexCorruptError,
    IndexFileError,
    IndexManifest,
    IndexMismatchError,
    VectorIndex,
)
from tests.index.oracle import clustered, sparse_ids

DIM = 24
K = 5


def _populated(factory: str, n: int = 300, seed: int = 0) -> tuple[VectorIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids, x = sparse_ids(rng, n), clustered(rng, n, DIM)
    index = VectorIndex.build(factory, DIM, "sha256:model-a")
    if not index.is_trained:
        index.train(x)
    index.add(ids, x)
    index.remove(ids[::7])
    return index, clustered(rng, 20, DIM)


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4np"])
def test_round_trip_keeps_ids_results_and_removals(tmp_path: Path, factory: str) -> None:
    index, queries = _populated(factory)
    manifest = index.save(tmp_path / "idx")
    loaded = VectorIndex.load(
        tmp_path / "idx", expected_model_id="sha256:model-a", expected_dim=DIM
    )

    np.testing.assert_array_equal(loaded.ids(), index.ids())
    for params in ({}, {"nprobe": 8, "ef_search": 64}):
        want = index.search(queries, K, **params)
        got = loaded.search(queries, K, **params)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert loaded.tombstones == index.tombstones
    assert loaded.manifest == manifest
    assert loaded.factory == factory
    assert loaded.kind == index.kind

    assert manifest.model_id == "sha256:model-a"
    assert manifest.dim == DIM
    assert manifest.metric == "inner_product"
    assert manifest.factory == factory
    assert manifest.count == index.ntotal == 300 - len(range(0, 300, 7))
    assert manifest.checksum.startswith("sha256:")
    assert len(manifest.checksum) == len("sha256:") + 64
    assert manifest.faiss_version == faiss.__version__
    assert datetime.fromisoformat(manifest.created).tzinfo is not None
    on_disk = IndexManifest.from_json((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk == manifest


def test_loaded_index_keeps_working(tmp_path: Path) -> None:
    index, queries = _populated("HNSW16")
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    removed = loaded.ids()[:10]
    loaded.remove(removed)
    loaded.add(np.array([5, 6]), queries[:2])
    _, found = loaded.search(queries[:2], 1, ef_search=64)
    np.testing.assert_array_equal(found[:, 0], [5, 6])
    assert not np.isin(loaded.search(queries, K)[1], removed).any()


def test_save_replaces_the_previous_save_and_cleans_up(tmp_path: Path) -> None:
    index, queries = _populated("HNSW16")
    first = index.save(tmp_path)
    index.add(np.array([1, 2, 3]), queries[:3])
    second = index.save(tmp_path)
    assert first.checksum != second.checksum
    assert _files(tmp_path) == {"manifest.json", second.index_file, second.labels_file}
    assert VectorIndex.load(tmp_path).ntotal == first.count + 3


def test_crash_before_the_manifest_is_replaced_leaves_the_old_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, queries = _populated("Flat")
    old = index.save(tmp_path)
    index.add(np.array([1, 2]), queries[:2])
    real_replace = os.replace

    def dying_replace(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(dst).name == "manifest.json":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(IndexFileError) as caught:
        index.save(tmp_path)
    assert caught.value.code == "save_failed"
    monkeypatch.setattr(os, "replace", real_replace)

    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = VectorIndex.load(tmp_path)
    assert loaded.manifest == old
    assert loaded.ntotal == old.count
    # The next good save removes the orphaned data file of the failed one.
    new = index.save(tmp_path)
    assert _files(tmp_path) == {"manifest.json", new.index_file}


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "append", "delete"])
def test_torn_or_altered_index_file_is_detected(tmp_path: Path, damage: str) -> None:
    index, _ = _populated("Flat")
    manifest = index.save(tmp_path)
    data = tmp_path / manifest.index_file
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "flip":
        _flip_byte(data, data.stat().st_size // 2)
    elif damage == "append":
        data.write_bytes(data.read_bytes() + b"\0")
    else:
        data.unlink()
    with pytest.raises(IndexCorruptError) as caught:
        VectorIndex.load(tmp_path)
    assert caught.value.code == ("file_missing" if damage == "delete" else "checksum_mismatch")


def test_altered_hnsw_labels_are_detected(tmp_path: Path) -> None:
    index, _ = _populated("HNSW16")
    manifest = index.save(tmp_path)
    assert manifest.labels_file is not None
    labels = tmp_path / manifest.labels_file
    _flip_byte(labels, labels.stat().st_size - 3)
    with pytest.raises(IndexCorruptError) as caught:
        VectorIndex.load(tmp_path)
    assert caught.value.code == "checksum_mismatch"


def _edit_manifest(path: Path, **changes: object) -> None:
    raw = json.loads((path / "manifest.json").read_text())
    raw.update(changes)
    (path / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"count": 1}, "content_mismatch"),
        ({"dim": DIM + 1}, "content_mismatch"),
        ({"kind": "ivf"}, "content_mismatch"),
        ({"metric": "l2"}, "manifest_invalid"),
        ({"format_version": 99}, "manifest_invalid"),
        ({"dim": "24"}, "manifest_invalid"),
        ({"count": True}, "manifest_invalid"),
        ({"index_file": "../elsewhere.faiss"}, "manifest_invalid"),
        ({"index_file": "index-0000000000000000.faiss"}, "file_missing"),
        ({"surprise": 1}, "manifest_invalid"),
    ],
)
def test_manifest_that_does_not_describe_the_data_is_refused(
    tmp_path: Path, changes: dict[str, object], code: str
) -> None:
    index, _ = _populated("Flat")
    index.save(tmp_path)
    _edit_manifest(tmp_path, **changes)
    with pytest.raises(IndexCorruptError) as caught:
        VectorIndex.load(tmp_path)
    assert caught.value.code == code


def test_missing_or_torn_manifest(tmp_path: Path) -> None:
    with pytest.raises(IndexCorruptError) as caught:
        VectorIndex.load(tmp_path / "nowhere")
    assert caught.value.code == "manifest_missing"
    index, _ = _populated("Flat")
    index.save(tmp_path)
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(IndexCorruptError) as caught:
        VectorIndex.load(tmp_path)
    assert caught.value.code == "manifest_invalid"


def test_index_of_another_model_or_dimension_is_refused(tmp_path: Path) -> None:
    index, _ = _populated("Flat")
    index.save(tmp_path)
    with pytest.raises(IndexMismatchError) as caught:
        VectorIndex.load(tmp_path, expected_model_id="sha256:model-b")
    assert caught.value.code == "model_mismatch"
    with pytest.raises(IndexMismatchError) as caught:
        VectorIndex.load(tmp_path, expected_dim=512)
    assert caught.value.code == "dim_mismatch"
    # Both are IndexFileError: "rebuild from the database" is one except clause.
    assert issubclass(IndexMismatchError, IndexFileError)
    assert issubclass(IndexCorruptError, IndexFileError)


def test_searches_run_during_save_and_updates_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, queries = _populated("Flat")
    count = index.ntotal
    real_write = faiss.write_index
    searched: list[np.ndarray] = []
    adder = threading.Thread(target=index.add, args=(np.array([1]), queries[:1]))

    def write_while_busy(faiss_index: Any, writer: Any) -> None:
        searcher = threading.Thread(target=lambda: searched.append(index.search(queries, K)[1]))
        searcher.start()
        searcher.join(timeout=10)
        adder.start()
        adder.join(timeout=0.5)
        assert adder.is_alive(), "an add ran in the middle of a save"
        real_write(faiss_index, writer)

    monkeypatch.setattr(faiss, "write_index", write_while_busy)
    manifest = index.save(tmp_path)
    adder.join(timeout=10)
    assert len(searched) == 1, "a search was blocked by save"
    assert manifest.count == count
    assert index.ntotal == count + 1
