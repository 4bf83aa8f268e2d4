"""POST/GET/DELETE /images through HTTP on the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from model.bundle import EncoderBundle
from model.inputs.decode import decode_image
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
def client(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir, thumbnail_size=64)
    with running_app(settings, bundle) as client:
        yield client


def test_upload_stores_derivative_files_rows_and_vectors(
    client: TestClient, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> None:
    data, _labels = kermany_images[0]
    response = upload(
        client,
        [data],
        report_text="Heart size normal. Lungs clear.",
        labels='{"No Finding": 1, "Pneumonia": 0}',
        study_ref="study-0001",
        view_position="PA",
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] == 1
    assert body["existing"] == 0
    assert body["failed"] == 0
    (result,) = body["results"]
    assert result["status"] == "created"
    image_id = result["id"]

    meta = client.get(f"/images/{image_id}").json()
    # Exactly the public fields: the row's file paths never leave the service.
    assert set(meta) == {
        "id", "content_hash", "source_format", "width", "height", "bits", "photometric",
        "view_position", "modality", "labels", "report_text", "study_ref", "thumbnail_url",
        "study_instance_uid", "viewer_url", "created_at", "updated_at",
    }  # fmt: skip
    source = PILImage.open(io.BytesIO(data))
    assert meta["id"] == image_id
    assert meta["source_format"] == "png"
    assert (meta["width"], meta["height"]) == source.size
    assert meta["bits"] == 8
    # An upload names no PACS study, so there is nothing to link to.
    assert meta["study_instance_uid"] is None
    assert meta["viewer_url"] is None
    assert meta["labels"] == {"No Finding": 1.0, "Pneumonia": 0.0}
    assert meta["report_text"] == "Heart size normal. Lungs clear."
    assert meta["study_ref"] == "study-0001"
    assert meta["view_position"] == "PA"
    assert meta["thumbnail_url"] == f"/images/{image_id}/thumbnail"

    thumb = client.get(meta["thumbnail_url"])
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/png"
    picture = PILImage.open(io.BytesIO(thumb.content))
    assert max(picture.size) == 64
    assert picture.mode == "L"

    runtime = runtime_of(client)
    # The stored PNG is the decoded pixels, losslessly (the upload was 8-bit already).
    stored = runtime.store.read_levels(
        f"images/{result['content_hash'][:2]}/{result['content_hash']}.png"
    )
    assert np.array_equal(stored, np.asarray(source))
    # The vector in the index is the bundle's embedding of those pixels.
    expected = runtime.bundle.encode_images([decode_image(data).pixels])[0]
    scores, ids = runtime.index.search(expected[None, :], 1)
    assert ids[0, 0] == image_id
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert_consistent(runtime)


def test_same_bytes_return_the_existing_id(
    client: TestClient, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> None:
    data = kermany_images[1][0]
    first = upload(client, [data]).json()["results"][0]
    again = upload(client, [data, data])
    assert again.status_code == 201
    results = again.json()["results"]
    assert [r["status"] for r in results] == ["existing", "existing"]
    assert {r["id"] for r in results} == {first["id"]}
    count, _, _ = db_state(runtime_of(client))
    assert count == 1
    assert runtime_of(client).index.ntotal == 1


def test_repeat_within_one_batch_is_stored_once(client: TestClient) -> None:
    a, b = noise_png(1), noise_png(2)
    response = upload(client, [a, b, a])
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["created", "created", "existing"]
    assert results[2]["id"] == results[0]["id"]
    assert db_state(runtime_of(client))[0] == 2
    assert_consistent(runtime_of(client))


def test_one_bad_file_does_not_sink_the_batch(client: TestClient) -> None:
    good = noise_png(3)
    response = upload(client, [good, b"this is a text file, not an image", noise_png(4)])
    assert response.status_code == 201, response.text
    body = response.json()
    assert [r["status"] for r in body["results"]] == ["created", "failed", "created"]
    assert body["created"] == 2
    assert body["failed"] == 1
    problem = body["results"][1]["problem"]
    assert problem["code"] == "not_an_image"
    assert problem["status"] == 415
    assert body["results"][1]["id"] is None
    assert_consistent(runtime_of(client))
    assert db_state(runtime_of(client))[0] == 2


def test_per_file_metadata_in_file_order(client: TestClient) -> None:
    response = upload(
        client,
        [noise_png(5), noise_png(6)],
        report_text=["first report", "second report"],
        labels=['{"Edema": 1}', '{"Edema": 0}'],
        view_position=["AP", "LATERAL"],
    )
    ids = [r["id"] for r in response.json()["results"]]
    first, second = (client.get(f"/images/{i}").json() for i in ids)
    assert (first["report_text"], first["labels"], first["view_position"]) == (
        "first report",
        {"Edema": 1.0},
        "AP",
    )
    assert (second["report_text"], second["labels"], second["view_position"]) == (
        "second report",
        {"Edema": 0.0},
        "LATERAL",
    )


def test_metadata_count_must_match_the_files(client: TestClient) -> None:
    response = upload(client, [noise_png(7), noise_png(8), noise_png(9)], report_text=["a", "b"])
    is_problem(response, 422, "validation_error")
    assert response.json()["errors"][0]["loc"] == ["body", "report_text"]
    assert db_state(runtime_of(client))[0] == 0


def test_dicom_upload_keeps_depth_and_technical_metadata(client: TestClient) -> None:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None
    data = Path(path).read_bytes()
    response = upload(client, [data], content_type="application/dicom")
    assert response.status_code == 201, response.text
    image_id = response.json()["results"][0]["id"]
    meta = client.get(f"/images/{image_id}").json()
    assert meta["source_format"] == "dicom"
    assert meta["photometric"] == "MONOCHROME1"
    assert meta["modality"] == "CR"
    assert meta["bits"] == 15
    runtime = runtime_of(client)
    h = meta["content_hash"]
    levels = runtime.store.read_levels(f"images/{h[:2]}/{h}.png")
    # A 15-bit radiograph is kept as a 16-bit PNG, not squeezed into 8 bits.
    assert levels.dtype == np.uint16
    assert levels.shape == (meta["height"], meta["width"])
    assert len(np.unique(levels)) > 256


def test_delete_removes_row_vector_and_files(client: TestClient) -> None:
    keep, gone = (r["id"] for r in upload(client, [noise_png(10), noise_png(11)]).json()["results"])
    runtime = runtime_of(client)
    meta = client.get(f"/images/{gone}").json()
    h = meta["content_hash"]
    image_file = runtime.store.path(f"images/{h[:2]}/{h}.png")
    thumb_file = runtime.store.path(f"thumbnails/{h[:2]}/{h}.png")
    assert image_file.is_file()
    assert thumb_file.is_file()

    response = client.delete(f"/images/{gone}")
    assert response.status_code == 204
    is_problem(client.get(f"/images/{gone}"), 404, "image_not_found")
    is_problem(client.get(f"/images/{gone}/thumbnail"), 404, "image_not_found")
    assert not image_file.exists()
    assert not thumb_file.exists()
    assert runtime.index.ids().tolist() == [keep]
    assert_consistent(runtime)
    hits = client.post("/search/text", json={"query": "pleural effusion", "k": 10}).json()["hits"]
    assert [hit["image_id"] for hit in hits] == [keep]
    is_problem(client.delete(f"/images/{gone}"), 404, "image_not_found")


def test_index_survives_restart_without_rebuild(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        ids = [r["id"] for r in upload(client, [noise_png(12), noise_png(13)]).json()["results"]]
    # Shutdown saved the index: the next start loads it instead of rebuilding.
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert not runtime.report.rebuilt
        assert runtime.index.ids().tolist() == sorted(ids)
        assert client.get("/ready").status_code == 200
