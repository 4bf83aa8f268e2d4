"""Run a retrieval protocol against an encoder: embed (cached), rank, score, compare.

For each task (image → image, text → image) the runner scores:

- ``model``: the encoder's shared-space embeddings (cosine similarity);
- ``backbone`` (image → image only, when a backbone encoder is given): the pooled features
  of the image backbone before contrastive training, L2-normalised (the paper's "ImageNet"
  row; see :mod:`model.evaluation.baseline`);
- ``random``: uniformly random rankings, averaged over ``random_repeats`` draws;
- ``random_expected``: the exact expectation of a random ranking (12.5 % at every k for
  the official protocol).

Image vectors come from the :class:`~model.evaluation.cache.EmbeddingCache` when present
(keyed by model id and the sha256 of the file's bytes); files are decoded only on a miss,
batch by batch, so memory holds one batch of pixels at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from model.evaluation.cache import EmbeddingCache, content_hash
from model.evaluation.errors import EvaluationError, ProtocolError
from model.evaluation.metrics import (
    DEFAULT_KS,
    TIE_RULE,
    RetrievalScores,
    analytic_random_baseline,
    random_baseline,
    score_retrieval,
)
from model.evaluation.protocol import RetrievalProtocol, resolve_image, validate_protocol

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

IMAGE_TO_IMAGE: Final = "image_to_image"
TEXT_TO_IMAGE: Final = "text_to_image"
MODEL: Final = "model"
BACKBONE: Final = "backbone"
RANDOM: Final = "random"
RANDOM_EXPECTED: Final = "random_expected"
#: Decoded pixels one encoding batch holds at most (plus its last image): 32M, about
#: 128 MB as float32.
BATCH_PIXELS: Final = 32 * 1024 * 1024

#: ``progress(fraction in [0, 1], stage)``.
ProgressCallback = Callable[[float, str], None]


class EvaluationCancelled(EvaluationError):
    """The run was asked to stop before it finished."""

    code = "evaluation_cancelled"


class Encoder(Protocol):
    """What the runner needs of an encoder bundle (:class:`model.bundle.EncoderBundle`)."""

    @property
    def model_id(self) -> str: ...

    def encode_images(self, images: Sequence[np.ndarray], *, batch_size: int = ...) -> FloatArray:
        """float32 (N, D), L2-normalised rows."""
        ...

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = ...) -> FloatArray:
        """float32 (N, D), L2-normalised rows."""
        ...


class BackboneEncoder(Protocol):
    """The baseline's image features (:class:`model.evaluation.baseline.InitialBackbone`)."""

    @property
    def feature_id(self) -> str:
        """Cache key of the feature space, shaped like a model id."""
        ...

    @property
    def description(self) -> dict[str, Any]:
        """What the baseline is (tower, weights), for the report."""
        ...

    def image_backbone_features(
        self, images: Sequence[np.ndarray], *, batch_size: int = ..., normalize: bool = ...
    ) -> FloatArray:
        """float32 (N, F), L2-normalised rows when ``normalize``."""
        ...


@dataclass(frozen=True)
class EvaluationOptions:
    """How to run: cut-offs, the random baseline's draws, batch size and seed."""

    ks: tuple[int, ...] = DEFAULT_KS
    random_repeats: int = 20
    seed: int = 0
    batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {
            "ks": list(self.ks),
            "random_repeats": self.random_repeats,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class EmbeddingStats:
    """Where the image vectors of one feature space came from."""

    images: int
    cache_hits: int
    encoded: int
    seconds: float


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Everything the report needs.

    ``scores[task][method]`` holds the :class:`RetrievalScores`; ``candidate_embeddings``
    is the model's float32 (N, D) embedding of the image task's candidates and
    ``candidate_categories`` their int (N,) category (the one positive label; -1 if none),
    for the embedding map.
    """

    protocol: RetrievalProtocol
    model_id: str
    options: EvaluationOptions
    scores: dict[str, dict[str, RetrievalScores]]
    candidate_embeddings: FloatArray
    candidate_categories: npt.NDArray[np.int64]
    embedding_stats: dict[str, EmbeddingStats]
    seconds: float
    model_name: str | None = None
    backbone: dict[str, Any] | None = None
    #: Where the model comes from and what it was trained on (the bundle's provenance).
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the run (``report.json``)."""
        return {
            "protocol": {
                "name": self.protocol.name,
                "categories": list(self.protocol.categories),
                "params": self.protocol.params,
                "counts": self.protocol.counts(),
            },
            "model": {
                "model_id": self.model_id,
                "name": self.model_name,
                "provenance": self.provenance,
            },
            "backbone_baseline": self.backbone,
            "options": self.options.to_dict(),
            "metrics": {
                "ks": list(self.options.ks),
                "aggregation": "per-category mean over queries, then unweighted mean over "
                "categories",
                "relevance": "a candidate is relevant when its label for the query's category is 1",
                "tie_rule": TIE_RULE,
            },
            "results": {
                task: {method: s.to_dict() for method, s in methods.items()}
                for task, methods in self.scores.items()
            },
            "embeddings": {
                space: {
                    "images": s.images,
                    "cache_hits": s.cache_hits,
                    "encoded": s.encoded,
                    "seconds": round(s.seconds, 3),
                }
                for space, s in self.embedding_stats.items()
            },
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


class _Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def check_stop(cancel: threading.Event | None) -> None:
    """Raise :class:`EvaluationCancelled` once ``cancel`` is set (shared by every protocol)."""
    if cancel is not None and cancel.is_set():
        raise EvaluationCancelled("the evaluation was cancelled")


def hash_files(
    paths: Sequence[str],
    root: Path | None,
    where: dict[str, str],
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> list[str]:
    """The sha256 of each image file (the cache key); ``image_missing`` for an unreadable one."""
    hashes = []
    for number, path in enumerate(paths):
        check_stop(cancel)
        try:
            data = resolve_image(root, path).read_bytes()
        except OSError as exc:
            raise ProtocolError(
                f"{where[path]}: cannot read {resolve_image(root, path)}: {exc.strerror or exc}",
                code="image_missing",
            ) from None
        hashes.append(content_hash(data))
        if number % 64 == 0:
            progress(0.1 * number / max(len(paths), 1), "hashing images")
    return hashes


def _decoded_batches(
    todo: Sequence[str],
    first_path: dict[str, str],
    root: Path | None,
    where: dict[str, str],
    batch_size: int,
    cancel: threading.Event | None,
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """``todo``'s images decoded, in batches of at most ``batch_size`` and about
    :data:`BATCH_PIXELS` decoded pixels: (hashes, (H, W) pictures).

    Full-resolution archives (MIMIC-CXR's are about 3000 × 2500) would otherwise hold
    ``batch_size`` such pictures at once; the encoders resize them anyway.
    """
    from model.inputs.decode import ImageDecodeError, decode_image

    batch: list[str] = []
    pixels: list[np.ndarray] = []
    held = 0
    for key in todo:
        check_stop(cancel)
        path = first_path[key]
        try:
            data = resolve_image(root, path).read_bytes()
            picture = decode_image(data).pixels  # (H, W)
        except OSError as exc:
            raise ProtocolError(
                f"{where[path]}: cannot read {resolve_image(root, path)}: {exc}",
                code="image_missing",
            ) from None
        except ImageDecodeError as exc:
            raise ProtocolError(
                f"{where[path]}: {resolve_image(root, path)}: {exc}", code=exc.code
            ) from None
        batch.append(key)
        pixels.append(picture)
        held += picture.size
        if len(batch) >= batch_size or held >= BATCH_PIXELS:
            yield batch, pixels
            batch, pixels, held = [], [], 0
    if batch:
        yield batch, pixels


def embed_images(
    encoders: dict[str, Callable[[Sequence[np.ndarray], int], FloatArray]],
    paths: Sequence[str],
    hashes: Sequence[str],
    *,
    root: Path | None,
    where: dict[str, str],
    spaces: dict[str, str],
    cache: EmbeddingCache | None,
    batch_size: int,
    progress: ProgressCallback,
    cancel: threading.Event | None,
) -> tuple[dict[str, FloatArray], dict[str, EmbeddingStats]]:
    """Vectors of ``paths`` in each feature space: space → float32 (len(paths), D_space).

    ``spaces`` maps a space name (``model``/``backbone``) to its cache key and ``encoders``
    the same names to ``encode(images, batch_size) -> (b, D)``.
    """
    clock = _Stopwatch()
    unique = list(dict.fromkeys(hashes))
    known: dict[str, dict[str, FloatArray]] = {}
    for space, key in spaces.items():
        known[space] = cache.get_many(key, unique) if cache is not None else {}
    hits = {space: len(found) for space, found in known.items()}
    first_path = {h: p for p, h in reversed(list(zip(paths, hashes, strict=True)))}
    todo = [h for h in unique if any(h not in known[s] for s in spaces)]
    logger.info(
        "%d distinct images; cache hits %s; %d to decode",
        len(unique),
        ", ".join(f"{s} {n}" for s, n in hits.items()),
        len(todo),
    )
    done = 0
    for batch, pixels in _decoded_batches(todo, first_path, root, where, batch_size, cancel):
        for space, cache_key in spaces.items():
            need = [i for i, key in enumerate(batch) if key not in known[space]]
            if not need:
                continue
            vectors = encoders[space]([pixels[i] for i in need], batch_size)  # (b, D)
            fresh = {batch[i]: vectors[row] for row, i in enumerate(need)}
            known[space].update(fresh)
            if cache is not None:
                cache.put_many(cache_key, fresh)
        done += len(batch)
        progress(0.1 + 0.85 * done / len(todo), f"encoding images {done}/{len(todo)}")
    seconds = clock.elapsed()
    out: dict[str, FloatArray] = {}
    stats: dict[str, EmbeddingStats] = {}
    for space in spaces:
        out[space] = np.stack([known[space][h] for h in hashes]).astype(np.float32)  # (P, D)
        stats[space] = EmbeddingStats(
            images=len(unique),
            cache_hits=hits[space],
            encoded=len(unique) - hits[space],
            seconds=seconds,
        )
    return out, stats


def _similarity(queries: FloatArray, candidates: FloatArray) -> npt.NDArray[np.float64]:
    """(Q, D) · (N, D)ᵀ in float64, so rankings do not depend on BLAS summation order."""
    return queries.astype(np.float64) @ candidates.astype(np.float64).T  # (Q, N)


def _embed_protocol_images(
    protocol: RetrievalProtocol,
    encoder: Encoder,
    backbone: BackboneEncoder | None,
    image_root: Path | None,
    cache: EmbeddingCache | None,
    opts: EvaluationOptions,
    report: ProgressCallback,
    cancel: threading.Event | None,
) -> tuple[dict[str, FloatArray], dict[str, EmbeddingStats]]:
    """Every protocol image in each feature space (the model's, the backbone's): rows in
    the order of ``protocol.image_paths()``."""
    paths = protocol.image_paths()
    where: dict[str, str] = {}
    for item in protocol.images():
        where.setdefault(item.path, item.where)
    hashes = hash_files(paths, image_root, where, report, cancel)
    spaces = {MODEL: encoder.model_id}
    encoders: dict[str, Callable[[Sequence[np.ndarray], int], FloatArray]] = {
        MODEL: lambda images, size: encoder.encode_images(images, batch_size=size)
    }
    if backbone is not None:
        spaces[BACKBONE] = backbone.feature_id
        encoders[BACKBONE] = lambda images, size: backbone.image_backbone_features(
            images, batch_size=size
        )
    return embed_images(
        encoders,
        paths,
        hashes,
        root=image_root,
        where=where,
        spaces=spaces,
        cache=cache,
        batch_size=opts.batch_size,
        progress=report,
        cancel=cancel,
    )


def _image_task(
    protocol: RetrievalProtocol,
    vectors: dict[str, FloatArray],
    queries: npt.NDArray[np.int64],
    candidates: npt.NDArray[np.int64],
    opts: EvaluationOptions,
) -> dict[str, RetrievalScores]:
    """Image→image scores of every embedded space and of the two random baselines."""
    categories = protocol.categories
    positive = protocol.positives(protocol.image_candidates)  # (N, C)
    query_category = protocol.image_query_categories()  # (Q,)
    task: dict[str, RetrievalScores] = {}
    for space, embedded in vectors.items():  # (P, D) each
        task[space] = score_retrieval(
            _similarity(embedded[queries], embedded[candidates]),
            positive,
            query_category,
            categories,
            opts.ks,
        )
    task[RANDOM] = random_baseline(
        positive, query_category, categories, opts.ks, repeats=opts.random_repeats, seed=opts.seed
    )
    task[RANDOM_EXPECTED] = analytic_random_baseline(positive, query_category, categories, opts.ks)
    return task


def _text_task(
    protocol: RetrievalProtocol,
    texts: FloatArray,
    candidates: FloatArray,
    opts: EvaluationOptions,
) -> dict[str, RetrievalScores]:
    """Text→image scores of the model (queries (T, D), candidates (N', D)) and of chance."""
    categories = protocol.categories
    positive = protocol.positives(protocol.text_candidates)  # (N', C)
    query_category = protocol.text_query_categories()  # (T,)
    return {
        MODEL: score_retrieval(
            _similarity(texts, candidates), positive, query_category, categories, opts.ks
        ),
        RANDOM: random_baseline(
            positive,
            query_category,
            categories,
            opts.ks,
            repeats=opts.random_repeats,
            seed=opts.seed + 1,
        ),
        RANDOM_EXPECTED: analytic_random_baseline(positive, query_category, categories, opts.ks),
    }


def _provenance(encoder: Encoder) -> dict[str, Any] | None:
    provenance = getattr(encoder, "provenance", None)
    return dict(provenance) if isinstance(provenance, Mapping) else None


def run_evaluation(
    protocol: RetrievalProtocol,
    encoder: Encoder,
    *,
    root: str | os.PathLike[str] | None,
    backbone: BackboneEncoder | None = None,
    cache: EmbeddingCache | None = None,
    options: EvaluationOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    model_name: str | None = None,
) -> EvaluationResult:
    """Validate ``protocol`` against the images under ``root`` and score both tasks.

    ``backbone`` adds the backbone-only baseline to the image task. Raises
    :class:`ProtocolError` for files or images that cannot be evaluated (naming the file and
    row), :class:`EvaluationCancelled` when ``cancel`` is set during the run.
    """
    opts = options or EvaluationOptions()
    report = progress or (lambda fraction, stage: None)
    clock = _Stopwatch()
    image_root = Path(root) if root is not None else None
    report(0.0, "validating")
    validate_protocol(protocol, image_root)
    paths = protocol.image_paths()
    vectors, stats = _embed_protocol_images(
        protocol, encoder, backbone, image_root, cache, opts, report, cancel
    )
    row = {path: i for i, path in enumerate(paths)}

    def rows(items: Sequence[Any]) -> npt.NDArray[np.int64]:
        return np.array([row[item.path] for item in items], dtype=np.int64)

    check_stop(cancel)
    report(0.95, "scoring")
    image_candidates = rows(protocol.image_candidates)
    image_queries = rows(protocol.image_queries)
    image_task = _image_task(protocol, vectors, image_queries, image_candidates, opts)
    texts = encoder.encode_texts([q.text for q in protocol.text_queries])  # (T, D)
    text_task = _text_task(protocol, texts, vectors[MODEL][rows(protocol.text_candidates)], opts)
    image_positive = protocol.positives(protocol.image_candidates)  # (N, C)
    candidate_categories = np.where(
        image_positive.sum(axis=1) == 1, image_positive.argmax(axis=1), -1
    ).astype(np.int64)  # (N,)
    seconds = clock.elapsed()
    report(1.0, "done")
    result = EvaluationResult(
        protocol=protocol,
        model_id=encoder.model_id,
        options=opts,
        scores={IMAGE_TO_IMAGE: image_task, TEXT_TO_IMAGE: text_task},
        candidate_embeddings=vectors[MODEL][image_candidates],
        candidate_categories=candidate_categories,
        embedding_stats=stats,
        seconds=seconds,
        model_name=model_name,
        backbone=dict(backbone.description) if backbone is not None else None,
        # An encoder that knows its provenance (an EncoderBundle does) names it in the report.
        provenance=_provenance(encoder),
    )
    logger.info(
        "evaluated %s on %s in %.1f s: image→image P@10 %.3f, text→image P@10 %.3f",
        encoder.model_id,
        protocol.name,
        seconds,
        image_task[MODEL].mean.get("p@10", float("nan")),
        text_task[MODEL].mean.get("p@10", float("nan")),
    )
    return result
