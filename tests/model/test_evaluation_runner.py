"""The evaluation runner, its embedding cache, the report and the 2-D maps.

A reduced copy of the official protocol (12 candidates and 2 query images per category)
is laid out as synthetic radiographs. The encoder here embeds downsampled pixels: a real,
deterministic image encoder that needs no training, so the runner's own behaviour
(ranking, caching, validation, baselines) can be checked quickly against independent
computations; the trained bundle is exercised by tests/e2e/test_evaluate_e2e.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from index import VectorIndex
from model.data.synthetic import write_chexpert_tree
from model.evaluation.cache import SqliteEmbeddingCache
from model.evaluation.embedding_map import pca_2d, tsne_2d
from model.evaluation.errors import EvaluationError, ProtocolError
from model.evaluation.metrics import precision_key
from model.evaluation.protocol import read_chexpert_8x200
from model.evaluation.report_files import write_report
from model.evaluation.runner import (
    BACKBONE,
    IMAGE_TO_IMAGE,
    MODEL,
    RANDOM,
    RANDOM_EXPECTED,
    TEXT_TO_IMAGE,
    EvaluationCancelled,
    EvaluationOptions,
    run_evaluation,
)

CANDIDATES_PER_CATEGORY = 12
QUERIES_PER_CATEGORY = 2


def _thumbnails(images: Sequence[np.ndarray], side: int) -> np.ndarray:
    rows = []
    for pixels in images:
        small = Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        vector = np.asarray(small, dtype=np.float32).ravel()
        vector -= vector.mean()
        rows.append(vector / max(float(np.linalg.norm(vector)), 1e-6))
    return np.stack(rows).astype(np.float32)


class PixelEncoder:
    """Embeds a radiograph as its mean-centred 16 × 16 thumbnail; texts by a seeded hash."""

    model_id = "sha256:" + "ab" * 32
    dim = 256

    def __init__(self) -> None:
        self.images_encoded = 0

    def encode_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        self.images_encoded += len(images)
        return _thumbnails(images, 16)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).normal(size=self.dim)
            rows.append(vector / np.linalg.norm(vector))
        return np.stack(rows).astype(np.float32)


class PixelBackbone:
    """The baseline's features: the mean-centred 8 × 8 thumbnail."""

    feature_id = "sha256:" + "cd" * 32
    description: ClassVar[dict[str, Any]] = {"tower": "thumbnail", "weights": "none"}

    def __init__(self) -> None:
        self.images_encoded = 0

    def image_backbone_features(
        self, images: Sequence[np.ndarray], *, batch_size: int = 32, normalize: bool = True
    ) -> np.ndarray:
        self.images_encoded += len(images)
        return _thumbnails(images, 8)


def _reduced_protocol(official: Path, out: Path) -> Path:
    """A copy of the official files with the first rows of each category only."""
    for task in ("image-retrieval", "text-retrieval"):
        (out / task).mkdir(parents=True)
        with (official / task / "candidate.csv").open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            kept: list[dict[str, str]] = []
            seen: dict[str, int] = {}
            for row in reader:
                category = next(f for f in fields[5:] if row[f] == "1.0")
                if seen.get(category, 0) < CANDIDATES_PER_CATEGORY:
                    seen[category] = seen.get(category, 0) + 1
                    kept.append(row)
        with (out / task / "candidate.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            writer.writerows(kept)
        with (official / task / "query.csv").open(newline="") as handle:
            query_rows = list(csv.reader(handle))
        counts: dict[str, int] = {}
        with (out / task / "query.csv").open("w", newline="") as handle:
            writer_q = csv.writer(handle)
            writer_q.writerow(query_rows[0])
            for query in query_rows[1:]:
                if counts.get(query[0], 0) < QUERIES_PER_CATEGORY:
                    counts[query[0]] = counts.get(query[0], 0) + 1
                    writer_q.writerow(query)
    return out


@pytest.fixture(scope="module")
def layout(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(protocol dir, image root) with synthetic 64 px radiographs for every path."""
    base = tmp_path_factory.mktemp("runner")
    protocol_dir = _reduced_protocol(shared_dir / "protocols" / "chexpert-8x200", base / "protocol")
    root = base / "chexpert"
    write_chexpert_tree(
        root,
        [
            protocol_dir / "image-retrieval" / "candidate.csv",
            protocol_dir / "image-retrieval" / "query.csv",
        ],
        size=64,
    )
    return protocol_dir, root


def test_runner_matches_the_exact_index_oracle(layout: tuple[Path, Path]) -> None:
    protocol_dir, root = layout
    protocol = read_chexpert_8x200(protocol_dir)
    encoder = PixelEncoder()
    result = run_evaluation(
        protocol,
        encoder,
        root=root,
        backbone=PixelBackbone(),
        options=EvaluationOptions(ks=(1, 5, 10), random_repeats=5),
    )
    assert set(result.scores) == {IMAGE_TO_IMAGE, TEXT_TO_IMAGE}
    assert set(result.scores[IMAGE_TO_IMAGE]) == {MODEL, BACKBONE, RANDOM, RANDOM_EXPECTED}
    assert set(result.scores[TEXT_TO_IMAGE]) == {MODEL, RANDOM, RANDOM_EXPECTED}
    assert result.scores[IMAGE_TO_IMAGE][RANDOM_EXPECTED].mean["p@5"] == pytest.approx(1 / 8)
    # Independent oracle: embed the files directly and search a FAISS Flat index.
    from model.inputs.decode import decode_file

    candidates = _thumbnails(
        [decode_file(root / c.path).pixels for c in protocol.image_candidates], 16
    )
    queries = _thumbnails([decode_file(root / q.path).pixels for q in protocol.image_queries], 16)
    index = VectorIndex.build("Flat", candidates.shape[1], model_id=encoder.model_id)
    index.add(np.arange(len(candidates)), candidates)
    _, ids = index.search(queries, 10)
    positive = protocol.positives(protocol.image_candidates)
    categories = protocol.image_query_categories()
    hits = positive[ids, categories[:, None]]  # (Q, 10)
    model = result.scores[IMAGE_TO_IMAGE][MODEL]
    for k in (1, 5, 10):
        np.testing.assert_allclose(model.per_query[precision_key(k)], hits[:, :k].mean(axis=1))
    # The headline figure is the unweighted mean of the eight category means.
    assert model.mean["p@5"] == pytest.approx(float(np.mean(model.per_category["p@5"])))
    assert result.candidate_embeddings.shape == (8 * CANDIDATES_PER_CATEGORY, 256)
    assert result.candidate_categories.tolist() == np.argmax(positive, axis=1).tolist()


def test_second_run_reads_the_cache(layout: tuple[Path, Path], tmp_path: Path) -> None:
    protocol_dir, root = layout
    protocol = read_chexpert_8x200(protocol_dir)
    cache = SqliteEmbeddingCache(tmp_path / "cache.sqlite")
    options = EvaluationOptions(ks=(5, 10), random_repeats=3)
    first_encoder, first_backbone = PixelEncoder(), PixelBackbone()
    first = run_evaluation(
        protocol, first_encoder, root=root, backbone=first_backbone, cache=cache, options=options
    )
    distinct = len(protocol.image_paths())
    assert first_encoder.images_encoded == first_backbone.images_encoded == distinct
    assert first.embedding_stats[MODEL].encoded == distinct
    second_encoder, second_backbone = PixelEncoder(), PixelBackbone()
    second = run_evaluation(
        protocol, second_encoder, root=root, backbone=second_backbone, cache=cache, options=options
    )
    assert second_encoder.images_encoded == second_backbone.images_encoded == 0
    assert second.embedding_stats[MODEL].cache_hits == distinct
    assert second.embedding_stats[BACKBONE].cache_hits == distinct
    assert second.to_dict()["results"] == first.to_dict()["results"]
    # Each feature space has its own cache key: (model id | backbone feature id, file hash).
    hashes = _hashes(root, protocol.image_paths())
    assert len(cache.get_many(PixelEncoder.model_id, hashes)) == distinct
    backbone_vectors = cache.get_many(PixelBackbone.feature_id, hashes)
    assert {v.shape for v in backbone_vectors.values()} == {(64,)}
    # A file whose bytes change is a miss: its content hash is new.
    assert cache.get_many(PixelEncoder.model_id, ["0" * 64]) == {}


def _hashes(root: Path, paths: list[str]) -> list[str]:
    return [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths]


def test_unreadable_image_names_the_row(layout: tuple[Path, Path], tmp_path: Path) -> None:
    protocol_dir, root = layout
    protocol = read_chexpert_8x200(protocol_dir)
    broken_root = tmp_path / "root"
    for path in protocol.image_paths():
        (broken_root / path).parent.mkdir(parents=True, exist_ok=True)
        (broken_root / path).write_bytes((root / path).read_bytes())
    victim = protocol.image_queries[3]
    (broken_root / victim.path).write_bytes(b"not an image at all")
    with pytest.raises(ProtocolError) as info:
        run_evaluation(protocol, PixelEncoder(), root=broken_root)
    assert info.value.code == "not_an_image"
    assert "image-retrieval/query.csv line 5" in str(info.value)
    (broken_root / victim.path).unlink()
    with pytest.raises(ProtocolError) as info:
        run_evaluation(protocol, PixelEncoder(), root=broken_root)
    assert info.value.code == "image_missing"
    assert victim.path in str(info.value)


def test_cancel_stops_the_run(layout: tuple[Path, Path]) -> None:
    protocol_dir, root = layout
    stop = threading.Event()
    stop.set()
    with pytest.raises(EvaluationCancelled):
        run_evaluation(read_chexpert_8x200(protocol_dir), PixelEncoder(), root=root, cancel=stop)


def test_progress_is_monotone_and_ends_at_one(layout: tuple[Path, Path]) -> None:
    protocol_dir, root = layout
    seen: list[float] = []
    run_evaluation(
        read_chexpert_8x200(protocol_dir),
        PixelEncoder(),
        root=root,
        options=EvaluationOptions(ks=(5,), random_repeats=1, batch_size=16),
        progress=lambda fraction, stage: seen.append(fraction),
    )
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert len(seen) > 5


def test_report_files(layout: tuple[Path, Path], tmp_path: Path) -> None:
    protocol_dir, root = layout
    result = run_evaluation(
        read_chexpert_8x200(protocol_dir),
        PixelEncoder(),
        root=root,
        backbone=PixelBackbone(),
        options=EvaluationOptions(ks=(5, 10), random_repeats=2),
        model_name="pixels",
    )
    files = write_report(result, tmp_path / "out", extra={"command": "test"})
    document = json.loads(files.json.read_text())
    assert document["protocol"]["counts"]["image_candidates"] == 8 * CANDIDATES_PER_CATEGORY
    # An encoder that does not state its provenance (not a bundle) reports none.
    assert document["model"] == {
        "model_id": PixelEncoder.model_id,
        "name": "pixels",
        "provenance": None,
    }
    assert document["command"] == "test"
    assert document["backbone_baseline"] == PixelBackbone.description
    image_model = document["results"][IMAGE_TO_IMAGE][MODEL]
    assert image_model["mean"]["p@5"] == pytest.approx(
        result.scores[IMAGE_TO_IMAGE][MODEL].mean["p@5"], abs=1e-6
    )
    assert set(image_model["per_category"]) == set(result.protocol.categories)
    assert "protocol order" in document["metrics"]["tie_rule"]
    markdown = files.markdown.read_text()
    assert "| image → image | model (ConVIRT) |" in markdown
    assert "| Pleural Effusion | 2 |" in markdown
    for plot in (files.precision_plot, files.embedding_map):
        with Image.open(plot) as image:
            assert image.format == "PNG"
            assert min(image.size) > 300


def _clusters(n_per: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 4.0
    points = np.repeat(centres, n_per, axis=0) + rng.normal(size=(3 * n_per, dim))
    return points, np.repeat(np.arange(3), n_per)


def _neighbour_agreement(coords: np.ndarray, labels: np.ndarray) -> float:
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(axis=1)] == labels).mean())


def test_maps_keep_clusters_apart() -> None:
    points, labels = _clusters(30, 64, seed=1)
    pca = pca_2d(points)
    assert pca.shape == (90, 2)
    assert _neighbour_agreement(pca, labels) == 1.0
    tsne = tsne_2d(points, perplexity=10, iterations=250, seed=0)
    assert tsne.shape == (90, 2)
    assert np.all(np.isfinite(tsne))
    assert _neighbour_agreement(tsne, labels) == 1.0
    np.testing.assert_array_equal(tsne, tsne_2d(points, perplexity=10, iterations=250, seed=0))
    with pytest.raises(EvaluationError):
        pca_2d(np.zeros((1, 4)))


def test_encoding_batches_hold_a_bounded_number_of_decoded_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full-resolution archive is encoded in batches smaller than batch_size."""
    from model.evaluation import runner

    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 50), 20 * i, np.uint8)).save(path)
        paths.append(str(path))
    hashes = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    sizes: list[int] = []

    def encode(images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
        sizes.append(len(images))
        return np.ones((len(images), 4), np.float32)

    def embed() -> dict[str, np.ndarray]:
        vectors, _ = runner.embed_images(
            {"model": encode},
            paths,
            hashes,
            root=None,
            where={p: p for p in paths},
            spaces={"model": "key"},
            cache=None,
            batch_size=32,
            progress=lambda fraction, message: None,
            cancel=None,
        )
        return vectors

    assert embed()["model"].shape == (5, 4)
    assert sizes == [5]
    sizes.clear()
    # Two pictures' pixels fill a batch: the third starts the next one.
    monkeypatch.setattr(runner, "BATCH_PIXELS", 2 * 40 * 50)
    assert embed()["model"].shape == (5, 4)
    assert sizes == [2, 2, 1]
