"""The vector index: FAISS with ids, atomic save/load and a manifest. No model, no database."""

from index.errors import (
    IndexConfigError,
    IndexCorruptError,
    IndexFileError,
    IndexMismatchError,
    IndexStateError,
    InvalidInputError,
    VectorIndexError,
)
from index.faiss_index import (
    COMPACT_RATIO,
    DEFAULT_EF_SEARCH,
    DEFAULT_FACTORY,
    DEFAULT_NPROBE,
    MAX_K,
    NORM_TOLERANCE,
    Kind,
    VectorIndex,
    l2_normalize,
)
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
