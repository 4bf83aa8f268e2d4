"""POST/GET /evaluations on a real app: background runs, 409 while busy, 422 naming the row.

The bundle is the service tests' real (untrained-head) bundle, so the scores themselves are
not the point here (tests/e2e/test_evaluate_e2e.py checks quality with a trained bundle);
what is checked is what a client relies on: the run's life cycle, stored parameters and
results that match the model package's scoring, the embedding cache, and the problems.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import CachedEmbedding, EvaluationRun, utcnow
from app.services.evaluations import EvaluationJobs
from model.bundle import EncoderBundle
from tests.app.service_support import (
    is_problem,
    make_settings,
    running_app,
    runtime_of,
    upload,
)

#: Kermany: 8 normal and 8 pneumonia radiographs, one positive label each.
STORED_RUN: dict[str, Any] = {
    "protocol": "stored",
    "categories": ["No Finding", "Pneumonia"],
    "candidates_per_category": 5,
    "queries_per_category": 2,
    "seed": 3,
    "ks": [1, 5],
    "random_repeats": 5,
}


def _jobs(client: TestClient) -> EvaluationJobs:
    jobs = client.app.state.evaluations  # type: ignore[attr-defined]
    assert isinstance(jobs, EvaluationJobs)
    return jobs


def _wait(client: TestClient, run_id: int, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/evaluations/{run_id}").json()
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"evaluation {run_id} did not finish in {timeout} s")


def _upload_kermany(
    client: TestClient, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> None:
    files = [data for data, _ in kermany_images]
    labels = [json.dumps(labels) for _, labels in kermany_images]
    assert upload(client, files, labels=labels).json()["created"] == len(files)


@pytest.fixture
def client(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        _upload_kermany(client, kermany_images)
        yield client
        # Never leave a worker running against a closing app.
        assert _jobs(client).wait(300)


@pytest.mark.slow
def test_stored_run_life_cycle_cache_and_409(client: TestClient, tmp_path: Path) -> None:
    runtime = runtime_of(client)
    response = client.post("/evaluations", json=STORED_RUN)
    assert response.status_code == 202, response.text
    first = response.json()
    assert first["status"] in ("queued", "running")
    assert first["model_id"] == runtime.bundle.model_id
    assert response.headers["location"].endswith(f"/evaluations/{first['id']}")
    # One run at a time: the second request is refused while the first is in progress
    # (embedding 14 images twice takes seconds; this request takes milliseconds).
    busy = client.post("/evaluations", json=STORED_RUN)
    is_problem(busy, 409, "evaluation_running")
    assert str(first["id"]) in busy.json()["detail"]
    done = _wait(client, first["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0
    assert done["params"]["categories"] == ["No Finding", "Pneumonia"]
    assert done["params"]["seed"] == 3
    results = done["results"]
    assert results["protocol"]["counts"]["image_candidates"] == 10
    assert results["protocol"]["counts"]["image_queries"] == 4
    image_model = results["results"]["image_to_image"]["model"]
    assert set(image_model["mean"]) == {"p@1", "p@5", "map"}
    assert results["results"]["image_to_image"]["random_expected"]["mean"]["p@5"] == 0.5
    assert (
        done["summary"]["text_to_image"]["model"]
        == results["results"]["text_to_image"]["model"]["mean"]
    )
    report_dir = runtime.settings.data_dir / results["report_dir"]
    assert json.loads((report_dir / "report.json").read_text())["model"]["model_id"] == (
        runtime.bundle.model_id
    )
    assert (report_dir / "precision_at_k.png").stat().st_size > 0
    # 14 distinct images (10 candidates + 4 queries), in two feature spaces.
    with runtime.sessions() as session:
        cached = session.scalar(select(func.count()).select_from(CachedEmbedding))
    assert cached == 28
    assert results["embeddings"]["model"]["encoded"] == 14

    second = client.post("/evaluations", json=STORED_RUN)
    assert second.status_code == 202
    again = _wait(client, second.json()["id"])
    assert again["status"] == "succeeded"
    assert again["results"]["embeddings"]["model"] == {
        **again["results"]["embeddings"]["model"],
        "cache_hits": 14,
        "encoded": 0,
    }
    assert again["results"]["results"] == results["results"]

    listing = client.get("/evaluations").json()
    assert listing["total"] == 2
    assert [item["id"] for item in listing["items"]] == [again["id"], done["id"]]
    assert listing["items"][0]["results"] is None
    assert listing["items"][0]["summary"]["image_to_image"]["model"]["p@5"] is not None
    assert client.get("/evaluations?limit=1&offset=1").json()["items"][0]["id"] == done["id"]


def _kermany_manifest(
    folder: Path, kermany_images: list[tuple[bytes, dict[str, float | None]]]
) -> Path:
    from model.data.manifest import PairedRecord, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for number, (data, labels) in enumerate(kermany_images):
        path = folder / f"{number}.png"
        path.write_bytes(data)
        records.append(
            PairedRecord(path, report="", labels=labels, patient_id=f"p{number}", study_id="s")
        )
    return write_manifest(records, folder / "manifest.csv")


def test_problems(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
    shared_dir: Path,
) -> None:
    manifest = _kermany_manifest(tmp_path / "corpus", kermany_images)
    manifest_run = {**STORED_RUN, "protocol": "manifest", "manifest": str(manifest)}
    protocol_dir = shared_dir / "protocols" / "chexpert-8x200"
    settings = make_settings(
        tmp_path / "data", sqlite_url, bundle_dir, evaluation_roots=[tmp_path, protocol_dir]
    )
    with running_app(settings, bundle) as client:
        # The official files over a root without the images: 422 naming the file and row.
        empty_root = tmp_path / "chexpert"
        empty_root.mkdir()
        missing = client.post(
            "/evaluations",
            json={
                "protocol": "chexpert-8x200",
                "root": str(empty_root),
                "protocol_dir": str(protocol_dir),
            },
        )
        is_problem(missing, 422, "image_missing")
        assert "image-retrieval/candidate.csv line 2" in missing.json()["detail"]
        assert "1680 image(s) missing" in missing.json()["detail"]
        no_files = client.post(
            "/evaluations", json={"protocol": "chexpert-8x200", "root": str(tmp_path / "x")}
        )
        is_problem(no_files, 422, "protocol_file_missing")
        too_few = client.post("/evaluations", json={**manifest_run, "candidates_per_category": 7})
        is_problem(too_few, 422, "not_enough_images")
        assert "Pneumonia: 8" in too_few.json()["detail"]
        absent = client.post(
            "/evaluations",
            json={**manifest_run, "text_queries": [{"category": "Edema", "text": "Edema."}]},
        )
        is_problem(absent, 422, "category_absent")
        no_builtin = client.post("/evaluations", json={**manifest_run, "categories": ["Spleen"]})
        is_problem(no_builtin, 422, "category_absent")
        # The service holds no images yet: nothing to sample.
        empty = client.post("/evaluations", json=STORED_RUN)
        is_problem(empty, 422, "not_enough_images")
        bad_manifest = client.post(
            "/evaluations", json={**manifest_run, "manifest": str(tmp_path / "none.csv")}
        )
        is_problem(bad_manifest, 422, "invalid_manifest")
        is_problem(
            client.post("/evaluations", json={"protocol": "chexpert-8x200"}),
            422,
            "validation_error",
        )
        is_problem(
            client.post("/evaluations", json={"protocol": "stored", "root": "/x"}),
            422,
            "validation_error",
        )
        is_problem(client.post("/evaluations", json={"protocol": "nope"}), 422, "validation_error")
        as_form = client.post(
            "/evaluations",
            content=b'{"protocol": "stored"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        is_problem(as_form, 415, "unsupported_media_type")
        is_problem(client.get("/evaluations/999"), 404, "evaluation_not_found")
        # None of the refused requests left a run behind.
        assert client.get("/evaluations").json() == {"total": 0, "items": []}


def test_runs_whose_worker_died_are_failed_after_their_last_attempt(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", sqlite_url, bundle_dir)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        with runtime.sessions() as session, session.begin():
            session.add(
                EvaluationRun(
                    model_id=runtime.bundle.model_id,
                    protocol="stored",
                    params={},
                    status="running",
                    progress=0.4,
                    started_at=utcnow(),
                    worker="gone:1:1",
                    lease_expires_at=utcnow() - dt.timedelta(seconds=1),
                    attempts=2,
                )
            )
        # The lease passed and both attempts are spent: failed, never left running.
        (item,) = client.get("/evaluations").json()["items"]
        assert item["status"] == "failed"
        assert item["error"].startswith("interrupted")
        assert item["progress"] == pytest.approx(0.4)


def test_manifest_run(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    manifest = _kermany_manifest(tmp_path / "corpus", kermany_images)
    settings = make_settings(
        tmp_path / "data", sqlite_url, bundle_dir, evaluation_roots=[tmp_path / "corpus"]
    )
    with running_app(settings, bundle) as client:
        body = {
            **{k: v for k, v in STORED_RUN.items() if k != "protocol"},
            "protocol": "manifest",
            "manifest": str(manifest),
            "backbone": False,
            "text_queries": [
                {"category": "Pneumonia", "text": "Right lower lobe pneumonia."},
                {"category": "No Finding", "text": "The lungs are clear."},
            ],
        }
        response = client.post("/evaluations", json=body)
        assert response.status_code == 202, response.text
        done = _wait(client, response.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["params"]["manifest"] == str(manifest)
        assert set(done["results"]["results"]["image_to_image"]) == {
            "model",
            "random",
            "random_expected",
        }
        assert done["results"]["protocol"]["counts"]["text_queries"] == 2


def test_command_names_the_missing_image_before_loading_a_bundle(
    shared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app.cli import main as cli_main

    protocol_dir = shared_dir / "protocols" / "chexpert-8x200"
    root = tmp_path / "chexpert"
    first = "CheXpert-v1.0-small/train/patient21230/study1/view1_frontal.jpg"
    (root / first).parent.mkdir(parents=True)
    (root / first).write_bytes(b"")
    argv = [
        "evaluate",
        "--root",
        str(root),
        "--protocol-dir",
        str(protocol_dir),
        "--bundle",
        str(tmp_path / "no-bundle"),
        "--out",
        str(tmp_path / "out"),
    ]
    with caplog.at_level("ERROR"):
        assert cli_main(argv) == 1
    message = caplog.text
    assert "image_missing" in message
    assert "1679 image(s) missing" in message
    assert "image-retrieval/candidate.csv line 3" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--out", str(tmp_path / "out")])  # no --root
