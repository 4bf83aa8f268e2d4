"""Zero-shot classification by prompt ensembles (CheXzero's method) in the shared space.

For each finding of a :class:`~model.prompts.PromptSet`, the positive prompts' embeddings
are averaged and re-normalised, and likewise the negative ones. An image's probability of
the finding is the softmax over its two cosine similarities divided by the model's
temperature τ::

    p = exp(s₊/τ) / (exp(s₊/τ) + exp(s₋/τ)) = sigmoid((s₊ − s₋) / τ)

which is how the contrastive loss itself turned similarities into probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from model.prompts import PromptSet

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


class TextEncoder(Protocol):
    """What prompt embedding needs of an encoder bundle (:class:`model.bundle.EncoderBundle`)."""

    @property
    def model_id(self) -> str: ...

    @property
    def temperature(self) -> float: ...

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = ...) -> FloatArray:
        """float32 (N, D), L2-normalised rows."""
        ...


def _unit(vectors: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True, eq=False)
class PromptClassifier:
    """A prompt set embedded by one model: per finding, the two ensemble directions.

    ``positive`` and ``negative`` are float32 (C, D) unit rows, C = number of findings.
    """

    prompt_set: PromptSet
    model_id: str
    temperature: float
    positive: FloatArray
    negative: FloatArray

    @classmethod
    def build(cls, encoder: TextEncoder, prompt_set: PromptSet) -> PromptClassifier:
        """Embed every prompt of ``prompt_set`` once (one batch) and average per side."""
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (positive start, negative start, end)
        for finding in prompt_set.findings:
            start = len(texts)
            texts.extend(finding.positive)
            middle = len(texts)
            texts.extend(finding.negative)
            spans.append((start, middle, len(texts)))
        embedded = np.asarray(encoder.encode_texts(texts), dtype=np.float64)  # (P, D)
        positive = np.stack([embedded[a:b].mean(axis=0) for a, b, _ in spans])  # (C, D)
        negative = np.stack([embedded[b:c].mean(axis=0) for _, b, c in spans])  # (C, D)
        logger.info(
            "prompt set %s embedded by %s: %d findings, %d prompts",
            prompt_set.key,
            encoder.model_id,
            len(spans),
            len(texts),
        )
        return cls(
            prompt_set=prompt_set,
            model_id=encoder.model_id,
            temperature=float(encoder.temperature),
            positive=_unit(positive).astype(np.float32),
            negative=_unit(negative).astype(np.float32),
        )

    def probabilities(self, images: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, D) L2-normalised image embeddings → (N, C) probabilities in (0, 1)."""
        vectors = np.asarray(images, dtype=np.float64)
        if vectors.ndim == 1:
            vectors = vectors[None, :]  # (1, D)
        direction = self.positive.astype(np.float64) - self.negative.astype(np.float64)  # (C, D)
        margin = vectors @ direction.T  # (N, C): s₊ − s₋
        # sigmoid(x) written so that neither branch overflows for large |x|.
        logits = margin / self.temperature
        out = np.empty_like(logits)
        high = logits >= 0
        out[high] = 1.0 / (1.0 + np.exp(-logits[high]))
        low_exp = np.exp(logits[~high])
        out[~high] = low_exp / (1.0 + low_exp)
        return out
