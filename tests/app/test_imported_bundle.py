"""The service with an imported bundle of its own dimension, and what /ready says of models.

A tiny randomly initialised CLIP (48-d embeddings, tests/model/tiny_hf) is imported and
served on each database backend: uploads, text and image search against an exact oracle,
and a restart. Switching a database filled by the 512-d ConVIRT bundle to the 48-d one
must re-embed everything, never mix dimensions. ``/ready`` names the serving model and
warns while a synthetic demo model serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.models import Embedding
from app.services.provenance import DEMO_MODEL_NAME
from app.services.runtime import Runtime
from model.bundle import MANIFEST_FILE, EncoderBundle, export_bundle
from model.importing import import_model
from tests.app.service_support import (
    assert_consistent,
    make_settings,
    running_app,
    runtime_of,
    upload,
)
from tests.model.tiny_hf import save_tiny_clip

DIM = 48


@pytest.fixture(scope="module")
def clip_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny-clip")
    source = save_tiny_clip(base / "source", projection_dim=DIM)
    return import_model(str(source), base / "bundle", name="tiny-clip")


@pytest.fixture(scope="module")
def clip_bundle(clip_bundle_dir: Path) -> EncoderBundle:
    return EncoderBundle.load(clip_bundle_dir, device="cpu")


def _stored_vectors(runtime: object) -> dict[int, np.ndarray]:
    with runtime.sessions() as session:  # type: ignore[attr-defined]
        rows = session.scalars(select(Embedding)).all()
        return {int(row.image_id): row.as_array() for row in rows}


def test_imported_bundle_serves_uploads_and_both_searches(
    database_url: str,
    tmp_path: Path,
    clip_bundle_dir: Path,
    clip_bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    settings = make_settings(tmp_path / "data", database_url, clip_bundle_dir)
    files = [data for data, _ in kermany_images[:8]]
    with running_app(settings, clip_bundle) as client:
        ready = client.get("/ready").json()
        assert ready["model"]["dim"] == DIM
        assert ready["model"]["origin"] == "imported"
        assert ready["model"]["warning"] is None
        assert upload(client, files).json()["created"] == len(files)
        runtime = runtime_of(client)
        stored = _stored_vectors(runtime)
        assert {v.shape for v in stored.values()} == {(DIM,)}
        assert runtime.index.dim == DIM

        query = "right lower lobe consolidation"
        hits = client.post("/search/text", json={"query": query, "k": 3}).json()["hits"]
        vector = clip_bundle.encode_texts([query])[0]
        expected = sorted(stored, key=lambda i: (-float(stored[i] @ vector), i))[:3]
        np.testing.assert_allclose(
            [h["score"] for h in hits], [float(stored[i] @ vector) for i in expected], atol=1e-5
        )

        answer = client.post("/search/image", files={"file": ("q.png", files[2], "image/png")})
        assert answer.status_code == 200, answer.text
        top = answer.json()["hits"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
        assert_consistent(runtime)
    # A restart loads the saved 48-d index (or rebuilds it) and keeps serving.
    with running_app(settings, clip_bundle) as client:
        assert client.get("/ready").json()["index_vectors"] == len(files)
        assert client.post("/search/text", json={"query": "effusion", "k": 2}).status_code == 200
        assert_consistent(runtime_of(client))


def test_switching_from_convirt_to_an_imported_bundle_re_embeds(
    tmp_path: Path,
    bundle_dir: Path,
    bundle: EncoderBundle,
    clip_bundle_dir: Path,
    clip_bundle: EncoderBundle,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    url = f"sqlite:///{tmp_path / 'switch.db'}"
    files = [data for data, _ in kermany_images[:4]]
    with running_app(make_settings(tmp_path / "data", url, bundle_dir), bundle) as client:
        assert upload(client, files).json()["created"] == len(files)
        assert runtime_of(client).index.dim == 512
    clip_settings = make_settings(tmp_path / "data", url, clip_bundle_dir)
    # Another model serves only after an explicit switch (convirt reindex), never by a
    # process that happens to start with another bundle.
    with running_app(clip_settings, clip_bundle) as client:
        refused = client.get("/ready")
        assert refused.status_code == 503
        assert "model_not_active" in refused.json()["detail"]
    Runtime.start(clip_settings, bundle=clip_bundle, reembed_all=True, switch_model=True).close()
    with running_app(clip_settings, clip_bundle) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["model"]["name"] == "tiny-clip"
        runtime = runtime_of(client)
        assert runtime.index.dim == DIM
        assert_consistent(runtime)
        hits = client.post("/search/text", json={"query": "pneumonia", "k": 4}).json()["hits"]
        assert len(hits) == len(files)


def _demo_like_bundle(bundle_dir: Path, out: Path, *, provenance: bool) -> Path:
    """The test bundle's checkpoint exported as the demo is, with or without provenance."""
    checkpoint = bundle_dir.parent / "checkpoint" / "last.pt"
    export_bundle(
        checkpoint,
        out,
        name=DEMO_MODEL_NAME,
        training_data="synthetic chest radiographs",
        synthetic=provenance,
    )
    if not provenance:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        del manifest["provenance"]
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("recorded", [True, False], ids=["marked", "older-demo-bundle"])
def test_ready_warns_while_the_synthetic_demo_serves(
    tmp_path: Path, bundle_dir: Path, recorded: bool
) -> None:
    demo_dir = _demo_like_bundle(bundle_dir, tmp_path / "demo-bundle", provenance=recorded)
    demo = EncoderBundle.load(demo_dir, device="cpu")
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    with running_app(make_settings(tmp_path / "data", url, demo_dir), demo) as client:
        model = client.get("/ready").json()["model"]
    assert model["synthetic_data"] is True
    assert "synthetic" in model["warning"]
    assert "not meaningful" in model["warning"]


def test_ready_names_a_trained_model_and_its_data(tmp_path: Path, bundle_dir: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    trained = EncoderBundle.load(copy, device="cpu")
    url = f"sqlite:///{tmp_path / 'trained.db'}"
    with running_app(make_settings(tmp_path / "data", url, copy), trained) as client:
        model = client.get("/ready").json()["model"]
    assert model == {
        "name": "service-test",
        "model_id": trained.model_id,
        "dim": 512,
        "origin": "trained",
        "source": None,
        "training_data": trained.provenance["training_data"],
        "synthetic_data": False,
        "warning": None,
    }
    assert model["training_data"] != ""
