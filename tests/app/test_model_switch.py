"""A reindex to a new model beside a serving process: an explicit switch it follows."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.cli import main as cli_main
from app.models import Embedding
from app.services import reconcile
from model.bundle import EncoderBundle, export_bundle
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


@pytest.mark.slow
def test_a_serving_process_follows_a_reindex_to_a_new_model(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = tmp_path / "served-bundle"
    shutil.copytree(bundle_dir, served)
    # The same weights exported under another name: another model id.
    new = export_bundle(
        bundle_dir.parent / "checkpoint" / "last.pt", tmp_path / "new-bundle", name="switched"
    )
    new_id = EncoderBundle.load(new).model_id
    assert new_id != bundle.model_id
    settings = make_settings(tmp_path / "data", sqlite_url, served)
    with running_app(settings, None) as client:
        ids = [r["id"] for r in upload(client, [noise_png(1), noise_png(2)]).json()["results"]]
        # An upload to the old process lands after the reindex's embedding pass and
        # before its switch: the switch's final pass must give it a vector of the new model.
        first_pass = reconcile.embed_images
        late: list[int] = []

        def embed_then_upload(*args: Any, **kwargs: Any) -> int:
            done = first_pass(*args, **kwargs)
            if not late:
                stored = upload(client, [noise_png(4)])
                assert stored.status_code == 201, stored.text
                late.append(stored.json()["results"][0]["id"])
            return done

        monkeypatch.setattr(reconcile, "embed_images", embed_then_upload)
        argv = [
            "reindex",
            "--no-progress",
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            sqlite_url,
            "--bundle-dir",
            str(new),
            "--index-dir",
            str(tmp_path / "index-reindex"),
        ]
        assert cli_main(argv) == 0
        ids += late
        # The reindex itself left every image with a vector of the new model.
        with runtime_of(client).sessions() as session:
            embedded = session.scalars(
                select(Embedding.image_id).where(Embedding.model_id == new_id)
            ).all()
        assert sorted(embedded) == sorted(ids)
        deadline = time.monotonic() + 5
        while client.get("/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Told, not yet switched: not ready, but searches still answer with the old model.
        is_problem(client.get("/ready"), 503, "model_switched")
        assert client.post("/search/text", json={"query": "edema", "k": 2}).status_code == 200
        # Its stores would carry the old model's vectors, missing from the new model's
        # index: refused until it serves the new model, and nothing is stored.
        refused_store = upload(client, [noise_png(3)])
        is_problem(refused_store, 503, "model_switched")
        assert refused_store.headers["retry-after"]
        assert db_state(runtime_of(client))[1] == sorted(ids)
        # A process started with the old bundle now refuses instead of switching back.
        other = make_settings(tmp_path / "data", sqlite_url, bundle_dir, index_dir=tmp_path / "x")
        with running_app(other, bundle) as refused:
            body = refused.get("/ready").json()
            assert "model_not_active" in body["detail"]
        # The operator installs the new bundle where the server looks for it.
        shutil.rmtree(served)
        shutil.copytree(new, served)
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = client.get("/ready").json()
        assert ready["model_id"] == new_id
        runtime = runtime_of(client)
        assert runtime.bundle.model_id == new_id
        assert runtime.index.ids().tolist() == sorted(ids)
        assert_consistent(runtime)
        hits = client.post("/search/text", json={"query": "edema", "k": 2}).json()
        assert hits["model_id"] == new_id
