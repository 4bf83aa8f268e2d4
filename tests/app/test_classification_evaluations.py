"""Zero-shot and linear-probe evaluations: ``convirt evaluate`` and POST /evaluations agree.

Both run on the same small synthetic corpus with the test bundle; every score of the two
``report.json`` documents must be identical, and both write the report files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import main as convirt
from model.bundle import EncoderBundle
from tests.app.service_support import is_problem, make_settings, running_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("classification-corpus")
    return generate_corpus(out, 60, seed=5, size=64, splits=(0.5, 0.25, 0.25), progress=False)


def _wait(client: TestClient, run_id: int, timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/evaluations/{run_id}").json()
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"evaluation {run_id} did not finish in {timeout} s")


CASES = [
    (
        "zero-shot",
        ["--bootstrap", "200", "--knn-k", "5"],
        {"bootstrap": 200, "knn_k": 5},
        "roc.png",
    ),
    (
        "linear-probe",
        ["--fractions", "25,100", "--draws", "2"],
        {"fractions": [0.25, 1.0], "draws": 2},
        "linear_probe.png",
    ),
]


@pytest.mark.parametrize(("protocol", "argv", "body", "figure"), CASES)
def test_command_and_endpoint_give_identical_numbers(
    protocol: str,
    argv: list[str],
    body: dict[str, Any],
    figure: str,
    manifest: Path,
    bundle_dir: Path,
    bundle: EncoderBundle,
    tmp_path: Path,
) -> None:
    out = tmp_path / "cli"
    status = convirt(
        [
            "evaluate",
            "--protocol",
            protocol,
            "--manifest",
            str(manifest),
            "--bundle",
            str(bundle_dir),
            "--out",
            str(out),
            "--device",
            "cpu",
            *argv,
        ]
    )
    assert status == 0
    command = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    assert (out / figure).is_file()

    data_dir = tmp_path / "service"
    # The service reads evaluation inputs only under its evaluation roots.
    settings = make_settings(
        data_dir,
        f"sqlite:///{data_dir / 'convirt.db'}",
        bundle_dir,
        evaluation_roots=[manifest.parent],
    )
    with running_app(settings, bundle) as client:
        response = client.post(
            "/evaluations", json={"protocol": protocol, "manifest": str(manifest), **body}
        )
        assert response.status_code == 202, response.text
        done = _wait(client, response.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    service = done["results"]
    assert service["results"] == command["results"]
    assert service["protocol"]["counts"] == command["protocol"]["counts"]
    assert service["model"]["model_id"] == bundle.model_id == command["model"]["model_id"]
    report_dir = data_dir / service["report_dir"]
    assert (report_dir / "report.json").is_file()
    assert (report_dir / figure).is_file()
    # The summary of the run lists the rows' means, as for the retrieval protocols.
    assert set(done["summary"][protocol.replace("-", "_")]) == set(
        command["results"][protocol.replace("-", "_")]
    )


def test_bad_classification_requests_are_refused_at_once(
    manifest: Path, bundle_dir: Path, bundle: EncoderBundle, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'convirt.db'}",
        bundle_dir,
        evaluation_roots=[manifest.parent, tmp_path],
    )
    with running_app(settings, bundle) as client:
        is_problem(
            client.post(
                "/evaluations",
                json={"protocol": "zero-shot", "manifest": str(manifest), "prompt_set": "nope"},
            ),
            422,
            "unknown_prompt_set",
        )
        is_problem(
            client.post("/evaluations", json={"protocol": "linear-probe"}), 422, "validation_error"
        )
        is_problem(
            client.post(
                "/evaluations",
                json={"protocol": "zero-shot", "manifest": str(tmp_path / "missing.csv")},
            ),
            422,
            "protocol_file_missing",
        )
        assert client.get("/evaluations").json()["total"] == 0
