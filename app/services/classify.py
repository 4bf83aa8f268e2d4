"""Zero-shot classification of one image (``POST /classify``), with a k-NN second opinion.

The prompt probabilities come from :class:`model.zeroshot.PromptClassifier`: per finding,
the softmax of the image's similarity to the positive and negative prompt ensembles,
divided by the bundle's temperature. Prompt embeddings are computed once per (model id,
prompt set id and version) and kept for the life of the process.

The second opinion is a vote of the ``knn_k`` nearest stored images that carry labels,
found through the live index (widening the search until that many labelled images are
found or the index is exhausted). A neighbour votes on every finding of the set: 1 is a
positive vote, −1 (uncertain) abstains, and 0 or an absent label is a negative vote,
CheXpert's reading of a finding its labeller did not mention (the evaluation's rule too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from app.services.metrics import Metrics
from app.services.retrieval import Hit, RetrievalService
from index import MAX_K
from model.bundle import EncoderBundle
from model.labels import POSITIVE, UNCERTAIN
from model.prompts import PromptSet, load_prompt_set, shipped_prompt_sets
from model.zeroshot import PromptClassifier

logger = logging.getLogger(__name__)

#: Growth of the neighbour search while unlabelled hits leave fewer than k voters.
WIDEN: Final = 4


@dataclass(frozen=True)
class FindingResult:
    name: str
    probability: float
    positive_fraction: float | None
    neighbours: int


@dataclass(frozen=True)
class Classification:
    model_id: str
    prompt_set: PromptSet
    findings: list[FindingResult]


def knn_vote(
    hits: Sequence[Mapping[str, Any]], findings: Sequence[str]
) -> list[tuple[float | None, int]]:
    """(positive fraction or None, voters) per finding, from the neighbours' labels."""
    out: list[tuple[float | None, int]] = []
    for name in findings:
        votes = [labels.get(name) for labels in hits if labels.get(name) != UNCERTAIN]
        positives = sum(1 for value in votes if value == POSITIVE)
        out.append((positives / len(votes) if votes else None, len(votes)))
    return out


class ClassifyService:
    """Prompt-set classification with the runtime's bundle, index and database."""

    def __init__(
        self,
        *,
        bundle: EncoderBundle,
        retrieval: RetrievalService,
        metrics: Metrics,
        knn_k: int,
    ) -> None:
        self.bundle = bundle
        self.retrieval = retrieval
        self.metrics = metrics
        self.knn_k = knn_k
        self._lock = threading.Lock()
        self._classifiers: dict[tuple[str, str], PromptClassifier] = {}

    @staticmethod
    def prompt_set(set_id: str | None) -> PromptSet:
        """A shipped set (the default when None); ``unknown_prompt_set`` (422) otherwise."""
        return load_prompt_set(set_id)

    @staticmethod
    def prompt_sets() -> list[PromptSet]:
        return [load_prompt_set(set_id) for set_id in shipped_prompt_sets()]

    def classifier(self, prompt_set: PromptSet) -> PromptClassifier:
        """The set's embedded prompts under this bundle, computed on first use."""
        key = (self.bundle.model_id, prompt_set.key)
        with self._lock:
            found = self._classifiers.get(key)
            if found is None:
                # Under the lock: concurrent first requests embed the prompts once.
                with self.metrics.stage("encode"):
                    found = PromptClassifier.build(self.bundle, prompt_set)
                self._classifiers[key] = found
        return found

    def _labelled_neighbours(
        self, vector: npt.NDArray[np.float32], exclude_id: int | None
    ) -> list[Hit]:
        total = self.retrieval.index.ntotal
        # k first: in a store whose images all carry labels (the common case) the vote costs
        # exactly one search of k; unlabelled images among the hits widen it.
        fetch = self.knn_k
        while True:
            fetch = min(fetch, total, MAX_K)
            hits = self.retrieval.search(vector, fetch, exclude_id=exclude_id)
            labelled = [hit for hit in hits if hit.labels][: self.knn_k]
            if len(labelled) >= self.knn_k or fetch >= total or fetch >= MAX_K:
                return labelled
            fetch *= WIDEN

    def classify(
        self,
        vector: npt.NDArray[np.float32],
        prompt_set: PromptSet,
        *,
        exclude_id: int | None = None,
    ) -> Classification:
        """Probabilities and neighbour votes for one (D,) image embedding."""
        classifier = self.classifier(prompt_set)
        probabilities = classifier.probabilities(vector)[0]  # (C,)
        neighbours = self._labelled_neighbours(vector, exclude_id)
        votes = knn_vote([hit.labels or {} for hit in neighbours], prompt_set.names)
        return Classification(
            model_id=self.bundle.model_id,
            prompt_set=prompt_set,
            findings=[
                FindingResult(name, float(p), fraction, voters)
                for name, p, (fraction, voters) in zip(
                    prompt_set.names, probabilities.tolist(), votes, strict=True
                )
            ],
        )
