"""POST /search/text and /search/image through HTTP, checked against brute force.

The collection is uploaded once per backend (the searches change nothing). The oracle
is exact: the query's embedding (from the same bundle) dotted with every
stored vector read from the database; the API must return the same ranking (ties
tolerated by comparing scores, not only ids).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy import select

import app.services.retrieval as retrieval
from app.models import Embedding, Image
from app.services.runtime import Runtime
from model.bundle import EncoderBundle
from tests.app.conftest import PostgresServer
from tests.app.service_support import (
    is_problem,
    make_settings,
    running_app,
    runtime_of,
    upload,
)

QUERY = "right lower lobe consolidation consistent with pneumonia"


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def search_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for the whole module: searching changes nothing."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('search-db') / 'convirt.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"search_{uuid.uuid4().hex[:12]}"
    with server.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield server.url(name)
    with server.admin_connect() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    search_database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> Iterator[TestClient]:
    """An app holding the 16 Kermany radiographs, views alternating PA/AP."""
    data_dir = tmp_path_factory.mktemp("search-data")
    settings = make_settings(data_dir, search_database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        files = [data for data, _ in kermany_images]
        labels = [_json(labels) for _, labels in kermany_images]
        views = ["PA" if i % 2 == 0 else "AP" for i in range(len(files))]
        response = upload(client, files, labels=labels, view_position=views)
        assert response.json()["created"] == len(files)
        yield client


def _json(labels: dict[str, float | None]) -> str:
    import json

    return json.dumps(labels)


def _stored(runtime: Runtime) -> dict[int, tuple[np.ndarray, dict[str, Any], str | None]]:
    with runtime.sessions() as session:
        rows = session.execute(
            select(Embedding, Image.labels, Image.view_position).join(
                Image, Image.id == Embedding.image_id
            )
        ).all()
        return {int(e.image_id): (e.as_array(), labels, view) for e, labels, view in rows}


def _oracle(
    runtime: Runtime,
    query: np.ndarray,
    *,
    keep: Any = lambda labels, view: True,
    exclude: int | None = None,
) -> list[tuple[int, float]]:
    """Every stored image that ``keep`` accepts, ranked by exact inner product."""
    ranked = [
        (image_id, float(vector @ query))
        for image_id, (vector, labels, view) in _stored(runtime).items()
        if image_id != exclude and keep(labels, view)
    ]
    return sorted(ranked, key=lambda item: (-item[1], item[0]))


def _assert_ranking(hits: list[dict[str, Any]], expected: list[tuple[int, float]]) -> None:
    assert len(hits) == len(expected)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    got_scores = [h["score"] for h in hits]
    assert got_scores == sorted(got_scores, reverse=True)
    np.testing.assert_allclose(got_scores, [s for _, s in expected], atol=1e-5)
    # Ids must agree except where two scores tie.
    for hit, (image_id, score) in zip(hits, expected, strict=True):
        if hit["image_id"] != image_id:
            assert abs(hit["score"] - score) < 1e-5


def test_text_search_matches_brute_force(client: TestClient) -> None:
    runtime = runtime_of(client)
    response = client.post("/search/text", json={"query": QUERY, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == runtime.bundle.model_id
    assert body["k"] == 5
    assert body["took_ms"] > 0
    query = runtime.bundle.encode_texts([QUERY])[0]
    _assert_ranking(body["hits"], _oracle(runtime, query)[:5])
    top = body["hits"][0]
    assert set(top) >= {"image_id", "score", "labels", "view_position", "thumbnail_url"}
    assert client.get(top["thumbnail_url"]).status_code == 200


def test_k_above_the_collection_returns_everything(client: TestClient) -> None:
    hits = client.post("/search/text", json={"query": QUERY, "k": 100}).json()["hits"]
    assert len(hits) == 16
    assert len({h["image_id"] for h in hits}) == 16


@pytest.mark.parametrize(
    ("exact_subset_max", "max_k"),
    [(4096, 4096), (0, 4096), (0, 5)],
    ids=["exact-subset", "index-overfetch", "index-capped-then-exact"],
)
def test_label_filter_returns_only_matches(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, exact_subset_max: int, max_k: int
) -> None:
    # Every strategy must give the same answer: exact scoring of a small subset, index
    # over-fetch, and over-fetch that hits the index's answer limit and finishes exactly.
    monkeypatch.setattr(retrieval, "EXACT_SUBSET_MAX", exact_subset_max)
    monkeypatch.setattr(retrieval, "MAX_K", max_k)
    runtime = runtime_of(client)
    query = runtime.bundle.encode_texts([QUERY])[0]
    body = {"query": QUERY, "k": 16, "filters": {"labels": {"Pneumonia": 1}}}
    hits = client.post("/search/text", json=body).json()["hits"]
    assert all(h["labels"]["Pneumonia"] == 1.0 for h in hits)
    expected = _oracle(runtime, query, keep=lambda labels, view: labels.get("Pneumonia") == 1)
    assert len(expected) == 8
    _assert_ranking(hits, expected)

    body["k"] = 3
    hits = client.post("/search/text", json=body).json()["hits"]
    _assert_ranking(hits, expected[:3])


@pytest.mark.parametrize("exact_subset_max", [4096, 0], ids=["exact-subset", "index-overfetch"])
def test_view_and_label_filters_combine(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, exact_subset_max: int
) -> None:
    monkeypatch.setattr(retrieval, "EXACT_SUBSET_MAX", exact_subset_max)
    runtime = runtime_of(client)
    query = runtime.bundle.encode_texts([QUERY])[0]
    filters = {"view_position": ["pa"], "labels": {"Pneumonia": 0, "No Finding": 1}}
    hits = client.post("/search/text", json={"query": QUERY, "k": 10, "filters": filters}).json()[
        "hits"
    ]
    expected = _oracle(
        runtime,
        query,
        keep=lambda labels, view: (
            view == "PA" and labels.get("Pneumonia") == 0 and labels.get("No Finding") == 1
        ),
    )
    assert 0 < len(expected) < 8
    _assert_ranking(hits, expected)
    assert all(h["view_position"] == "PA" for h in hits)


def test_filter_without_matches_is_an_empty_result(client: TestClient) -> None:
    body = {"query": QUERY, "k": 5, "filters": {"labels": {"Pneumothorax": 1}}}
    response = client.post("/search/text", json=body)
    assert response.status_code == 200
    assert response.json()["hits"] == []


def test_image_search_by_id_leaves_the_image_out(client: TestClient) -> None:
    runtime = runtime_of(client)
    stored = _stored(runtime)
    image_id = sorted(stored)[3]
    response = client.post("/search/image", json={"image_id": image_id, "k": 5})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert image_id not in [h["image_id"] for h in hits]
    _assert_ranking(hits, _oracle(runtime, stored[image_id][0], exclude=image_id)[:5])


def test_image_search_by_upload_finds_the_same_image_first(
    client: TestClient, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> None:
    data = kermany_images[5][0]
    runtime = runtime_of(client)
    by_upload = client.post(
        "/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "4"}
    )
    assert by_upload.status_code == 200, by_upload.text
    hits = by_upload.json()["hits"]
    assert len(hits) == 4
    first = hits[0]
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    # The query was embedded exactly as at ingest: the ranking equals the stored vector's.
    stored = _stored(runtime)[first["image_id"]][0]
    _assert_ranking(hits, _oracle(runtime, stored)[:4])
    # Nothing was stored by searching.
    assert runtime.index.ntotal == 16


def test_image_search_by_upload_with_filters(
    client: TestClient, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> None:
    data = kermany_images[0][0]
    response = client.post(
        "/search/image",
        files={"file": ("q.png", data, "image/png")},
        data={"k": "16", "filters": '{"labels": {"Pneumonia": 1}}'},
    )
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 8
    assert all(h["labels"]["Pneumonia"] == 1.0 for h in hits)


def test_image_search_errors(client: TestClient) -> None:
    is_problem(client.post("/search/image", json={"image_id": 999999}), 404, "image_not_found")
    is_problem(
        client.post("/search/image", files={"file": ("q.txt", b"hello", "text/plain")}),
        415,
        "not_an_image",
    )
    is_problem(
        client.post("/search/image", content=b"raw", headers={"content-type": "image/png"}),
        415,
        "unsupported_media_type",
    )
    is_problem(client.post("/search/image", json={"image_id": 1, "k": 0}), 422, "invalid_k")
    is_problem(client.post("/search/image", json={"k": 3}), 422, "validation_error")
    is_problem(
        client.post("/search/image", data={"k": "3"}, files={"other": ("x", b"1", "text/plain")}),
        422,
        "validation_error",
    )
