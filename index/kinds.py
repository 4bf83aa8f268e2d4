"""The three kinds of FAISS index the wrapper supports, built from a factory string.

The kind decides how ids are kept (``IndexIDMap`` for flat codes, the inverted lists for
IVF, the wrapper's own slot table for HNSW) and which per-call search parameter applies.
"""

from __future__ import annotations

from typing import Any, Literal

import faiss
import numpy as np

from index.checks import IdArray
from index.errors import IndexConfigError, IndexCorruptError

Kind = Literal["flat", "hnsw", "ivf"]

DEFAULT_FACTORY = "Flat"
#: Default IVF lists probed per query; per-call ``nprobe`` overrides it.
DEFAULT_NPROBE = 32
#: Default HNSW candidate-list size per query; per-call ``ef_search`` overrides it.
DEFAULT_EF_SEARCH = 128


def make_faiss_index(factory: str, dim: int) -> tuple[faiss.Index, Kind]:
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


def kind_of(index: faiss.Index) -> Kind:
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


def ivf_ids(ivf: Any) -> IdArray:
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
