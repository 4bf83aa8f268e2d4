"""Embedding cache of the evaluation: vectors keyed by (model id, image content hash).

A second evaluation of the same images under the same model decodes and encodes nothing.
The key is the sha256 of the image file's bytes, so a renamed or moved file still hits and
an edited one misses. :class:`SqliteEmbeddingCache` is the command line's file cache; the
service keeps the same entries in its database (``embedding_cache`` table) behind the same
:class:`EmbeddingCache` protocol.

The backbone-only baseline's vectors are stored under its own ``feature_id``
(:class:`model.evaluation.baseline.InitialBackbone`), shaped like a model id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from model.evaluation.errors import EvaluationError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Default cache file name under a cache directory.
CACHE_FILE: Final = "embedding-cache.sqlite"
# SQLite limits the number of bound parameters per statement (999 in old builds).
_CHUNK: Final = 500


class EmbeddingCache(Protocol):
    """Where evaluation vectors are kept between runs."""

    def get_many(self, model_id: str, content_hashes: Sequence[str]) -> dict[str, FloatArray]:
        """The cached vectors among ``content_hashes``: hash → float32 (dim,)."""
        ...

    def put_many(self, model_id: str, vectors: Mapping[str, FloatArray]) -> None:
        """Store hash → float32 (dim,) vectors, replacing existing entries."""
        ...


def content_hash(data: bytes) -> str:
    """Hex sha256 of an image file's bytes: the cache key next to the model id."""
    return hashlib.sha256(data).hexdigest()


class SqliteEmbeddingCache:
    """An :class:`EmbeddingCache` in one SQLite file (created on first use).

    Safe to share between threads: every call opens its own connection.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._lock:
                if not self._ready:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with closing(sqlite3.connect(self.path)) as connection, connection:
                        connection.execute(
                            "CREATE TABLE IF NOT EXISTS embedding_cache ("
                            " model_id TEXT NOT NULL, content_hash TEXT NOT NULL,"
                            " dim INTEGER NOT NULL, vector BLOB NOT NULL,"
                            " PRIMARY KEY (model_id, content_hash))"
                        )
                    self._ready = True
            with closing(sqlite3.connect(self.path, timeout=30.0)) as connection, connection:
                yield connection
        except sqlite3.DatabaseError as exc:
            raise EvaluationError(
                f"embedding cache {self.path} is unusable: {exc}", code="cache_unusable"
            ) from None

    def get_many(self, model_id: str, content_hashes: Sequence[str]) -> dict[str, FloatArray]:
        wanted = list(dict.fromkeys(content_hashes))
        found: dict[str, FloatArray] = {}
        with self._connect() as connection:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    "SELECT content_hash, dim, vector FROM embedding_cache"
                    f" WHERE model_id = ? AND content_hash IN ({marks})",
                    (model_id, *chunk),
                )
                for key, dim, blob in rows:
                    if len(blob) != 4 * dim:
                        logger.warning("ignoring a malformed cache entry %s/%s", model_id, key)
                        continue
                    found[key] = np.frombuffer(blob, dtype="<f4").astype(np.float32)  # (dim,)
        return found

    def put_many(self, model_id: str, vectors: Mapping[str, FloatArray]) -> None:
        rows = []
        for key, vector in vectors.items():
            array = np.asarray(vector, dtype="<f4").reshape(-1)  # (dim,)
            rows.append((model_id, key, int(array.size), array.tobytes()))
        with self._connect() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO embedding_cache (model_id, content_hash, dim, vector)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
