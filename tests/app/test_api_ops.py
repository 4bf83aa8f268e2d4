"""Operations: readiness, metrics, the start-up reconcile, index failures, the commands."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from app.cli import main as cli_main
from app.models import Embedding, EncoderModel, Image
from app.settings import Settings
from index import VectorIndex, VectorIndexError
from model.bundle import EncoderBundle
from tests.app.service_support import (
    assert_consistent,
    db_state,
    is_problem,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, bundle_dir: Path) -> Settings:
    return make_settings(tmp_path / "data", database_url, bundle_dir)


@pytest.fixture
def client(settings: Settings, bundle: EncoderBundle) -> Iterator[TestClient]:
    with running_app(settings, bundle) as client:
        yield client


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in\n{text}")


def test_ready_reports_model_and_counts(client: TestClient) -> None:
    upload(client, [noise_png(1), noise_png(2), noise_png(3)])
    # The upload is searchable at once; the follower confirms its feed records just after.
    deadline = time.monotonic() + 2.0
    while client.get("/ready").json()["feed_lag_changes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    lag_seconds = body.pop("feed_lag_seconds")
    served = body.pop("model")
    assert body == {
        "status": "ready",
        "model_id": runtime_of(client).bundle.model_id,
        "images": 3,
        "index_vectors": 3,
        "notes": [],
        # The feed: the model's activation, then one record per stored image.
        "feed_sequence": 4,
        "feed_lag_changes": 0,
    }
    assert 0 <= lag_seconds < 5
    # The serving model is named with its provenance (tests/app/test_imported_bundle.py).
    assert served["model_id"] == body["model_id"]
    assert served["dim"] == 512
    with runtime_of(client).sessions() as session:
        model = session.get(EncoderModel, body["model_id"])
        assert model is not None
        assert model.is_active
        assert model.dim == 512


def test_metrics_count_routes_and_time_stages(client: TestClient) -> None:
    image_id = upload(client, [noise_png(4)]).json()["results"][0]["id"]
    client.post("/search/text", json={"query": "edema", "k": 2})
    client.post("/search/text", json={"query": "", "k": 2})
    client.post("/search/image", json={"image_id": image_id, "k": 2})
    client.get(f"/images/{image_id}")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    total = "convirt_http_requests_total"
    assert _metric(text, total, method="POST", route="/search/text", status="200") == 1
    assert _metric(text, total, method="POST", route="/search/text", status="422") == 1
    assert _metric(text, total, method="POST", route="/images", status="201") == 1
    assert _metric(text, total, method="GET", route="/images/{image_id}", status="200") == 1
    latency = "convirt_http_request_duration_seconds_count"
    assert _metric(text, latency, method="POST", route="/search/image") == 1
    stages = "convirt_stage_duration_seconds_count"
    for stage in ("decode", "encode", "search", "database", "store", "index"):
        assert _metric(text, stages, stage=stage) >= 1, stage
    assert _metric(text, "convirt_index_vectors") == 1


def test_startup_rebuilds_a_damaged_or_missing_index(
    settings: Settings, bundle: EncoderBundle
) -> None:
    with running_app(settings, bundle) as client:
        upload(client, [noise_png(5), noise_png(6), noise_png(7)])
    manifest = json.loads((settings.index_dir / "manifest.json").read_text())
    data_file = settings.index_dir / manifest["index_file"]
    data_file.write_bytes(data_file.read_bytes()[:-16] + b"\0" * 16)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.report.rebuilt
        assert "checksum_mismatch" in (runtime.report.reason or "")
        assert_consistent(runtime)
        assert client.get("/ready").status_code == 200
    shutil.rmtree(settings.index_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.report.rebuilt
        assert runtime.index.ntotal == 3
        assert_consistent(runtime)


def test_startup_rebuilds_an_index_that_lags_the_database(
    settings: Settings, bundle: EncoderBundle
) -> None:
    with running_app(settings, bundle) as client:
        ids = [r["id"] for r in upload(client, [noise_png(8), noise_png(9)]).json()["results"]]
    stale = VectorIndex.load(settings.index_dir)
    # As after a crash between a commit and the next index save: one vector missing and
    # one id that the database no longer has (same count, different ids).
    stale.remove(np.asarray([ids[0]]))
    stale.add(np.asarray([ids[1] + 1000]), np.eye(1, 512, dtype=np.float32))
    stale.save(settings.index_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.report.rebuilt
        assert runtime.report.reason == "index ids differ from the database's"
        assert runtime.index.ids().tolist() == sorted(ids)


def test_startup_embeds_images_missing_a_vector(settings: Settings, bundle: EncoderBundle) -> None:
    with running_app(settings, bundle) as client:
        image_id = upload(client, [noise_png(10)]).json()["results"][0]["id"]
        runtime = runtime_of(client)
        original = runtime.retrieval.stored_vector(image_id)
        assert original is not None
        with runtime.sessions() as session, session.begin():
            session.execute(delete(Embedding).where(Embedding.image_id == image_id))
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert runtime.report.embedded == 1
        again = runtime.retrieval.stored_vector(image_id)
        assert again is not None
        # Re-embedded from the stored PNG: the same vector the upload produced.
        np.testing.assert_allclose(again, original, atol=1e-5)
        assert_consistent(runtime)


def test_failed_index_add_keeps_the_row_and_rebuilds(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    live = runtime.index._index

    def broken_add(ids: object, vectors: object) -> int:
        raise VectorIndexError("disk on fire", code="faiss_error")

    monkeypatch.setattr(live, "add", broken_add)
    response = upload(client, [noise_png(11)])
    # The database accepted the image: the upload succeeded, the index is behind.
    assert response.status_code == 201
    image_id = response.json()["results"][0]["id"]
    assert db_state(runtime)[1] == [image_id]
    assert runtime.index.ntotal == 0
    is_problem(client.get("/ready"), 503, "index_inconsistent")
    runtime.maintain()
    assert client.get("/ready").status_code == 200
    assert_consistent(runtime)
    hits = client.post("/search/text", json={"query": "edema", "k": 1}).json()["hits"]
    assert [h["image_id"] for h in hits] == [image_id]


def test_reindex_command_reembeds_every_image(
    settings: Settings,
    bundle: EncoderBundle,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with running_app(settings, bundle) as client:
        ids = [r["id"] for r in upload(client, [noise_png(12), noise_png(13)]).json()["results"]]
        before = {i: runtime_of(client).retrieval.stored_vector(i) for i in ids}
    args = [
        "reindex",
        "--no-progress",
        "--data-dir",
        str(settings.data_dir),
        "--database-url",
        settings.database_url,
        "--bundle-dir",
        str(settings.bundle_dir),
    ]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["embedded"] == 2
    assert summary["vectors"] == 2
    assert summary["model_id"] == bundle.model_id
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert not runtime.report.rebuilt
        for image_id, vector in before.items():
            after = runtime.retrieval.stored_vector(image_id)
            assert vector is not None
            assert after is not None
            np.testing.assert_allclose(after, vector, atol=1e-5)
        assert_consistent(runtime)


@pytest.mark.slow
def test_ingest_command_loads_a_directory_and_is_rerunnable(
    tmp_path: Path,
    settings: Settings,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    for i, (data, _) in enumerate(kermany_images[:6]):
        (folder / ("nested" if i % 2 else "") / f"image{i}.png").write_bytes(data)
    (folder / "notes.txt").write_text("not an image, not picked up")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    args = [
        "ingest",
        str(folder),
        "--no-progress",
        "--batch-size",
        "4",
        "--data-dir",
        str(settings.data_dir),
        "--database-url",
        settings.database_url,
        "--bundle-dir",
        str(settings.bundle_dir),
    ]
    # The broken PNG fails (exit 1), the six radiographs are stored.
    assert cli_main(args) == 1
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["created"], first["existing"], first["failed"]) == (6, 0, 1)
    (folder / "broken.png").unlink()
    assert cli_main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (second["created"], second["existing"], second["failed"]) == (0, 6, 0)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert not runtime.report.rebuilt
        assert db_state(runtime)[0] == 6
        assert_consistent(runtime)
        with runtime.sessions() as session:
            formats = set(session.scalars(select(Image.source_format)))
        assert formats == {"png"}


def test_serve_refuses_an_open_address_without_keys(tmp_path: Path) -> None:
    args = ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")]
    assert cli_main(args) == 2
    # Nothing was created: it refused before building the app.
    assert not (tmp_path / "data").exists()


def test_changes_are_saved_by_maintenance(client: TestClient, settings: Settings) -> None:
    runtime = runtime_of(client)
    model_id = runtime.bundle.model_id
    image_id = upload(client, [noise_png(14)]).json()["results"][0]["id"]
    # The upload reached the live index but not yet the copy on disk (saved at start-up).
    assert runtime.index.ids().tolist() == [image_id]
    assert VectorIndex.load(settings.index_dir, expected_model_id=model_id).ntotal == 0
    runtime.maintain()
    saved = VectorIndex.load(settings.index_dir, expected_model_id=model_id)
    assert saved.ids().tolist() == [image_id]
    # Nothing is left unsaved, so the next pass writes nothing.
    assert not runtime.index.save_if_dirty()


def test_openapi_documents_routes_errors_and_keys(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/images", "/images/{image_id}", "/images/{image_id}/thumbnail"):
        assert path in paths
    for path in ("/search/text", "/search/image", "/health", "/ready", "/metrics"):
        assert path in paths
    upload_responses = paths["/images"]["post"]["responses"]
    assert set(upload_responses) >= {"201", "413", "415", "422"}
    assert "application/problem+json" in upload_responses["415"]["content"]
    image_body = paths["/search/image"]["post"]["requestBody"]["content"]
    assert set(image_body) == {"application/json", "multipart/form-data"}
    assert "image_id" in image_body["application/json"]["schema"]["properties"]
    schemes = document["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"apiKey", "http"}
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
