"""``convirt demo`` end to end: a tiny corpus and training, then runs that reuse everything.

The command runs as a user runs it (a subprocess of the ``convirt`` entry point) with
``--no-serve``; the service it prepared is then started on the same data directory to
check that it is ready and answers searches over the demo studies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import main as cli_main
from app.main import create_app
from app.settings import Settings
from model.data.manifest import read_manifest

N_STUDIES = 24
#: A tiny training: two steps of eight pairs at a small input size.
TINY_TRAINING = (
    "--max-steps",
    "2",
    "--override",
    "data.batch_size=8",
    "--override",
    "model.image.input_size=96",
)
RUN_TIMEOUT_S = 900


def run_demo(data_dir: Path, *extra: str) -> dict[str, Any]:
    """Run ``convirt demo --no-serve`` and return its JSON summary."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [
        sys.executable,
        "-m",
        "app.cli",
        "demo",
        "--data-dir",
        str(data_dir),
        "--n",
        str(N_STUDIES),
        "--no-serve",
        "--no-progress",
        *TINY_TRAINING,
        *extra,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_demo_prepares_then_reuses_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = run_demo(data_dir)
    assert first["steps"] == {
        "corpus": "created",
        "train": "trained",
        "export": "created",
        "ingest": "ingested",
    }
    assert first["training"]["stop_reason"] == "max_steps"
    assert first["ingest"] == {"created": N_STUDIES, "existing": 0, "failed": 0}
    assert first["images"] == N_STUDIES
    model_id = first["model_id"]
    assert model_id.startswith("sha256:")

    demo_dir = data_dir / "demo"
    bundle_dir = data_dir / "bundle"
    assert (demo_dir / "run" / "demo-trained.json").is_file()
    run_files = _mtimes(demo_dir / "run")
    bundle_files = _mtimes(bundle_dir)

    # Second run: nothing is redone, and it is quick.
    second = run_demo(data_dir)
    assert second["steps"] == {
        "corpus": "reused",
        "train": "skipped",
        "export": "reused",
        "ingest": "skipped",
    }
    assert second["model_id"] == model_id
    assert second["images"] == N_STUDIES
    assert _mtimes(demo_dir / "run") == run_files
    assert _mtimes(bundle_dir) == bundle_files
    assert second["seconds"]["total"] < first["seconds"]["total"]
    assert second["seconds"]["total"] < 30.0

    # A lost bundle is exported again from the finished training, not retrained; the same
    # checkpoint gives the same model, so the stored studies stay as they are.
    shutil.rmtree(bundle_dir)
    third = run_demo(data_dir)
    assert third["steps"] == {
        "corpus": "reused",
        "train": "skipped",
        "export": "created",
        "ingest": "skipped",
    }
    assert third["model_id"] == model_id
    assert _mtimes(demo_dir / "run") == run_files

    # The demo's model: a learning image tower beside its untouched ImageNet copy (the
    # anchor), 256 + 256 dimensions.
    config = json.loads((bundle_dir / "config.json").read_text(encoding="utf-8"))
    assert config["dim"] == 512
    assert config["model"]["anchor"]["dim"] == 256
    assert config["model"]["projection"]["dim"] == 256

    # What the demo serves: ready, every study stored with its report, searchable.
    studies = {r.study_id: r for r in read_manifest(demo_dir / "corpus" / "manifest.csv")}
    assert len(studies) == N_STUDIES
    settings = Settings(data_dir=data_dir)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["images"] == N_STUDIES
        assert ready.json()["model_id"] == model_id
        hits = client.post("/search/text", json={"query": "pleural effusion", "k": 5}).json()
        assert len(hits["hits"]) == 5
        first_hit = client.get(f"/images/{hits['hits'][0]['image_id']}").json()
        study = studies[first_hit["study_ref"]]
        assert first_hit["report_text"] == study.report
        assert first_hit["labels"] == study.labels
        # An uploaded copy of a stored image finds it first, embedded as at ingest.
        upload = ("q.png", study.image_path.read_bytes(), "image/png")
        own = client.post("/search/image", files={"file": upload}, data={"k": "3"}).json()
        assert own["hits"][0]["image_id"] == hits["hits"][0]["image_id"]
        assert own["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert client.get("/").status_code == 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n must be at least 1"),
        (["--time-budget", "0"], "--time-budget must be positive"),
        (["--override", "no-equals-sign"], "not of the form key.path=value"),
    ],
)
def test_demo_refuses_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = cli_main(["demo", "--data-dir", str(tmp_path), "--no-serve", *argv])
    assert code == 2
    assert message in caplog.text
    # Nothing was written for a command that was refused.
    assert not any(tmp_path.iterdir())
