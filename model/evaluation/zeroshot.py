"""The zero-shot protocol: prompt ensembles scored by AUROC on a labelled corpus.

Images: the records of the ``test`` split when the corpus has one, else every record
(CheXpert's ``valid.csv``/``test.csv``). Per finding of the prompt set that the corpus
labels with both classes, three rows are scored:

- ``prompts``: the prompt-ensemble probability (:mod:`model.zeroshot`);
- ``knn``: the fraction of positive labels among the ``knn_k`` nearest labelled images in
  the shared space, the service's second opinion. The neighbours come from the corpus's
  other splits when it has them, else from the evaluated images themselves, never from the
  same patient;
- ``chance``: uniform random scores (seeded), what a classifier without information gets.

Each row gets, per finding, AUROC with a 95 % bootstrap interval (1,000 resamples, fixed
seed), F1 and MCC at the threshold that maximises Youden's J, and two means: over the five
CheXpert competition findings present, and over every scored finding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from model.evaluation.cache import EmbeddingCache
from model.evaluation.classification_metrics import (
    BOOTSTRAP_RESAMPLES,
    BinaryScores,
    nanmean,
    roc_curve,
    score_binary,
)
from model.evaluation.errors import ProtocolError
from model.evaluation.features import FeatureSpace, embed_records
from model.evaluation.labelled import (
    COMPETITION_FINDINGS,
    LabelledRecord,
    label_matrix,
    labelled_findings,
)
from model.evaluation.runner import EmbeddingStats, ProgressCallback, check_stop
from model.prompts import PromptSet
from model.zeroshot import PromptClassifier, TextEncoder

logger = logging.getLogger(__name__)

ZERO_SHOT: Final = "zero_shot"
PROMPTS: Final = "prompts"
KNN: Final = "knn"
CHANCE: Final = "chance"
MODEL_SPACE: Final = "model"
#: Cells of one block of the k-NN similarity matrix: 16 M float64, 128 MiB, whatever the
#: pool's size (CheXpert's training split as a pool has 223k images).
_KNN_BLOCK_CELLS: Final = 1 << 24


class ZeroShotEncoder(TextEncoder, Protocol):
    """An encoder bundle as the zero-shot protocol uses it."""

    def encode_images(
        self, images: Sequence[np.ndarray], *, batch_size: int = ...
    ) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class ZeroShotOptions:
    knn_k: int = 10
    bootstrap: int = BOOTSTRAP_RESAMPLES
    seed: int = 0
    batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {
            "knn_k": self.knn_k,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True, eq=False)
class ZeroShotResult:
    """Scores per row and finding, and the curves the ROC plot draws."""

    model_id: str
    model_name: str | None
    prompt_set: PromptSet
    temperature: float
    options: ZeroShotOptions
    findings: tuple[str, ...]
    scores: dict[str, dict[str, BinaryScores]]
    truth: npt.NDArray[np.bool_]
    known: npt.NDArray[np.bool_]
    row_scores: dict[str, npt.NDArray[np.float64]]
    counts: dict[str, Any]
    embedding_stats: dict[str, EmbeddingStats]
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def competition(self) -> tuple[str, ...]:
        return tuple(name for name in COMPETITION_FINDINGS if name in self.findings)

    def mean(self, row: str) -> dict[str, float]:
        scores = self.scores[row]

        def over(names: Sequence[str], metric: str) -> float:
            return nanmean([float(getattr(scores[n], metric)) for n in names])

        return {
            "auroc_competition": over(self.competition, "auroc"),
            "auroc_all": over(self.findings, "auroc"),
            "f1_competition": over(self.competition, "f1"),
            "mcc_competition": over(self.competition, "mcc"),
        }

    def roc(self, row: str, finding: str) -> tuple[npt.NDArray[np.float64], ...]:
        c = self.findings.index(finding)
        keep = self.known[:, c]
        fpr, tpr, _ = roc_curve(self.truth[keep, c], self.row_scores[row][keep, c])
        return fpr, tpr

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the run (``report.json``)."""

        def clean(values: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if np.isnan(v) else round(v, 6)) for k, v in values.items()}

        return {
            "protocol": {"name": "zero-shot", "params": self.params, "counts": self.counts},
            "model": {"model_id": self.model_id, "name": self.model_name},
            "prompt_set": {
                "id": self.prompt_set.id,
                "version": self.prompt_set.version,
                "description": self.prompt_set.description,
            },
            "temperature": self.temperature,
            "options": self.options.to_dict(),
            "findings": list(self.findings),
            "competition_findings": list(self.competition),
            "metrics": {
                "auroc_ci95": f"percentile interval of {self.options.bootstrap} bootstrap "
                f"resamples (seed {self.options.seed})",
                "threshold": "Youden's J (sensitivity + specificity - 1) maximised",
                "labels": "1 positive; 0 or blank negative; -1 (uncertain) left out",
            },
            "results": {
                ZERO_SHOT: {
                    row: {
                        "mean": clean(self.mean(row)),
                        "per_finding": {n: s.to_dict() for n, s in per.items()},
                    }
                    for row, per in self.scores.items()
                }
            },
            "embeddings": {
                space: {"images": s.images, "cache_hits": s.cache_hits, "encoded": s.encoded}
                for space, s in self.embedding_stats.items()
            },
            "seconds": round(self.seconds, 3),
        }


def knn_votes(
    queries: npt.NDArray[np.float32],
    pool: npt.NDArray[np.float32],
    pool_positive: npt.NDArray[np.bool_],
    pool_known: npt.NDArray[np.bool_],
    k: int,
    *,
    query_patients: Sequence[str],
    pool_patients: Sequence[str],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(fraction of positive votes, number of voters), each (Q, C).

    A query's neighbours are its ``k`` most similar pool images of other patients (ties
    broken by pool order); a neighbour votes on a finding when its label there is known.
    A finding without voters gets NaN.
    """
    fractions = np.full((len(queries), pool_positive.shape[1]), np.nan)
    voters = np.zeros((len(queries), pool_positive.shape[1]), dtype=np.int64)
    pool_ids = np.asarray(pool_patients, dtype=object)
    step = max(1, _KNN_BLOCK_CELLS // max(len(pool), 1))
    for start in range(0, len(queries), step):
        block = queries[start : start + step].astype(np.float64)
        similarity = block @ pool.astype(np.float64).T  # (b, M)
        same = np.asarray(query_patients[start : start + len(block)], dtype=object)
        similarity[same[:, None] == pool_ids[None, :]] = -np.inf
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # (b, k)
        usable = np.take_along_axis(similarity, order, axis=1) > -np.inf  # (b, k)
        votes = pool_known[order] & usable[:, :, None]  # (b, k, C)
        positive = (pool_positive[order] & votes).sum(axis=1)  # (b, C)
        count = votes.sum(axis=1)  # (b, C)
        voters[start : start + len(block)] = count
        with np.errstate(invalid="ignore", divide="ignore"):
            fractions[start : start + len(block)] = np.where(count > 0, positive / count, np.nan)
    return fractions, voters


def _split(records: Sequence[LabelledRecord]) -> tuple[list[int], list[int], str]:
    """(evaluated rows, k-NN pool rows, how the pool was chosen)."""
    tested = [i for i, r in enumerate(records) if r.split == "test"]
    if tested:
        others = [i for i, r in enumerate(records) if r.split != "test"]
        if others:
            return tested, others, "the corpus's other splits"
        return tested, tested, "the evaluated images, other patients only"
    everything = list(range(len(records)))
    return everything, everything, "the evaluated images, other patients only"


def _score_rows(
    rows: dict[str, npt.NDArray[np.float64]],
    truth: npt.NDArray[np.bool_],
    known: npt.NDArray[np.bool_],
    findings: Sequence[str],
    options: ZeroShotOptions,
) -> dict[str, dict[str, BinaryScores]]:
    out: dict[str, dict[str, BinaryScores]] = {}
    for row, values in rows.items():
        out[row] = {}
        for c, name in enumerate(findings):
            keep = known[:, c]
            out[row][name] = score_binary(
                truth[keep, c], values[keep, c], resamples=options.bootstrap, seed=options.seed
            )
    return out


def _scorable(tested: Sequence[LabelledRecord], prompt_set: PromptSet) -> list[str]:
    """The set's findings that the evaluated images label with both classes."""
    findings = labelled_findings(tested, prompt_set.names)
    if not findings:
        raise ProtocolError(
            f"no finding of prompt set {prompt_set.key} has both positive and negative labels "
            f"among the {len(tested)} evaluated images",
            code="category_absent",
        )
    return findings


def _pool_votes(
    queries: npt.NDArray[np.float32],
    pool_vectors: npt.NDArray[np.float32],
    tested: Sequence[LabelledRecord],
    pool: Sequence[LabelledRecord],
    findings: Sequence[str],
    options: ZeroShotOptions,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """:func:`knn_votes` of the evaluated images among the labelled pool."""
    pool_positive, pool_known = label_matrix(pool, findings)
    return knn_votes(
        queries,
        pool_vectors,
        pool_positive,
        pool_known,
        options.knn_k,
        query_patients=[r.patient_id for r in tested],
        pool_patients=[r.patient_id for r in pool],
    )


def run_zero_shot(
    records: Sequence[LabelledRecord],
    encoder: ZeroShotEncoder,
    prompt_set: PromptSet,
    *,
    cache: EmbeddingCache | None = None,
    options: ZeroShotOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    model_name: str | None = None,
    params: dict[str, Any] | None = None,
) -> ZeroShotResult:
    """Score ``prompt_set`` (and the k-NN vote, and chance) on the labelled ``records``."""
    opts = options or ZeroShotOptions()
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    evaluated, pool, pool_rule = _split(records)
    tested = [records[i] for i in evaluated]
    findings = _scorable(tested, prompt_set)
    needed = sorted(set(evaluated) | set(pool))
    space = FeatureSpace(
        cache_key=encoder.model_id,
        encode=lambda images, size: encoder.encode_images(images, batch_size=size),
        description={"model_id": encoder.model_id},
    )
    vectors, stats = embed_records(
        [records[i] for i in needed],
        {MODEL_SPACE: space},
        cache=cache,
        batch_size=opts.batch_size,
        progress=report,
        cancel=cancel,
    )
    check_stop(cancel)
    report(0.95, "scoring")
    row_of = {index: row for row, index in enumerate(needed)}
    embedded = vectors[MODEL_SPACE]
    queries = embedded[[row_of[i] for i in evaluated]]  # (Q, D)
    truth, known = label_matrix(tested, findings)  # (Q, C) each
    classifier = PromptClassifier.build(encoder, prompt_set)
    columns = [prompt_set.names.index(n) for n in findings]
    fractions, voters = _pool_votes(
        queries,
        embedded[[row_of[i] for i in pool]],
        tested,
        [records[i] for i in pool],
        findings,
        opts,
    )
    rows = {
        PROMPTS: classifier.probabilities(queries)[:, columns],  # (Q, C)
        # No voter: the uninformative 0.5 rather than dropping the image from the row.
        KNN: np.nan_to_num(fractions, nan=0.5),
        CHANCE: np.random.default_rng(opts.seed).random(truth.shape),
    }
    result = ZeroShotResult(
        model_id=encoder.model_id,
        model_name=model_name,
        prompt_set=prompt_set,
        temperature=classifier.temperature,
        options=opts,
        findings=tuple(findings),
        scores=_score_rows(rows, truth, known, findings, opts),
        truth=truth,
        known=known,
        row_scores=rows,
        counts={
            "images": len(tested),
            "knn_pool": len(pool),
            "knn_pool_rule": pool_rule,
            "knn_mean_voters": round(float(voters.mean()), 3),
        },
        embedding_stats=stats,
        seconds=time.perf_counter() - started,
        params=dict(params or {}),
    )
    report(1.0, "done")
    logger.info("zero-shot %s: %s", prompt_set.key, result.mean(PROMPTS))
    return result
