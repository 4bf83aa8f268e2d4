"""Searches while vectors are added and removed: no errors, no removed ids, no half updates."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from index import VectorIndex, l2_normalize
from index.rwlock import ReadWriteLock
from tests.index.oracle import clustered

DIM = 32
GROUPS = 30
MEMBERS = 8
GROUP_ID0 = 1_000_000


@pytest.mark.parametrize(
    ("factory", "params"),
    [("Flat", {}), ("IVF8,Flat", {"nprobe": 8}), ("HNSW16", {"ef_search": 256})],
)
def test_search_during_adds_and_removes(factory: str, params: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    background = clustered(rng, 600, DIM)
    index = VectorIndex.build(factory, DIM, "m")
    if not index.is_trained:
        index.train(background)
    index.add(np.arange(len(background)), background)

    # Each group is MEMBERS near-copies of its own direction, added in one call and later
    # removed in one call. Querying that direction with k = MEMBERS therefore returns the
    # whole group or none of it — unless a search saw half of an add or a remove.
    directions = l2_normalize(rng.standard_normal((GROUPS, DIM)))  # (G, D)
    groups = [l2_normalize(d + 0.01 * rng.standard_normal((MEMBERS, DIM))) for d in directions]
    group_ids = [GROUP_ID0 + g * MEMBERS + np.arange(MEMBERS) for g in range(GROUPS)]

    removed: list[int] = []  # groups whose remove() has returned
    done = threading.Event()
    errors: list[BaseException] = []
    violations: list[str] = []
    searches = [0]

    def writer() -> None:
        try:
            for g in range(GROUPS):
                index.add(group_ids[g], groups[g])
                time.sleep(0.002)
                if g >= 2:
                    index.remove(group_ids[g - 2])
                    removed.append(g - 2)
                time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def searcher(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            while not done.is_set():
                gone = list(removed)  # removed before this search starts
                picks = local.choice(GROUPS, size=3, replace=False)
                _, found = index.search(directions[picks], MEMBERS, **params)
                searches[0] += 1
                for g, row in zip(picks, found, strict=True):
                    seen = int(np.isin(row, group_ids[g]).sum())
                    if seen not in (0, MEMBERS):
                        violations.append(f"group {g}: {seen} of {MEMBERS} visible")
                returned_groups = set(((found[found >= GROUP_ID0] - GROUP_ID0) // MEMBERS).tolist())
                if returned_groups & set(gone):
                    violations.append(f"removed groups returned: {returned_groups & set(gone)}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not violations, violations[:5]
    assert searches[0] > GROUPS  # the searches really interleaved with the updates
    assert index.ntotal == len(background) + 2 * MEMBERS
    if factory.startswith("HNSW"):
        # 224 removals on 840 stored slots crossed COMPACT_RATIO: a compaction ran mid-way.
        assert index.faiss_index.ntotal < len(background) + GROUPS * MEMBERS


def test_readers_share_the_lock_and_writers_exclude_them() -> None:
    lock = ReadWriteLock()
    both_inside = threading.Barrier(2, timeout=5)

    def reader() -> None:
        with lock.read():
            both_inside.wait()  # only passes if two readers hold the lock together

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=10)
    assert not both_inside.broken

    order: list[str] = []

    def write() -> None:
        lock.acquire_write()
        order.append("w")

    def late_read() -> None:
        lock.acquire_read()
        order.append("r")

    lock.acquire_read()
    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.1)
    # A waiting writer holds back new readers, so a stream of searches cannot starve it.
    late_reader = threading.Thread(target=late_read)
    late_reader.start()
    time.sleep(0.1)
    assert order == []
    lock.release_read()
    writer.join(timeout=5)
    assert order == ["w"]
    lock.release_write()
    late_reader.join(timeout=5)
    assert order == ["w", "r"]
    lock.release_read()
