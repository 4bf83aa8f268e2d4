"""POST /classify through HTTP: prompt probabilities and neighbour votes against an oracle.

The oracle recomputes both halves independently: the probability from the bundle's text
embeddings of the prompt set (each side averaged and re-normalised, softmax over the two
similarities divided by τ), and the vote from an exact ranking of every stored vector read
from the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import Embedding, Image
from app.services.ingest import IngestItem
from app.services.runtime import Runtime
from model.bundle import EncoderBundle
from model.prompts import load_prompt_set
from tests.app.service_support import (
    is_problem,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

KNN_K = 5


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    bundle_dir: Path,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> Iterator[TestClient]:
    """An app holding the 16 labelled Kermany radiographs (8 normal, 8 pneumonia)."""
    data_dir = tmp_path_factory.mktemp("classify-data")
    settings = make_settings(
        data_dir, f"sqlite:///{data_dir / 'convirt.db'}", bundle_dir, classify_knn_k=KNN_K
    )
    with running_app(settings, bundle) as client:
        files = [data for data, _ in kermany_images]
        labels = [json.dumps(labels) for _, labels in kermany_images]
        response = upload(client, files, labels=labels)
        assert response.json()["created"] == len(files)
        yield client


def _expected_probabilities(bundle: EncoderBundle, set_id: str, image: np.ndarray) -> np.ndarray:
    prompt_set = load_prompt_set(set_id)
    out = []
    for finding in prompt_set.findings:
        sides = []
        for prompts in (finding.positive, finding.negative):
            mean = bundle.encode_texts(list(prompts)).astype(np.float64).mean(axis=0)
            sides.append(mean / np.linalg.norm(mean))
        logits = np.array([image @ sides[0], image @ sides[1]]) / bundle.temperature
        out.append(np.exp(logits[0]) / np.exp(logits).sum())
    return np.asarray(out)


def _expected_votes(
    runtime: Runtime, query: np.ndarray, names: list[str], exclude: int | None = None
) -> list[tuple[float | None, int]]:
    with runtime.sessions() as session:
        rows = session.execute(
            select(Embedding, Image.labels).join(Image, Image.id == Embedding.image_id)
        ).all()
    ranked = sorted(
        (-float(e.as_array() @ query), int(e.image_id), labels)
        for e, labels in rows
        if int(e.image_id) != exclude and labels
    )
    nearest = [labels for _, _, labels in ranked[:KNN_K]]
    votes = []
    for name in names:
        voting = [labels.get(name) for labels in nearest if labels.get(name) != -1.0]
        positive = sum(1 for value in voting if value == 1.0)
        votes.append((positive / len(voting) if voting else None, len(voting)))
    return votes


def _assert_answer(
    body: dict[str, Any],
    bundle: EncoderBundle,
    set_id: str,
    probabilities: np.ndarray,
    votes: list[tuple[float | None, int]],
) -> None:
    prompt_set = load_prompt_set(set_id)
    assert body["model_id"] == bundle.model_id
    assert body["prompt_set"] == {"id": prompt_set.id, "version": prompt_set.version}
    assert [f["name"] for f in body["findings"]] == list(prompt_set.names)
    np.testing.assert_allclose(
        [f["probability"] for f in body["findings"]], probabilities, atol=1e-5
    )
    for finding, (fraction, voters) in zip(body["findings"], votes, strict=True):
        assert finding["knn"]["neighbours"] == voters
        if fraction is None:
            assert finding["knn"]["positive_fraction"] is None
        else:
            assert finding["knn"]["positive_fraction"] == pytest.approx(fraction)


def test_classify_an_upload(client: TestClient, bundle: EncoderBundle, kermany_images: Any) -> None:
    runtime = runtime_of(client)
    data = kermany_images[0][0]
    response = client.post("/classify", files={"file": ("q.png", data, "image/png")})
    assert response.status_code == 200, response.text
    vector = runtime.ingest.encode([runtime.ingest.decode(IngestItem(data=data))])[0]
    names = list(load_prompt_set("chexpert-14").names)
    body = response.json()
    _assert_answer(
        body,
        bundle,
        "chexpert-14",
        _expected_probabilities(bundle, "chexpert-14", vector.astype(np.float64)),
        _expected_votes(runtime, vector, names),
    )
    # Every stored image carries labels, so each finding gets k votes (absent = negative).
    assert {f["knn"]["neighbours"] for f in body["findings"]} == {KNN_K}
    assert all(0.0 < f["probability"] < 1.0 for f in body["findings"])


def test_classify_a_stored_image_by_id(client: TestClient, bundle: EncoderBundle) -> None:
    runtime = runtime_of(client)
    stored = runtime.retrieval.stored_vector(3)
    assert stored is not None
    response = client.post("/classify", json={"image_id": 3, "prompt_set": "chexpert-5-short"})
    assert response.status_code == 200, response.text
    names = list(load_prompt_set("chexpert-5-short").names)
    _assert_answer(
        response.json(),
        bundle,
        "chexpert-5-short",
        _expected_probabilities(bundle, "chexpert-5-short", stored.astype(np.float64)),
        # The image itself does not vote.
        _expected_votes(runtime, stored, names, exclude=3),
    )


def test_pneumonia_votes_follow_the_neighbours_labels(client: TestClient) -> None:
    """Pneumonia is the one label that differs between the two Kermany groups."""
    runtime = runtime_of(client)
    stored = runtime.retrieval.stored_vector(5)
    assert stored is not None
    body = client.post("/classify", json={"image_id": 5}).json()
    pneumonia = next(f for f in body["findings"] if f["name"] == "Pneumonia")
    fraction, voters = _expected_votes(runtime, stored, ["Pneumonia"], exclude=5)[0]
    assert pneumonia["knn"] == {"positive_fraction": fraction, "neighbours": voters}


def test_prompt_embeddings_are_computed_once_per_model_and_set(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.services.classify as classify

    runtime = runtime_of(client)
    runtime.classifier._classifiers.clear()
    built: list[str] = []
    original = classify.PromptClassifier.build

    def counting(encoder: Any, prompt_set: Any) -> Any:
        built.append(prompt_set.key)
        return original(encoder, prompt_set)

    monkeypatch.setattr(classify.PromptClassifier, "build", staticmethod(counting))
    for image_id in (1, 2, 4):
        assert client.post("/classify", json={"image_id": image_id}).status_code == 200
    assert client.post("/classify", json={"image_id": 1, "prompt_set": "chexpert-5-short"})
    shipped = [load_prompt_set(name).key for name in ("chexpert-14", "chexpert-5-short")]
    assert built == shipped


def test_prompt_sets_are_listed(client: TestClient) -> None:
    response = client.get("/classify/prompt-sets")
    assert response.status_code == 200
    sets = {s["id"]: s for s in response.json()}
    assert set(sets) >= {"chexpert-14", "chexpert-5-short"}
    assert len(sets["chexpert-14"]["findings"]) == 14
    assert sets["chexpert-14"]["version"] == load_prompt_set("chexpert-14").version


def test_classify_errors_are_typed_problems(client: TestClient) -> None:
    before = _stored_state(client)
    is_problem(client.post("/classify", json={"image_id": 999999}), 404, "image_not_found")
    is_problem(
        client.post("/classify", files={"file": ("q.txt", b"hello", "text/plain")}),
        415,
        "not_an_image",
    )
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    response = client.post("/classify", files={"file": ("q.png", corrupt, "image/png")})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    is_problem(
        client.post("/classify", json={"image_id": 1, "prompt_set": "no-such-set"}),
        422,
        "unknown_prompt_set",
    )
    is_problem(
        client.post(
            "/classify",
            files={"file": ("q.png", corrupt, "image/png")},
            data={"prompt_set": "../../etc/passwd"},
        ),
        422,
        "unknown_prompt_set",
    )
    is_problem(
        client.post("/classify", content=b"raw", headers={"content-type": "image/png"}),
        415,
        "unsupported_media_type",
    )
    is_problem(
        client.post("/classify", json={"prompt_set": "chexpert-14"}), 422, "validation_error"
    )
    is_problem(
        client.post("/classify", data={"prompt_set": "x"}, files={"o": ("x", b"1", "text/plain")}),
        422,
        "validation_error",
    )
    # Nothing was stored by any of it.
    assert _stored_state(client) == before


def _stored_state(client: TestClient) -> tuple[int, int, int]:
    """Images, indexed vectors and the feed position: what a stored change would move."""
    body = client.get("/ready").json()
    return body["images"], body["index_vectors"], body["feed_sequence"]


def test_unlabelled_neighbours_are_skipped_not_counted(
    client: TestClient, bundle: EncoderBundle
) -> None:
    """Unlabelled noise images sit nearest a noise query; the vote reaches past them."""
    runtime = runtime_of(client)
    noise = [noise_png(seed) for seed in range(6)]
    assert upload(client, noise).json()["created"] == len(noise)
    data = noise_png(99)
    response = client.post("/classify", files={"file": ("n.png", data, "image/png")})
    assert response.status_code == 200, response.text
    vector = runtime.ingest.encode([runtime.ingest.decode(IngestItem(data=data))])[0]
    names = list(load_prompt_set("chexpert-14").names)
    nearest = runtime.retrieval.search(vector, KNN_K)
    assert any(not hit.labels for hit in nearest)  # the plain top k holds unlabelled images
    votes = _expected_votes(runtime, vector, names)
    assert [
        (f["knn"]["positive_fraction"], f["knn"]["neighbours"]) for f in response.json()["findings"]
    ] == [(pytest.approx(v) if v is not None else None, n) for v, n in votes]
    assert {n for _, n in votes} == {KNN_K}
