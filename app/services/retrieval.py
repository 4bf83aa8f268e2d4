"""Retrieval: a query vector → ranked hits from the index, checked against the database.

Filters (view position, label values) are evaluated by the database, which knows the
metadata; the index knows only vectors. Two strategies, chosen by how many images pass the
filter, and both return up to ``k`` hits that *all* satisfy it:

- few matches (≤ :data:`EXACT_SUBSET_MAX`): their vectors are read from the embeddings
  table and scored exactly; no index involved, nothing can be missed;
- many matches: the index is asked for more than ``k`` hits, in proportion to how rare the
  matches are, and the non-matching ones are dropped; if fewer than ``k`` remain the
  request is doubled until either ``k`` hits are found or the whole index was returned
  (past the index's largest answer, :data:`index.MAX_K`, the filter is finished exactly).

Index ids that have no row any more (an image deleted between the index search and the
lookup) are skipped, so a hit always names a stored image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Embedding, Image, bytes_to_vector
from app.services.live_index import LiveIndex
from app.services.metrics import Metrics
from index import MAX_K

#: Up to this many filter matches are scored exactly from the database.
EXACT_SUBSET_MAX: Final = 4096
#: Least over-fetch factor when filtering through the index.
OVERFETCH_MIN: Final = 4
#: Stored vectors read from the database per step of an exact search.
EXACT_CHUNK: Final = 4096


@dataclass(frozen=True)
class Filters:
    """Conditions a hit must satisfy; None means no condition."""

    view_positions: tuple[str, ...] | None = None
    labels: Mapping[str, float] | None = None

    @property
    def active(self) -> bool:
        return bool(self.view_positions) or bool(self.labels)


@dataclass(frozen=True)
class Hit:
    image_id: int
    score: float
    view_position: str | None
    labels: dict[str, Any] | None
    study_ref: str | None
    study_instance_uid: str | None


class RetrievalService:
    """Searches of one model's vectors; synchronous (the API runs it in worker threads)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        index: LiveIndex,
        metrics: Metrics,
        model_id: str,
    ) -> None:
        self.sessions = sessions
        self.index = index
        self.metrics = metrics
        self.model_id = model_id

    def stored_vector(self, image_id: int) -> npt.NDArray[np.float32] | None:
        """The current model's (D,) vector of a stored image, or None when it has none."""
        with self.metrics.stage("database"), self.sessions() as session:
            row = session.get(Embedding, (image_id, self.model_id))
            return None if row is None else row.as_array()

    def image_exists(self, image_id: int) -> bool:
        with self.metrics.stage("database"), self.sessions() as session:
            return session.get(Image, image_id) is not None

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        *,
        filters: Filters | None = None,
        exclude_id: int | None = None,
    ) -> list[Hit]:
        """Up to ``k`` hits for a (D,) query vector, best first."""
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)  # (1, D)
        if filters is not None and filters.active:
            return self._search_filtered(query, k, filters, exclude_id)
        return self._search_index(query, k, allowed=None, exclude_id=exclude_id)

    # -- strategies --------------------------------------------------------------------

    def _search_filtered(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        filters: Filters,
        exclude_id: int | None,
    ) -> list[Hit]:
        with self.metrics.stage("database"), self.sessions() as session:
            allowed = {int(i) for i in session.scalars(self._filtered_ids(filters))}
        if exclude_id is not None:
            allowed.discard(exclude_id)
        if not allowed:
            return []
        if len(allowed) <= EXACT_SUBSET_MAX:
            return self._search_exact(query, k, allowed)
        return self._search_index(query, k, allowed=allowed, exclude_id=exclude_id)

    def _filtered_ids(self, filters: Filters) -> Select[Any]:
        """Ids of the images with a current-model embedding that satisfy ``filters``."""
        stmt = select(Embedding.image_id).where(Embedding.model_id == self.model_id)
        if filters.view_positions or filters.labels:
            stmt = stmt.join(Image, Image.id == Embedding.image_id)
        if filters.view_positions:
            wanted = [v.upper() for v in filters.view_positions]
            stmt = stmt.where(func.upper(Image.view_position).in_(wanted))
        for name, value in (filters.labels or {}).items():
            # JSON_EXTRACT on SQLite, ->> on PostgreSQL; a missing or null label never matches.
            stmt = stmt.where(Image.labels[name].as_float() == float(value))
        return stmt

    def _search_exact(
        self, query: npt.NDArray[np.float32], k: int, allowed: Iterable[int]
    ) -> list[Hit]:
        """Score the ``allowed`` images' stored vectors exactly, in chunks; top ``k``."""
        ids_wanted = sorted(allowed)
        best_ids = np.zeros(0, dtype=np.int64)  # (≤k,)
        best_scores = np.zeros(0, dtype=np.float32)  # (≤k,)
        for start in range(0, len(ids_wanted), EXACT_CHUNK):
            chunk = ids_wanted[start : start + EXACT_CHUNK]
            with self.metrics.stage("database"), self.sessions() as session:
                rows = session.execute(
                    select(Embedding.image_id, Embedding.dim, Embedding.vector).where(
                        Embedding.model_id == self.model_id, Embedding.image_id.in_(chunk)
                    )
                ).all()
            if not rows:
                continue
            with self.metrics.stage("search"):
                ids = np.asarray([int(r[0]) for r in rows], dtype=np.int64)  # (M,)
                matrix = np.stack([bytes_to_vector(r[2], int(r[1])) for r in rows])  # (M, D)
                ids = np.concatenate([best_ids, ids])  # (≤k+M,)
                scores = np.concatenate([best_scores, matrix @ query[0]])  # (≤k+M,)
                # Ties broken by id so that results are stable from call to call.
                order = np.lexsort((ids, -scores))[:k]
                best_ids, best_scores = ids[order], scores[order]
        return self._hits(best_ids.tolist(), best_scores.tolist(), k=k)

    def _search_index(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        *,
        allowed: set[int] | None,
        exclude_id: int | None,
    ) -> list[Hit]:
        total = self.index.ntotal
        if total == 0:
            return []
        extra = 1 if exclude_id is not None else 0
        if allowed is None:
            fetch = k + extra
        else:
            # Expected hits per fetched vector is len(allowed) / total: ask for enough to
            # find k of them, with margin, and double while short.
            ratio = total / max(len(allowed), 1)
            fetch = max(k * OVERFETCH_MIN, math.ceil(k * ratio * 2)) + extra
        while True:
            fetch = min(fetch, total, MAX_K)
            with self.metrics.stage("search"):
                scores, ids = self.index.search(query, fetch)  # (1, fetch), (1, fetch)
            found_ids: list[int] = []
            found_scores: list[float] = []
            for score, image_id in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
                if image_id < 0 or image_id == exclude_id:
                    continue
                if allowed is not None and image_id not in allowed:
                    continue
                found_ids.append(int(image_id))
                found_scores.append(float(score))
            hits = self._hits(found_ids, found_scores, k=k)
            if len(hits) >= k or fetch >= total:
                return hits
            if fetch >= MAX_K:
                # The index answers at most MAX_K per query: finish the filter exactly.
                return self._search_exact(query, k, allowed) if allowed is not None else hits
            # Short because of the filter or of rows deleted since indexing: widen and retry.
            fetch *= 2

    def _hits(self, ids: Sequence[int], scores: Sequence[float], *, k: int) -> list[Hit]:
        """Join ranked ids with their rows, dropping ids without a row; at most ``k``."""
        if not ids:
            return []
        with self.metrics.stage("database"), self.sessions() as session:
            rows = {
                int(r[0]): r
                for r in session.execute(
                    select(
                        Image.id,
                        Image.view_position,
                        Image.labels,
                        Image.study_ref,
                        Image.study_instance_uid,
                    ).where(Image.id.in_(list(ids)))
                ).all()
            }
        hits: list[Hit] = []
        for image_id, score in zip(ids, scores, strict=True):
            row = rows.get(image_id)
            if row is None:
                continue
            hits.append(Hit(image_id, score, row[1], row[2], row[3], row[4]))
            if len(hits) == k:
                break
        return hits
