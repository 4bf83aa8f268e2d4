"""The vector index: FAISS behind database ids, per-call search parameters and safe updates.

``VectorIndex`` stores L2-normalised float32 embeddings (the encoder bundle's 512-d output)
under int64 ids (the database's image ids) and answers ``search(queries, k)`` with inner
product, which on unit vectors is cosine similarity. It knows vectors and ids only.

Kinds
-----
The kind follows from the FAISS factory string (``faiss.index_factory`` syntax, metric
inner product); the settings carry that string.

- ``"Flat"`` (default) — exact search, 2 KiB per 512-d vector, no training. The oracle.
- ``"HNSW32"`` (or ``HNSW32,SQ8`` …) — a graph; no training, fast single queries,
  ~2.3 KiB a vector, slow to build, removal by tombstones (below).
- ``"IVF{nlist},Flat"`` / ``"IVF{nlist},SQ8"`` / ``"IVF{nlist},PQ{m}np"`` — inverted lists
  over k-means cells; needs a training step (``train``, or ``rebuild``'s sample), removes
  natively; SQ8 stores 1 byte a dimension, PQ ``m`` bytes a vector. Write PQ with the
  ``np`` suffix: FAISS's default polysemous training costs minutes and only serves
  Hamming-filtered search, which this index never uses.

When to switch
--------------
Measured by ``tests/benchmarks/bench_index.py`` (clustered 512-d data, two shared CPU
cores, single queries on one thread; recall@10 against Flat):

==========  ============  ========================  ==============  ===============
N           Flat query    HNSW32 (ef_search 128)    IVF √N,Flat     build
==========  ============  ========================  ==============  ===============
10k         0.9 ms        0.31 ms, recall 1.00      nprobe 16: 0.95  HNSW 7 s
100k        29 ms         0.35 ms, recall 1.00      nprobe 8: 0.96   HNSW 87 s
1M          226 ms        0.56 ms, recall 0.97      nprobe 8: 0.99   HNSW 16 min,
                                                    (1.3 ms)         IVF 27 s
==========  ============  ========================  ==============  ===============

- Up to ~50k vectors keep ``Flat``: exact, nothing to train or tune, and a query stays
  around a few milliseconds; at 100k a query reads 200 MB (~30 ms), which is the point
  to switch for interactive search.
- From ~100k to a few million, when ~2.3 KiB a vector fits in memory and a rebuild may
  take minutes (~1,000 vectors/s on two cores), use ``HNSW32``: ``ef_search`` 64 gives
  recall@10 0.95 at 1M and 128 gives 0.97, 560× and 400× faster than a Flat query.
- When HNSW builds are too slow (frequent rebuilds) or beyond a few million vectors, use
  ``IVF{nlist},Flat`` with ``nlist`` between √N and 4·√N (1M built in 27 s; nprobe 8–16
  reached recall@10 0.99 there); ``IVF{nlist},SQ8`` cuts memory 4× (522 B a vector,
  recall@10 0.97 at nprobe 8). ``PQ64np`` (80 B a vector) reached only 0.59–0.79 recall@10
  on this data, so use it only with a re-ranking step outside the index. Retrain (rebuild)
  an IVF index when the collection has grown several-fold since it was trained.

Search parameters
-----------------
``nprobe`` (IVF) and ``ef_search`` (HNSW) are passed per call and travel to FAISS in a
``SearchParametersIVF``/``SearchParametersHNSW`` object; the shared index is never
mutated inside a request. Their defaults (``DEFAULT_NPROBE``, ``DEFAULT_EF_SEARCH``) are
set once when the index is built and are saved with it. A parameter that does not apply
to the kind is ignored so that one settings object serves every kind.

Normalisation
-------------
Vectors and queries are *verified*, not normalised: a row whose squared norm is off 1 by
more than ``NORM_TOLERANCE`` is refused (``not_normalized``). The encoders already emit
unit vectors, so a non-unit row means a bug upstream that silent normalisation would hide;
``l2_normalize`` is there for callers with raw vectors.

Removal
-------
Flat and IVF remove natively. FAISS HNSW cannot remove, so for HNSW the wrapper keeps its
own position→id table: a removed vector's slot is marked dead and excluded during the graph
search by an ``IDSelectorBitmap`` (so no over-fetch is needed, and a removed id can be
added again at once under a new slot). Dead slots still cost memory and graph hops, so
when they pass ``COMPACT_RATIO`` of the stored vectors ``remove`` rebuilds the graph from
the live vectors; ``compact()`` forces it.

Concurrency
-----------
A readers–writer lock (``index.rwlock``), not copy-on-write: a copy of a million 512-d
vectors is 2 GB per update. Searches share the read side and run in parallel (FAISS
releases the GIL); ``add``, ``remove`` and ``train`` hold the write side for the whole call,
so a search sees each call entirely or not at all, and waits for at most the call in
progress — keep update batches modest (≈1k vectors for HNSW) to bound that wait.
``save`` and the graph rebuild of ``compact`` hold only a writer mutex: searches go on,
other updates wait. ``rebuild`` returns a new object; the caller swaps its reference.

Persistence
-----------
``save(dir)`` writes ``index-<sha>.faiss`` (and ``labels-<sha>.npy`` for HNSW) to a
temporary file, fsyncs it and renames it, then atomically replaces ``manifest.json``
(model id, dim, metric, factory, count, sha256, FAISS version, creation time) and fsyncs
the directory; older data files are deleted afterwards. The manifest is the commit point,
so a crash leaves the previous save intact. ``load(dir)`` checks the manifest, the
expected model id and dimension, and the sha256 of every file before FAISS parses it, and
raises an ``IndexFileError`` on any mismatch so the caller rebuilds from the database.
One process writes a given directory at a time.

Modules
-------
This module holds ``VectorIndex``; ``index.checks`` validates vectors, ids and integers,
``index.kinds`` builds the FAISS index for a factory string, ``index.storage`` writes and
verifies the files, ``index.manifest`` describes them and ``index.rwlock`` is the lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from index.checks import (
    MAX_K,
    FloatArray,
    IdArray,
    check_ids,
    check_positive_int,
    check_vectors,
)
from index.errors import (
    IndexConfigError,
    IndexCorruptError,
    IndexFileError,
    IndexStateError,
    InvalidInputError,
)
from index.kinds import DEFAULT_FACTORY, Kind, ivf_ids, make_faiss_index
from index.manifest import METRIC, IndexManifest
from index.rwlock import ReadWriteLock
from index.storage import commit_manifest, read_saved, write_data_files

logger = logging.getLogger(__name__)

#: ``rebuild`` trains IVF on this many vectors per inverted list (FAISS wants ≥ 39).
TRAIN_POINTS_PER_LIST = 64
#: Training sample for kinds whose encoder is trained without lists (PQ/SQ storage).
DEFAULT_TRAIN_SAMPLE = 65_536
#: HNSW graphs are rebuilt once dead slots exceed this share of the stored vectors.
COMPACT_RATIO = 0.2
#: Vectors reconstructed per step while compacting a graph.
_COMPACT_CHUNK = 65_536
#: Distinct per-call parameter values whose FAISS parameter objects are kept.
_PARAMS_CACHE_SIZE = 64


class VectorIndex:
    """L2-normalised vectors under int64 ids, searched by inner product.

    Build one with :meth:`build`, :meth:`rebuild` or :meth:`load`; every method is safe to
    call from several threads (see the module docstring for the locking rules).
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        *,
        kind: Kind,
        factory: str,
        model_id: str,
        labels: IdArray | None = None,
        manifest: IndexManifest | None = None,
    ) -> None:
        """Wrap a FAISS index; callers use :meth:`build`, :meth:`rebuild` or :meth:`load`.

        ``labels`` (HNSW only) maps each stored slot to its id, -1 for a removed slot.
        """
        # IndexIDMap, IndexIVF… or IndexHNSW… by kind; faiss's stubs cannot follow that
        # downcast, so the attribute is untyped.
        raw: Any = faiss_index
        self._index: Any = raw
        self._kind: Kind = kind
        self._factory = factory
        self._model_id = model_id
        self._dim = int(faiss_index.d)
        self._manifest = manifest
        self._lock = ReadWriteLock()
        # Serialises writers (and save/compact) without blocking searches.
        self._write_mutex = threading.Lock()
        self._labels: IdArray | None = None
        self._selector: Any = None
        self._params_cache: dict[int, Any] = {}
        self._dead = 0
        if kind == "hnsw":
            stored = labels if labels is not None else np.empty(0, dtype=np.int64)
            # A trailing -1 lets ``labels[I]`` map FAISS's -1 padding to -1 in one gather.
            self._labels = np.concatenate([stored, np.array([-1], dtype=np.int64)])
            live = stored[stored >= 0]
            self._dead = int(stored.size - live.size)
            self._refresh_selector()
        elif kind == "flat":
            live = faiss.vector_to_array(raw.id_map).astype(np.int64, copy=False)
        else:
            live = ivf_ids(raw)
        self._live: IdArray = np.sort(live)
        if self._live.size > 1 and bool((self._live[1:] == self._live[:-1]).any()):
            raise IndexCorruptError("the index holds an id twice", code="content_mismatch")

    # ---------------------------------------------------------------- construction

    @classmethod
    def build(
        cls, factory: str = DEFAULT_FACTORY, dim: int = 512, model_id: str = ""
    ) -> VectorIndex:
        """An empty index of ``factory`` for ``dim``-d vectors of the model ``model_id``.

        IVF and PQ kinds must be trained (:meth:`train`) before vectors are added;
        :meth:`rebuild` does that itself.
        """
        if not isinstance(model_id, str):
            raise IndexConfigError(
                f"model_id must be a string, got {model_id!r}", code="bad_model_id"
            )
        raw, kind = make_faiss_index(factory, dim)
        return cls(raw, kind=kind, factory=factory, model_id=model_id)

    @classmethod
    def rebuild(
        cls,
        batches: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]],
        *,
        factory: str = DEFAULT_FACTORY,
        dim: int = 512,
        model_id: str = "",
        progress: bool = True,
        train_sample: int | None = None,
        total: int | None = None,
    ) -> VectorIndex:
        """A new index filled from ``batches`` of ``(ids (B,), vectors (B, dim))``.

        The iterator is consumed once, batch by batch, so only one batch is held besides
        the index — except for kinds that need training, which first buffer
        ``train_sample`` vectors (default: ``TRAIN_POINTS_PER_LIST`` per IVF list, else
        ``DEFAULT_TRAIN_SAMPLE``), train on them and then add them. The sample is the head
        of the stream, so feed batches in an order that does not sort by content.
        ``total`` (vector count, if known) sizes the progress bar.
        """
        index = cls.build(factory, dim, model_id)
        started = time.perf_counter()
        need: int | None = None
        if not index.is_trained:
            need = (
                check_positive_int(train_sample, "train_sample", "bad_train_sample")
                if train_sample is not None
                else index._default_train_sample()
            )
        pending: list[tuple[IdArray, FloatArray]] = []
        buffered = 0
        with tqdm(total=total, unit="vec", desc="index rebuild", disable=not progress) as bar:
            for batch_ids, batch_vectors in batches:
                if need is None:
                    bar.update(index.add(batch_ids, batch_vectors))
                    continue
                ids64, x = index._check_batch(batch_ids, batch_vectors)
                pending.append((ids64, x))
                buffered += ids64.size
                if buffered >= need:
                    index._train_on(pending, need)
                    for ids64, x in pending:
                        bar.update(index.add(ids64, x))
                    pending, need = [], None
            if need is not None and buffered > 0:
                index._train_on(pending, buffered)
                for ids64, x in pending:
                    bar.update(index.add(ids64, x))
        logger.info(
            "rebuilt %s index: %d vectors in %.1f s",
            factory,
            index.ntotal,
            time.perf_counter() - started,
        )
        return index

    def _default_train_sample(self) -> int:
        if self._kind == "ivf":
            return TRAIN_POINTS_PER_LIST * int(self._index.nlist)
        return DEFAULT_TRAIN_SAMPLE

    def _train_on(self, pending: list[tuple[IdArray, FloatArray]], count: int) -> None:
        sample = np.concatenate([x for _, x in pending])[:count]  # (count, D)
        self.train(sample)

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> Kind:
        """``"flat"``, ``"hnsw"`` or ``"ivf"``, from the factory string."""
        return self._kind

    @property
    def factory(self) -> str:
        return self._factory

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def ntotal(self) -> int:
        """Number of live (searchable) vectors."""
        return int(self._live.size)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def tombstones(self) -> int:
        """Removed HNSW slots still held in the graph (0 for the other kinds)."""
        return self._dead

    @property
    def manifest(self) -> IndexManifest | None:
        """The manifest of the last :meth:`save` or :meth:`load`, ``None`` before either."""
        return self._manifest

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (IndexIDMap, IndexIVF… or IndexHNSW… by kind).

        For read-only inspection and benchmarks.

        Labels of an HNSW index are slots, not ids; never mutate it.
        """
        return self._index

    def contains(self, id_: int) -> bool:
        """Whether ``id_`` is in the index (a follower skips records it already applied)."""
        with self._lock.read():
            pos = int(np.searchsorted(self._live, id_))
            return pos < self._live.size and int(self._live[pos]) == id_

    def ids(self) -> IdArray:
        """The live ids, sorted, as a new (N,) int64 array."""
        with self._lock.read():
            return self._live.copy()

    def __repr__(self) -> str:
        return (
            f"VectorIndex(factory={self._factory!r}, dim={self._dim}, ntotal={self.ntotal}, "
            f"model_id={self._model_id!r})"
        )

    # ---------------------------------------------------------------------- updates

    def _check_batch(
        self, ids: npt.ArrayLike, vectors: npt.ArrayLike
    ) -> tuple[IdArray, FloatArray]:
        ids64 = check_ids(ids)
        x = check_vectors(vectors, self._dim, "vectors")
        if ids64.size != x.shape[0]:
            raise InvalidInputError(f"{ids64.size} ids for {x.shape[0]} vectors", code="bad_shape")
        return ids64, x

    def train(self, vectors: npt.ArrayLike) -> None:
        """Train the quantiser of an IVF/PQ/SQ index on (N, dim) unit vectors."""
        x = check_vectors(vectors, self._dim, "training vectors")
        if self._kind == "ivf" and x.shape[0] < int(self._index.nlist):
            raise IndexStateError(
                f"{x.shape[0]} training vectors for {self._index.nlist} IVF lists",
                code="too_few_training_vectors",
            )
        with self._write_mutex, self._lock.write():
            if self._index.is_trained:
                raise IndexStateError(f"{self._factory} is already trained", code="already_trained")
            started = time.perf_counter()
            try:
                self._index.train(x)
            except RuntimeError as exc:
                raise IndexStateError(f"training failed: {exc}", code="train_failed") from exc
        logger.info(
            "trained %s on %d vectors in %.1f s",
            self._factory,
            x.shape[0],
            time.perf_counter() - started,
        )

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> int:
        """Add (N, dim) unit ``vectors`` under ``ids`` (N,); all or nothing. Returns N.

        An id already in the index, or repeated in ``ids``, is refused (``duplicate_id``).
        """
        ids64, x = self._check_batch(ids, vectors)
        if ids64.size == 0:
            return 0
        order = np.argsort(ids64, kind="stable")
        sorted_ids = ids64[order]
        repeated = sorted_ids[1:] == sorted_ids[:-1]
        if repeated.any():
            dup = int(sorted_ids[1:][repeated][0])
            raise InvalidInputError(f"id {dup} appears twice in the batch", code="duplicate_id")
        with self._write_mutex:
            if not self._index.is_trained:
                raise IndexStateError(
                    f"{self._factory} must be trained before vectors are added", code="not_trained"
                )
            pos = np.searchsorted(self._live, sorted_ids)  # (N,)
            clash = pos < self._live.size
            clash[clash] = self._live[pos[clash]] == sorted_ids[clash]
            if clash.any():
                dup = int(sorted_ids[clash][0])
                raise InvalidInputError(f"id {dup} is already in the index", code="duplicate_id")
            self._lock.acquire_write()
            try:
                try:
                    if self._kind == "hnsw":
                        self._index.add(x)
                    else:
                        self._index.add_with_ids(x, ids64)
                except RuntimeError as exc:
                    raise IndexStateError(f"FAISS add failed: {exc}", code="faiss_error") from exc
                self._live = np.insert(self._live, pos, sorted_ids)
                if self._labels is not None:
                    self._labels = np.concatenate([self._labels[:-1], ids64, self._labels[-1:]])
                    if self._dead:
                        # The bitmap must cover the new slots, or the selector would hide them.
                        self._refresh_selector()
            finally:
                self._lock.release_write()
        return int(ids64.size)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove the vectors of ``ids``; ids not in the index are skipped. Returns how many went.

        For HNSW this may compact the graph (see ``COMPACT_RATIO``), which takes as long as
        a rebuild but does not block searches.
        """
        wanted = np.unique(check_ids(ids))
        if wanted.size == 0:
            return 0
        with self._write_mutex:
            pos = np.searchsorted(self._live, wanted)
            found = pos < self._live.size
            found[found] = self._live[pos[found]] == wanted[found]
            present = wanted[found]
            if present.size == 0:
                return 0
            self._lock.acquire_write()
            try:
                if self._labels is not None:
                    slots = np.flatnonzero(np.isin(self._labels[:-1], present))
                    self._labels[slots] = -1
                    self._dead += int(slots.size)
                    self._refresh_selector()
                else:
                    try:
                        self._index.remove_ids(faiss.IDSelectorBatch(present))
                    except RuntimeError as exc:
                        raise IndexStateError(
                            f"FAISS remove failed: {exc}", code="faiss_error"
                        ) from exc
                self._live = np.delete(self._live, pos[found])
            finally:
                self._lock.release_write()
            if self._labels is not None and self._dead > COMPACT_RATIO * max(self._index.ntotal, 1):
                self._compact_locked()
        return int(present.size)

    def compact(self) -> int:
        """Rebuild an HNSW graph without its removed slots; returns how many were dropped.

        Searches keep running on the old graph meanwhile; other updates wait. Vectors are
        re-added from the graph's own storage (exact for ``HNSW…,Flat``, re-encoded for SQ/PQ
        storage). A no-op for Flat and IVF, which remove natively.
        """
        with self._write_mutex:
            return self._compact_locked()

    def _refresh_selector(self) -> None:
        assert self._labels is not None
        self._params_cache = {}
        if self._dead == 0:
            self._selector = None
            return
        # Bit i (little-endian within each byte) is set when slot i is live; FAISS reads the
        # array through a raw pointer, so the pair keeps it alive as long as the selector.
        bitmap = np.packbits(self._labels[:-1] >= 0, bitorder="little")  # (ceil(S/8),) uint8
        self._selector = (faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), bitmap)

    def _compact_locked(self) -> int:
        """Graph rebuild; the caller holds the writer mutex, searches run on the old graph."""
        if self._labels is None or self._dead == 0:
            return 0
        started = time.perf_counter()
        dropped = self._dead
        live_slots = np.flatnonzero(self._labels[:-1] >= 0)
        fresh: Any = make_faiss_index(self._factory, self._dim)[0]
        fresh.hnsw.efSearch = self._index.hnsw.efSearch
        if not fresh.is_trained:
            take = live_slots[: max(DEFAULT_TRAIN_SAMPLE, 1)]
            fresh.train(self._index.reconstruct_batch(take))
        for start in range(0, live_slots.size, _COMPACT_CHUNK):
            chunk = live_slots[start : start + _COMPACT_CHUNK]
            fresh.add(self._index.reconstruct_batch(chunk))  # (C, D)
        labels = np.concatenate([self._labels[live_slots], np.array([-1], dtype=np.int64)])
        with self._lock.write():
            self._index = fresh
            self._labels = labels
            self._dead = 0
            self._selector = None
            self._params_cache = {}
        logger.info(
            "compacted HNSW graph: dropped %d dead slots, kept %d, in %.1f s",
            dropped,
            live_slots.size,
            time.perf_counter() - started,
        )
        return dropped

    # ----------------------------------------------------------------------- search

    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """The ``k`` most similar vectors to each of the (Q, dim) unit ``queries``.

        Returns ``(scores (Q, k) float32, ids (Q, k) int64)``, best first; a row with fewer
        than ``k`` results is padded with id -1 and score -inf. ``nprobe`` applies to IVF,
        ``ef_search`` to HNSW, for this call only.
        """
        q = check_vectors(queries, self._dim, "queries")
        k = check_positive_int(k, "k", "k_out_of_range", MAX_K)
        if nprobe is not None:
            nprobe = check_positive_int(nprobe, "nprobe", "bad_search_param")
        if ef_search is not None:
            ef_search = check_positive_int(ef_search, "ef_search", "bad_search_param")
        self._lock.acquire_read()
        try:
            if q.shape[0] == 0 or self._index.ntotal == 0:
                scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)  # (Q, k)
                return scores, np.full((q.shape[0], k), -1, dtype=np.int64)
            params = self._search_params(nprobe, ef_search)
            if params is None:
                scores, labels = self._index.search(q, k)  # (Q, k), (Q, k)
            else:
                scores, labels = self._index.search(q, k, params=params)  # (Q, k), (Q, k)
            if self._labels is not None:
                labels = self._labels[labels]  # (Q, k) slots → ids
        finally:
            self._lock.release_read()
        # FAISS sorts results, so padding sits at the end of a row: one column tells (and a
        # scalar read is far cheaper than a reduction for the common single query).
        padded = labels[0, -1] < 0 if labels.shape[0] == 1 else labels[:, -1].min() < 0
        if padded:
            scores[labels < 0] = -np.inf
        return scores, labels

    def _search_params(self, nprobe: int | None, ef_search: int | None) -> Any:
        """The parameter object for this call, or ``None`` when the saved defaults apply.

        FAISS only reads a parameter object, so one object per value is cached and shared
        by concurrent searches (building one costs several microseconds); the cache is
        replaced whenever the removal selector changes.
        """
        if self._kind == "ivf":
            if nprobe is None:
                return None
            value = min(nprobe, int(self._index.nlist))
        elif self._kind == "hnsw":
            if ef_search is None and self._selector is None:
                return None
            value = ef_search if ef_search is not None else int(self._index.hnsw.efSearch)
        else:
            return None
        cache = self._params_cache
        params = cache.get(value)
        if params is None:
            if self._kind == "ivf":
                params = faiss.SearchParametersIVF()
                params.nprobe = value
            else:
                # SearchParametersHNSW is missing from faiss's bundled stubs.
                params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
                params.efSearch = value
                if self._selector is not None:
                    params.sel = self._selector[0]
            if len(cache) >= _PARAMS_CACHE_SIZE:
                cache.clear()
            cache[value] = params
        return params

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> IndexManifest:
        """Write the index to ``directory`` atomically; returns the manifest written.

        Searches continue while it writes; updates wait.
        """
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with self._write_mutex:
                started = time.perf_counter()
                labels = self._labels[:-1] if self._labels is not None else None
                files = write_data_files(path, self._index, labels)
                manifest = IndexManifest(
                    model_id=self._model_id,
                    dim=self._dim,
                    metric=METRIC,
                    factory=self._factory,
                    kind=self._kind,
                    count=self.ntotal,
                    checksum=files.checksum,
                    faiss_version=faiss.__version__,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    index_file=files.index_file,
                    labels_file=files.labels_file,
                    labels_checksum=files.labels_checksum,
                )
                commit_manifest(path, manifest)
                self._manifest = manifest
        except (OSError, RuntimeError) as exc:
            raise IndexFileError(
                f"cannot save the index to {path}: {exc}", code="save_failed"
            ) from exc
        logger.info(
            "saved %s index (%d vectors) to %s in %.1f s",
            self._factory,
            manifest.count,
            path,
            time.perf_counter() - started,
        )
        return manifest

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_model_id: str | None = None,
        expected_dim: int | None = None,
    ) -> VectorIndex:
        """Load a saved index after checking its manifest and checksums.

        Raises :class:`IndexMismatchError` when the index belongs to another model or
        dimension, :class:`IndexCorruptError` when a file is missing, torn or altered; in
        both cases the caller rebuilds from the database.
        """
        path = Path(directory)
        started = time.perf_counter()
        saved = read_saved(path, expected_model_id=expected_model_id, expected_dim=expected_dim)
        manifest = saved.manifest
        index = cls(
            saved.faiss_index,
            kind=saved.kind,
            factory=manifest.factory,
            model_id=manifest.model_id,
            labels=saved.labels,
            manifest=manifest,
        )
        if index.ntotal != manifest.count:
            raise IndexCorruptError(
                f"index at {path} holds {index.ntotal} vectors, the manifest says {manifest.count}",
                code="content_mismatch",
            )
        logger.info(
            "loaded %s index (%d vectors) from %s in %.1f s",
            manifest.factory,
            index.ntotal,
            path,
            time.perf_counter() - started,
        )
        return index
