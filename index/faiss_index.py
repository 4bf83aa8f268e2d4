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
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn

import faiss
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from index.errors import (
    IndexConfigError,
    IndexCorruptError,
    IndexFileError,
    IndexMismatchError,
    IndexStateError,
    InvalidInputError,
)
from index.manifest import MANIFEST_NAME, METRIC, IndexManifest
from index.rwlock import ReadWriteLock

logger = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivf"]
FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

DEFAULT_FACTORY = "Flat"
#: Default IVF lists probed per query; per-call ``nprobe`` overrides it.
DEFAULT_NPROBE = 32
#: Default HNSW candidate-list size per query; per-call ``ef_search`` overrides it.
DEFAULT_EF_SEARCH = 128
#: Largest ``k`` a search accepts.
MAX_K = 4096
#: Largest allowed ``|‖x‖² − 1|`` for a vector to count as L2-normalised.
NORM_TOLERANCE = 1e-3
#: ``rebuild`` trains IVF on this many vectors per inverted list (FAISS wants ≥ 39).
TRAIN_POINTS_PER_LIST = 64
#: Training sample for kinds whose encoder is trained without lists (PQ/SQ storage).
DEFAULT_TRAIN_SAMPLE = 65_536
#: HNSW graphs are rebuilt once dead slots exceed this share of the stored vectors.
COMPACT_RATIO = 0.2
#: Vectors reconstructed per step while compacting a graph.
_COMPACT_CHUNK = 65_536
_ID_MAX = np.iinfo(np.int64).max
#: Distinct per-call parameter values whose FAISS parameter objects are kept.
_PARAMS_CACHE_SIZE = 64


def l2_normalize(vectors: npt.ArrayLike) -> FloatArray:
    """Return ``vectors`` (N, D) as float32 rows of unit L2 norm; zero rows stay zero."""
    x = np.asarray(vectors, dtype=np.float32)  # (N, D)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # (N, D)


def _check_vectors(vectors: npt.ArrayLike, dim: int, what: str) -> FloatArray:
    """Validate (N, dim) unit vectors and return them as C-contiguous float32.

    This runs on every search, so the common case costs a handful of NumPy calls; the
    diagnosis of what is wrong runs only on failure.
    """
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.dtype.kind != "f":
        raise InvalidInputError(
            f"{what} must be floating point, got dtype {arr.dtype}", code="bad_dtype"
        )
    if arr.ndim != 2:
        raise InvalidInputError(
            f"{what} must be a 2-D array (N, {dim}), got shape {arr.shape}", code="bad_shape"
        )
    if arr.shape[1] != dim:
        raise InvalidInputError(
            f"{what} have dimension {arr.shape[1]}, the index has {dim}", code="dim_mismatch"
        )
    x = arr
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, dim)
    # NaN or ±inf makes a squared norm non-finite and every comparison below false, so the
    # norm test covers finiteness too.
    if x.shape[0] == 1:
        # np.dot on two 1-D rows skips the ufunc machinery: ~0.5 µs against ~5-10 µs for
        # einsum or a reduction, which matters on the single-query path.
        row_sq = float(np.dot(x[0], x[0]))
        ok = abs(row_sq - 1.0) <= NORM_TOLERANCE
    elif x.shape[0] == 0:
        ok = True
    else:
        sq = np.einsum("ij,ij->i", x, x)  # (N,)
        ok = bool(sq.min() >= 1.0 - NORM_TOLERANCE) and bool(sq.max() <= 1.0 + NORM_TOLERANCE)
    if not ok:
        _raise_vector_error(x, what)
    return x


def _raise_vector_error(x: FloatArray, what: str) -> NoReturn:
    finite = np.isfinite(x).all(axis=1)  # (N,)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(f"{what} row {row} has NaN or inf", code="non_finite")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)  # (N,)
    row = int(np.argmax(np.abs(norms**2 - 1.0)))
    raise InvalidInputError(
        f"{what} row {row} has L2 norm {float(norms[row]):.6f}, expected 1 "
        "(the index stores L2-normalised vectors; see index.l2_normalize)",
        code="not_normalized",
    )


def _check_ids(ids: npt.ArrayLike) -> IdArray:
    """Validate a 1-D array of non-negative integer ids and return it as int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"ids must be 1-D, got shape {arr.shape}", code="bad_shape")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"ids must be integers, got dtype {arr.dtype}", code="bad_dtype")
    if arr.dtype.kind == "u" and int(arr.max()) > _ID_MAX:
        raise InvalidInputError("ids must fit in int64", code="bad_id")
    out = arr.astype(np.int64, copy=False)
    if int(out.min()) < 0:
        # -1 pads missing results, so negative ids would be ambiguous.
        raise InvalidInputError("ids must be non-negative", code="bad_id")
    return out


def _check_positive_int(value: object, name: str, code: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}", code=code)
    number = int(value)
    if number < 1 or (upper is not None and number > upper):
        bound = f"1..{upper}" if upper is not None else ">= 1"
        raise InvalidInputError(f"{name} must be in {bound}, got {number}", code=code)
    return number


def _make_faiss_index(factory: str, dim: int) -> tuple[faiss.Index, Kind]:
    """Build the empty FAISS index for ``factory`` and say which kind it is."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise IndexConfigError(f"dim must be a positive integer, got {dim!r}", code="bad_dim")
    if not isinstance(factory, str) or not factory.strip():
        raise IndexConfigError("the factory string is empty", code="bad_factory")
    if "IDMap" in factory:
        raise IndexConfigError(
            f"factory {factory!r}: leave out IDMap, the index maps ids itself",
            code="unsupported_factory",
        )
    try:
        raw = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexConfigError(
            f"FAISS cannot build factory {factory!r}: {exc}", code="bad_factory"
        ) from exc
    # index_factory already returns the most derived class and owns the C++ object;
    # downcast_index would hand back a non-owning proxy that dangles once ``raw`` is freed.
    inner = raw
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = DEFAULT_EF_SEARCH
        return inner, "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(DEFAULT_NPROBE, inner.nlist)
        return inner, "ivf"
    if isinstance(inner, faiss.IndexFlatCodes):
        # IndexIDMap (not IDMap2: no reverse map needed) keeps database ids; Flat removal
        # shifts positions and IndexIDMap compacts its id table to match.
        return faiss.IndexIDMap(inner), "flat"
    raise IndexConfigError(
        f"factory {factory!r} builds {type(inner).__name__}; supported are flat codes "
        "(Flat, SQ8, PQ…), HNSW… and IVF… indexes",
        code="unsupported_factory",
    )


def _kind_of(index: faiss.Index) -> Kind:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    if isinstance(index, faiss.IndexIDMap) and isinstance(
        faiss.downcast_index(index.index), faiss.IndexFlatCodes
    ):
        return "flat"
    raise IndexCorruptError(
        f"the saved index is a {type(index).__name__}, which this package never writes",
        code="content_mismatch",
    )


def _ivf_ids(ivf: Any) -> IdArray:
    """All ids stored in the inverted lists of ``ivf``, in list order."""
    invlists: Any = ivf.invlists
    parts: list[IdArray] = []
    for list_no in range(ivf.nlist):
        size = int(invlists.list_size(list_no))
        if size == 0:
            continue
        ptr = invlists.get_ids(list_no)
        try:
            parts.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64, copy=True))
        finally:
            invlists.release_ids(list_no, ptr)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        return self._file.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_hashed(
    directory: Path, stem: str, suffix: str, write: Callable[[_HashingWriter], None]
) -> tuple[str, str]:
    """Write a file durably under a content-derived name; return (name, "sha256:<hex>")."""
    tmp = directory / f".{stem}-{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        digest = writer.sha256.hexdigest()
        name = f"{stem}-{digest[:16]}{suffix}"
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name, f"sha256:{digest}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _verify_file(path: Path, checksum: str) -> None:
    try:
        actual = _sha256_file(path)
    except FileNotFoundError as exc:
        raise IndexCorruptError(f"{path} is missing", code="file_missing") from exc
    except OSError as exc:
        raise IndexCorruptError(f"{path} cannot be read: {exc}", code="file_missing") from exc
    if actual != checksum:
        raise IndexCorruptError(
            f"{path} has {actual}, the manifest says {checksum}: torn or altered file",
            code="checksum_mismatch",
        )


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
            live = _ivf_ids(raw)
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
        raw, kind = _make_faiss_index(factory, dim)
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
                _check_positive_int(train_sample, "train_sample", "bad_train_sample")
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
        ids64 = _check_ids(ids)
        x = _check_vectors(vectors, self._dim, "vectors")
        if ids64.size != x.shape[0]:
            raise InvalidInputError(f"{ids64.size} ids for {x.shape[0]} vectors", code="bad_shape")
        return ids64, x

    def train(self, vectors: npt.ArrayLike) -> None:
        """Train the quantiser of an IVF/PQ/SQ index on (N, dim) unit vectors."""
        x = _check_vectors(vectors, self._dim, "training vectors")
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
        wanted = np.unique(_check_ids(ids))
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
        fresh: Any = _make_faiss_index(self._factory, self._dim)[0]
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
        q = _check_vectors(queries, self._dim, "queries")
        k = _check_positive_int(k, "k", "k_out_of_range", MAX_K)
        if nprobe is not None:
            nprobe = _check_positive_int(nprobe, "nprobe", "bad_search_param")
        if ef_search is not None:
            ef_search = _check_positive_int(ef_search, "ef_search", "bad_search_param")
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
                index = self._index

                def write_index(writer: _HashingWriter) -> None:
                    # PyCallbackIOWriter is missing from faiss's bundled stubs.
                    callback = faiss.PyCallbackIOWriter(writer.write)  # type: ignore[attr-defined]
                    faiss.write_index(index, callback)

                index_file, checksum = _write_hashed(path, "index", ".faiss", write_index)
                labels_file = labels_checksum = None
                if self._labels is not None:
                    labels = self._labels[:-1]

                    def write_labels(writer: _HashingWriter) -> None:
                        np.save(writer, labels, allow_pickle=False)

                    labels_file, labels_checksum = _write_hashed(
                        path, "labels", ".npy", write_labels
                    )
                manifest = IndexManifest(
                    model_id=self._model_id,
                    dim=self._dim,
                    metric=METRIC,
                    factory=self._factory,
                    kind=self._kind,
                    count=self.ntotal,
                    checksum=checksum,
                    faiss_version=faiss.__version__,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    index_file=index_file,
                    labels_file=labels_file,
                    labels_checksum=labels_checksum,
                )
                _write_text_atomic(path / MANIFEST_NAME, manifest.to_json())
                _fsync_dir(path)
                self._manifest = manifest
                # Still under the mutex, so a concurrent save's temporary files are safe.
                self._remove_stale_files(path, keep={index_file, labels_file})
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

    @staticmethod
    def _remove_stale_files(path: Path, keep: set[str | None]) -> None:
        for pattern in ("index-*.faiss", "labels-*.npy", ".index-*.tmp", ".labels-*.tmp"):
            for stale in path.glob(pattern):
                if stale.name not in keep:
                    try:
                        stale.unlink()
                    except OSError as exc:
                        # The new save is committed already; a leftover file only costs space.
                        logger.warning("cannot delete stale index file %s: %s", stale, exc)

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
        try:
            text = (path / MANIFEST_NAME).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise IndexCorruptError(
                f"no {MANIFEST_NAME} in {path}", code="manifest_missing"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise IndexCorruptError(
                f"cannot read {path / MANIFEST_NAME}: {exc}", code="manifest_invalid"
            ) from exc
        manifest = IndexManifest.from_json(text)
        if expected_model_id is not None and manifest.model_id != expected_model_id:
            raise IndexMismatchError(
                f"index at {path} was built for model {manifest.model_id!r}, "
                f"expected {expected_model_id!r}",
                code="model_mismatch",
            )
        if expected_dim is not None and manifest.dim != expected_dim:
            raise IndexMismatchError(
                f"index at {path} holds {manifest.dim}-d vectors, expected {expected_dim}",
                code="dim_mismatch",
            )
        # Checksums first: FAISS must never parse bytes that might be torn or tampered with.
        _verify_file(path / manifest.index_file, manifest.checksum)
        labels: IdArray | None = None
        if manifest.labels_file is not None:
            if manifest.labels_checksum is None:
                raise IndexCorruptError("labels file without a checksum", code="manifest_invalid")
            _verify_file(path / manifest.labels_file, manifest.labels_checksum)
            try:
                labels = np.load(path / manifest.labels_file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise IndexCorruptError(
                    f"cannot read the labels: {exc}", code="content_mismatch"
                ) from exc
        try:
            # read_index returns the most derived class already (and owns it).
            raw = faiss.read_index(str(path / manifest.index_file))
        except RuntimeError as exc:
            raise IndexCorruptError(
                f"FAISS cannot read {manifest.index_file}: {exc}", code="content_mismatch"
            ) from exc
        kind = _kind_of(raw)
        problems: list[str] = []
        if kind != manifest.kind:
            problems.append(f"kind {kind} != {manifest.kind}")
        if raw.d != manifest.dim:
            problems.append(f"dim {raw.d} != {manifest.dim}")
        if raw.metric_type != faiss.METRIC_INNER_PRODUCT:
            problems.append("metric is not inner product")
        if kind == "hnsw":
            if labels is None or labels.dtype != np.int64 or labels.shape != (raw.ntotal,):
                problems.append("HNSW labels missing or not one int64 per stored vector")
        elif labels is not None:
            problems.append(f"labels file for a {kind} index")
        if problems:
            raise IndexCorruptError(
                f"index at {path} does not match its manifest: {'; '.join(problems)}",
                code="content_mismatch",
            )
        index = cls(
            raw,
            kind=kind,
            factory=manifest.factory,
            model_id=manifest.model_id,
            labels=labels,
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
