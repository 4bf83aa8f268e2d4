"""Fixtures of the end-to-end tests: a live service on a loopback port, a real Chromium.

``live_service`` serves the real app with uvicorn in a thread, on a port the kernel picks,
with a real encoder bundle (:mod:`tests.app.service_support`), an API key, a few synthetic
studies uploaded through the API with their reports and labels, and the 16 real Kermany
radiographs with their labels (no report).

``browser`` is Debian's ``chromium`` driven by Playwright (never ``playwright install``:
browser downloads are not possible here). Without it the browser tests are skipped,
except on CI (``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from model.bundle import EncoderBundle
from model.data.manifest import PairedRecord, read_manifest
from tests.environment import missing_tool

API_KEY = "e2e-test-key-0123456789"
#: Synthetic studies uploaded to the live service.
N_STUDIES = 10
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: The PACS viewer the live service links studies to.
VIEWER_URL_TEMPLATE = "http://pacs.test/viewer?study={study_instance_uid}"
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LiveService:
    """A running service: its base URL, key, data and the studies stored in it."""

    base_url: str
    api_key: str
    settings: Settings
    studies: list[PairedRecord]
    #: image id → the synthetic study uploaded as that image.
    ids: dict[int, PairedRecord]
    #: ids of the Kermany radiographs.
    kermany_ids: list[int]

    @property
    def n_images(self) -> int:
        return len(self.ids) + len(self.kermany_ids)

    def client(self, *, key: bool = True) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60.0)


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _upload_studies(client: httpx.Client, studies: list[PairedRecord]) -> dict[int, PairedRecord]:
    files = [
        ("files", (s.image_path.name, s.image_path.read_bytes(), "image/png")) for s in studies
    ]
    data: dict[str, Any] = {
        "report_text": [s.report for s in studies],
        "labels": [json.dumps(dict(s.labels)) for s in studies],
        "study_ref": [s.study_id for s in studies],
        "view_position": [s.view_position or "" for s in studies],
    }
    response = client.post("/images", files=files, data=data)
    assert response.status_code == 201, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["created"] * len(studies)
    return {int(r["id"]): studies[r["index"]] for r in results}


def _upload_kermany(
    client: httpx.Client, images: list[tuple[bytes, dict[str, float | None]]]
) -> list[int]:
    files = [
        ("files", (f"kermany-{i}.png", data, "image/png")) for i, (data, _) in enumerate(images)
    ]
    data = {"labels": [json.dumps(labels) for _, labels in images]}
    response = client.post("/images", files=files, data=data)
    assert response.status_code == 201, response.text
    return [int(r["id"]) for r in response.json()["results"]]


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[PairedRecord]:
    from model.data.synthetic import generate_corpus

    manifest = generate_corpus(
        tmp_path_factory.mktemp("corpus"), N_STUDIES, seed=7, size=256, progress=False
    )
    return list(read_manifest(manifest))


@pytest.fixture(scope="module")
def live_service(
    tmp_path_factory: pytest.TempPathFactory,
    bundle: EncoderBundle,
    synthetic_corpus: list[PairedRecord],
    kermany_images: list[tuple[bytes, dict[str, float | None]]],
) -> Iterator[LiveService]:
    data_dir = tmp_path_factory.mktemp("live-data")
    settings = Settings(
        data_dir=data_dir,
        api_keys=[API_KEY],
        log_level="WARNING",
        viewer_url_template=VIEWER_URL_TEMPLATE,
    )
    app = create_app(settings, bundle=bundle)
    # Port 0: the kernel picks a free port at bind time, so two runs never collide.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live service did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    try:
        service = LiveService(base_url, API_KEY, settings, synthetic_corpus, {}, [])
        with service.client() as client:
            while client.get("/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {client.get('/ready').text}")
                time.sleep(0.2)
            ids = _upload_studies(client, synthetic_corpus)
            kermany_ids = _upload_kermany(client, kermany_images)
        yield LiveService(base_url, API_KEY, settings, synthetic_corpus, ids, kermany_ids)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = find_chromium()
    if found is None:
        reason = (
            "Chromium not found (looked for chromium, chromium-browser on PATH); "
            "install Debian's browser with `apt-get install -y chromium`"
        )
        missing_tool(reason)
    return found


@pytest.fixture(scope="module")
def browser_context(chromium_path: str) -> Iterator[Any]:
    """A Chromium context with an empty profile, shared by a module's tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="convirt-chromium-")
    try:
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=chromium_path,
                headless=True,
                args=list(CHROMIUM_ARGS),
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """A fresh tab with no saved API key; console errors are collected on ``page.errors``."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    try:
        yield tab
    finally:
        tab.close()


def screenshot_dir() -> Path:
    """Where the browser tests leave screenshots for a person to look at."""
    path = Path(tempfile.gettempdir()) / "convirt-web-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path
