"""The orphan sweep: files no row refers to are removed, referenced and young ones kept."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from app.models import Image
from app.services.runtime import Runtime
from model.bundle import EncoderBundle
from tests.app.process_support import free_port
from tests.app.service_support import (
    assert_consistent,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120.0


def _all_files(root: Path) -> set[Path]:
    folders = ("images", "thumbnails", "originals")
    return {p for f in folders if (root / f).is_dir() for p in (root / f).rglob("*") if p.is_file()}


def _referenced(runtime: Runtime) -> set[Path]:
    with runtime.sessions() as session:
        rows = session.execute(select(Image.image_path, Image.thumbnail_path)).all()
    return {runtime.store.path(p) for row in rows for p in row}


def _age(paths: set[Path], seconds: float) -> None:
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


def test_the_sweep_removes_old_orphans_and_spares_young_and_referenced_files(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(tmp_path / "data", database_url, bundle_dir, orphan_grace_s=60)
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        assert upload(client, [noise_png(1), noise_png(2)]).status_code == 201
        referenced = _referenced(runtime)
        _age(referenced, 3600)  # old, but referenced: kept
        levels = np.zeros((32, 32), np.uint8)
        old = runtime.store.write("ab" + "0" * 62, levels)
        young = runtime.store.write("cd" + "1" * 62, levels)
        old_files = {runtime.store.path(old.image_path), runtime.store.path(old.thumbnail_path)}
        young_files = {
            runtime.store.path(young.image_path),
            runtime.store.path(young.thumbnail_path),
        }
        leftover = runtime.store.path(old.image_path).parent / f".{'ab' + '0' * 62}.png.x1.tmp"
        leftover.write_bytes(b"half a png")
        _age({*old_files, leftover}, 3600)

        report = runtime.sweep_orphans()

        # (The maintenance loop's start-up sweep may have removed the old ones first.)
        assert report.spared == 2
        assert _all_files(runtime.store.root) == referenced | young_files
        for image_id in (1, 2):
            assert client.get(f"/images/{image_id}/thumbnail").status_code == 200
        assert_consistent(runtime)


def _server_env(data_dir: Path, bundle_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CONVIRT_DATA_DIR": str(data_dir),
        "CONVIRT_BUNDLE_DIR": str(bundle_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_mid_upload_then_the_restart_sweeps_the_orphans(
    tmp_path: Path, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=_server_env(data_dir, bundle_dir),
        stdout=log,
        stderr=log,
    )
    try:
        _wait(lambda: _ready(base), "the server to be ready")
        files = [("files", (f"f{i}", noise_png(i), "image/png")) for i in (1, 2)]
        assert httpx.post(f"{base}/images", files=files, timeout=60).status_code == 201
        before = _all_files(data_dir)
        # Hold SQLite's write lock: the next upload writes its files, then waits to commit.
        blocker = sqlite3.connect(data_dir / "convirt.db", timeout=5)
        blocker.execute("BEGIN IMMEDIATE")
        stuck = threading.Thread(
            target=lambda: _post_quietly(base, noise_png(3)), name="stuck-upload"
        )
        stuck.start()
        _wait(lambda: len(_all_files(data_dir) - before) >= 2, "the upload's files")
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
        blocker.rollback()
        blocker.close()
        stuck.join(WAIT_S)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    orphans = _all_files(data_dir) - before
    assert len(orphans) == 2

    settings = make_settings(
        data_dir, f"sqlite:///{data_dir / 'convirt.db'}", bundle_dir, orphan_grace_s=0.5
    )
    time.sleep(0.6)  # the orphans are now older than the grace period
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        # The start-up sweep runs in the first maintenance round.
        _wait(lambda: not (_all_files(data_dir) & orphans), "the start-up sweep")
        assert _all_files(data_dir) == before == _referenced(runtime)
        assert_consistent(runtime)
        assert upload(client, [noise_png(3)]).status_code == 201


def _post_quietly(base: str, data: bytes) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(f"{base}/images", files=[("files", ("f", data, "image/png"))], timeout=WAIT_S)
