"""The vector index: FAISS with ids, atomic save/load and a manifest. No model, no database."""

from index.checks import MAX_K, NORM_TOLERANCE, l2_normalize
from index.errors import (
    IndexConfigError,
    IndexCorruptError,
    IndexFileError,
    IndexMismatchError,
    IndexStateError,
    InvalidInputError,
    VectorIndexError,
)
from index.faiss_index import COMPACT_RATIO, VectorIndex
from index.kinds import DEFAULT_EF_SEARCH, DEFAULT_FACTORY, DEFAULT_NPROBE, Kind
from index.manifest import IndexManifest

__all__ = [
    "COMPACT_RATIO",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_FACTORY",
    "DEFAULT_NPROBE",
    "MAX_K",
    "NORM_TOLERANCE",
    "IndexConfigError",
    "IndexCorruptError",
    "IndexFileError",
    "IndexManifest",
    "IndexMismatchError",
    "IndexStateError",
    "InvalidInputError",
    "Kind",
    "VectorIndex",
    "VectorIndexError",
    "l2_normalize",
]
