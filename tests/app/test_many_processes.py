"""Many processes on one database: two ``convirt serve`` and a ``convirt ingest`` beside them.

Real processes, as deployed: each server has its own index directory (as replicas on
different machines do) and follows the database's change feed. Every change must be
searchable on both within 2 s, and ``/ready`` must stay 200 while the ingest runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db import create_engine_for_url
from app.models import Image
from tests.app.process_support import (
    PROJECT_ROOT,
    ServeProcess,
    process_env,
    serving,
    settings_options,
)
from tests.app.service_support import noise_png

VISIBLE_WITHIN_S = 2.0

pytestmark = pytest.mark.slow


def _stored_ids(database_url: str) -> set[int]:
    engine = create_engine_for_url(database_url, pooled=False)
    try:
        with engine.connect() as conn:
            return {int(i) for i in conn.scalars(select(Image.id))}
    finally:
        engine.dispose()


def _within(condition: Callable[[], bool], seconds: float) -> float:
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        if elapsed > seconds:
            raise AssertionError(f"not true within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _ingest_while_serving(
    folder: Path, options: list[str], servers: tuple[ServeProcess, ...]
) -> tuple[dict[str, Any], list[str]]:
    """Run ``convirt ingest`` while polling the servers' /ready: its summary, and every
    /ready answer that was not 200."""
    ingest = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "ingest",
            str(folder),
            "--no-progress",
            "--batch-size",
            "4",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(),
        cwd=PROJECT_ROOT,
    )
    not_ready: list[str] = []
    try:
        while ingest.poll() is None:
            for server in servers:
                response = server.client.get("/ready")
                if response.status_code != 200:
                    not_ready.append(response.text)
            time.sleep(0.25)
        out, err = ingest.communicate(timeout=60)
    finally:
        if ingest.poll() is None:
            ingest.kill()
    assert ingest.returncode == 0, err[-4000:]
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary, not_ready


def test_two_servers_and_an_ingest_stay_consistent(
    tmp_path: Path,
    database_url: str,
    bundle_dir: Path,
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> None:
    data_dir = tmp_path / "data"

    def options(name: str) -> list[str]:
        return settings_options(
            data_dir=data_dir,
            database_url=database_url,
            bundle_dir=bundle_dir,
            index_dir=tmp_path / f"index-{name}",
        )

    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, (data, _) in enumerate(kermany_images):
        (folder / f"study{i:02d}.png").write_bytes(data)

    with (
        serving(options("a"), tmp_path / "a.log") as a,
        serving(options("b"), tmp_path / "b.log") as b,
    ):
        servers: tuple[ServeProcess, ...] = (a, b)
        for server in servers:
            server.wait_ready()
        summary, not_ready = _ingest_while_serving(folder, options("ingest"), servers)
        assert summary["created"] == len(kermany_images)
        assert not_ready == []

        stored = _stored_ids(database_url)
        assert len(stored) == len(kermany_images)
        # The last commit was before the command exited: both see it all within 2 s.
        _within(lambda: a.search_ids() == b.search_ids() == stored, VISIBLE_WITHIN_S)

        # A delete on one is gone from the other's index (not only hidden from searches).
        victim = min(stored)
        assert a.client.delete(f"/images/{victim}").status_code == 204
        left = len(stored) - 1
        _within(
            lambda: all(s.client.get("/ready").json()["index_vectors"] == left for s in servers),
            VISIBLE_WITHIN_S,
        )
        # An upload on the other reaches the first.
        uploaded = b.client.post("/images", files={"files": ("x.png", noise_png(7), "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        new_id = uploaded.json()["results"][0]["id"]
        expected = (stored - {victim}) | {new_id}
        _within(lambda: a.search_ids() == b.search_ids() == expected, VISIBLE_WITHIN_S)
        # Both followers reach the feed's head and agree with the database.
        _within(
            lambda: all(s.client.get("/ready").json()["feed_lag_changes"] == 0 for s in servers),
            VISIBLE_WITHIN_S,
        )
        for server in servers:
            body = server.client.get("/ready").json()
            assert (body["images"], body["index_vectors"]) == (len(expected), len(expected))
        assert (
            a.client.get("/ready").json()["feed_sequence"]
            == b.client.get("/ready").json()["feed_sequence"]
        )


def _samples(metrics_text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` in a text exposition."""
    found = []
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            found.append((head[len(name) :], float(value)))
    return found


def test_workers_follow_the_feed_and_add_up_their_metrics(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path
) -> None:
    options = settings_options(
        data_dir=tmp_path / "data",
        database_url=sqlite_url,
        bundle_dir=bundle_dir,
        index_dir=tmp_path / "index",
    )
    with serving(options, tmp_path / "workers.log", "--workers", "2") as server:
        server.wait_ready()

        def worker_pids() -> set[str]:
            text = server.client.get("/metrics").text
            return {labels for labels, _ in _samples(text, "convirt_index_vectors")}

        # Both workers up: each reports its own index size, labelled with its pid.
        _within(lambda: len(worker_pids()) == 2, 180.0)
        uploaded = server.client.post(
            "/images", files={"files": ("x.png", noise_png(21), "image/png")}
        )
        assert uploaded.status_code == 201, uploaded.text
        image_id = uploaded.json()["results"][0]["id"]
        searches = 0

        def every_worker_finds_it() -> bool:
            # Whichever worker the kernel hands each connection to must find the image.
            nonlocal searches
            found = True
            for _ in range(10):
                fresh = httpx.Client(base_url=server.base_url, timeout=30.0)
                with fresh:
                    response = fresh.post("/search/text", json={"query": "effusion", "k": 5})
                searches += 1
                assert response.status_code == 200
                found &= image_id in {h["image_id"] for h in response.json()["hits"]}
            return found

        time.sleep(VISIBLE_WITHIN_S)
        assert every_worker_finds_it()
        text = server.client.get("/metrics").text
        counted = sum(
            value
            for labels, value in _samples(text, "convirt_http_requests_total")
            if 'route="/search/text"' in labels and 'status="200"' in labels
        )
        # Every search is counted once, whichever worker served it.
        assert counted == searches
        vectors = _samples(text, "convirt_index_vectors")
        assert len(vectors) == 2
        _within(
            lambda: all(
                v == 1.0
                for _, v in _samples(server.client.get("/metrics").text, "convirt_index_vectors")
            ),
            VISIBLE_WITHIN_S,
        )
