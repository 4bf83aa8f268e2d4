"""Image vectors of labelled records for the classification protocols, cached by content.

:func:`embed_records` hashes each file, takes what the
:class:`~model.evaluation.cache.EmbeddingCache` holds and decodes and encodes the rest,
with the retrieval runner's :func:`~model.evaluation.runner.hash_files` and
:func:`~model.evaluation.runner.embed_images`, for several feature spaces at once.
:class:`BundleBackbone` gives a bundle's *trained* backbone features (the projection
head's input), the features the linear probe fits on.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from model.evaluation.cache import EmbeddingCache
from model.evaluation.errors import EvaluationError
from model.evaluation.labelled import LabelledRecord
from model.evaluation.runner import (
    EmbeddingStats,
    ProgressCallback,
    embed_images,
    hash_files,
)

if TYPE_CHECKING:
    from model.bundle import EncoderBundle

FloatArray = npt.NDArray[np.float32]
#: ``encode(decoded images, batch size) -> float32 (b, D)``.
EncodeFn = Callable[[Sequence[np.ndarray], int], FloatArray]


@dataclass(frozen=True)
class FeatureSpace:
    """A named way to turn images into vectors, and the key its vectors are cached under."""

    cache_key: str
    encode: EncodeFn
    description: Mapping[str, Any]


def embed_records(
    records: Sequence[LabelledRecord],
    spaces: Mapping[str, FeatureSpace],
    *,
    cache: EmbeddingCache | None,
    batch_size: int,
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> tuple[dict[str, FloatArray], dict[str, EmbeddingStats]]:
    """space name → float32 (len(records), D_space), rows in ``records`` order."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be positive, got {batch_size}")
    paths = [r.path for r in records]
    where: dict[str, str] = {}
    for record in records:
        where.setdefault(record.path, record.where)
    hashes = hash_files(paths, None, where, progress, cancel)
    return embed_images(
        {name: space.encode for name, space in spaces.items()},
        paths,
        hashes,
        root=None,
        where=where,
        spaces={name: space.cache_key for name, space in spaces.items()},
        cache=cache,
        batch_size=batch_size,
        progress=progress,
        cancel=cancel,
    )


class BundleBackbone:
    """Pooled features of a bundle's trained image backbone, before the projection head.

    Rows are L2-normalised, like the baseline backbone's, so the two feature spaces differ
    only in their weights.
    """

    def __init__(self, bundle: EncoderBundle) -> None:
        self.bundle = bundle
        text = f"{bundle.model_id}/image-backbone-pooled"
        self.feature_id = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.description: dict[str, Any] = {
            "tower": bundle.config.get("towers", {}).get("image"),
            "weights": "trained",
            "model_id": bundle.model_id,
        }

    def image_backbone_features(
        self, images: Sequence[np.ndarray], *, batch_size: int = 32, normalize: bool = True
    ) -> FloatArray:
        """Decoded float32 (H, W) radiographs → float32 (N, F) pooled features."""
        from model.convirt import ConVIRT

        chunks: list[FloatArray] = []
        model = self.bundle.model
        if not isinstance(model, ConVIRT):
            raise EvaluationError(
                f"{self.bundle.name} is an imported model: it has no backbone features of its own",
                code="backbone_unavailable",
            )
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = self.bundle.preprocessing.stack(images[start : start + batch_size])
                features = model.image_backbone_features(batch.to(self.bundle.device))  # (b, F)
                features = features.float()
                if normalize:
                    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                chunks.append(features.cpu().numpy())
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)  # (N, F)
