"""The 8x200-style protocol drawn from any labelled corpus (a manifest or stored images).

Eligible images have exactly one positive label (1) among the chosen categories, the
same rule as the official candidates. Per category, the eligible images are shuffled
with a generator seeded by ``seed`` and the category's name, the first Q become query
images and the next N candidates, so queries and candidates are disjoint, and a
category's draw depends only on the seed and its own eligible images. Candidates are
listed category by category (in the given category order), each category's in drawn
order; the text task ranks the same candidates.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.evaluation.errors import ProtocolError
from model.evaluation.protocol import (
    ImageQuery,
    ProtocolImage,
    RetrievalProtocol,
    TextQuery,
    labelled_positive,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImage:
    """An image of a corpus: its path (absolute or relative to the image root) and labels."""

    path: str
    labels: Mapping[str, float | None]
    where: str


def _category_rng(seed: int, category: str) -> np.random.Generator:
    digest = hashlib.sha256(category.encode("utf-8")).digest()
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest[:8], "little")])


def _check_request(chosen: tuple[str, ...], candidates: int, queries: int) -> None:
    if not chosen:
        raise ProtocolError("choose at least one category", code="protocol_file_invalid")
    if len(set(chosen)) != len(chosen):
        raise ProtocolError(f"categories repeat: {', '.join(chosen)}", code="protocol_file_invalid")
    if candidates < 1 or queries < 1:
        raise ProtocolError(
            "candidates and queries per category must be at least 1",
            code="protocol_file_invalid",
        )


def _eligible_by_category(
    images: Sequence[LabelledImage], chosen: tuple[str, ...]
) -> dict[str, list[LabelledImage]]:
    """Each category's images with exactly one positive label among ``chosen`` (a path once)."""
    by_category: dict[str, list[LabelledImage]] = {category: [] for category in chosen}
    seen: set[str] = set()
    for image in images:
        positive = labelled_positive(image.labels, chosen)
        if len(positive) != 1 or image.path in seen:
            continue
        seen.add(image.path)
        by_category[positive[0]].append(image)
    return by_category


def sample_protocol(
    images: Sequence[LabelledImage],
    categories: Sequence[str],
    *,
    candidates_per_category: int,
    queries_per_category: int,
    seed: int,
    text_queries: Sequence[TextQuery],
    name: str = "manifest",
    params: Mapping[str, object] | None = None,
) -> RetrievalProtocol:
    """Draw candidates and query images per category from ``images``.

    Raises :class:`ProtocolError` when a category has fewer than
    ``candidates_per_category + queries_per_category`` eligible images
    (``not_enough_images``), when categories repeat, or when a text query names a
    category outside ``categories`` (``category_absent``).
    """
    chosen = tuple(categories)
    _check_request(chosen, candidates_per_category, queries_per_category)
    by_category = _eligible_by_category(images, chosen)
    needed = candidates_per_category + queries_per_category
    short = {c: len(found) for c, found in by_category.items() if len(found) < needed}
    if short:
        detail = ", ".join(f"{c}: {count}" for c, count in short.items())
        raise ProtocolError(
            f"not enough images with exactly one positive label among the categories: need "
            f"{needed} per category ({candidates_per_category} candidates + "
            f"{queries_per_category} queries), found {detail}",
            code="not_enough_images",
        )
    for query in text_queries:
        if query.category not in by_category:
            raise ProtocolError(
                f"{query.where}: category {query.category!r} is not one of the chosen "
                f"categories ({', '.join(chosen)})",
                code="category_absent",
            )
    candidates: list[ProtocolImage] = []
    queries: list[ImageQuery] = []
    for category in chosen:
        pool = by_category[category]
        order = _category_rng(seed, category).permutation(len(pool))
        picked = [pool[i] for i in order[:needed]]
        queries.extend(
            ImageQuery(category=category, path=img.path, where=img.where)
            for img in picked[:queries_per_category]
        )
        candidates.extend(
            ProtocolImage(path=img.path, labels=dict(img.labels), where=img.where)
            for img in picked[queries_per_category:]
        )
    logger.info(
        "sampled %d candidates and %d query images over %d categories (seed %d) from %d images",
        len(candidates),
        len(queries),
        len(chosen),
        seed,
        len(images),
    )
    described: dict[str, object] = {
        "categories": list(chosen),
        "candidates_per_category": candidates_per_category,
        "queries_per_category": queries_per_category,
        "seed": seed,
        "eligible_per_category": {k: len(v) for k, v in by_category.items()},
    }
    described.update(params or {})
    return RetrievalProtocol(
        name=name,
        categories=chosen,
        image_candidates=tuple(candidates),
        image_queries=tuple(queries),
        text_candidates=tuple(candidates),
        text_queries=tuple(text_queries),
        params=dict(described),
    )


def manifest_images(path: str) -> list[LabelledImage]:
    """The labelled images of a paired manifest (:mod:`model.data.manifest`), absolute paths."""
    from model.data.manifest import read_manifest

    return [
        LabelledImage(
            path=str(record.image_path),
            labels=dict(record.labels),
            where=f"{path} record {number} ({record.image_path.name})",
        )
        for number, record in enumerate(read_manifest(path), 1)
    ]
