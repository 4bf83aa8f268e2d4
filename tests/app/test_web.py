"""The web page's routes: served at ``/`` without a key, locked down, assets only by name.

These run the real app without its lifespan (no bundle is needed to serve the page); the
page's behaviour in a browser is tested in ``tests/e2e/test_web_browser.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.web import ASSETS, PUBLIC_PATHS, static_dir
from app.main import create_app
from app.settings import Settings
from tests.app.service_support import is_problem

KEY = "k" * 24


@pytest.fixture
def keyed_client(tmp_path: Path) -> TestClient:
    # No context manager: the lifespan (bundle, database) is not needed to serve the page.
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", api_keys=[KEY])))


def test_page_is_served_with_a_strict_policy(keyed_client: TestClient) -> None:
    response = keyed_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "blob:" in directives["img-src"]
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    assert 'src="static/app.js"' in html
    assert 'href="static/app.css"' in html
    assert 'role="alert"' in html


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_assets_are_served_without_a_key(keyed_client: TestClient, name: str) -> None:
    response = keyed_client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert response.content == (static_dir() / name).read_bytes()
    # Revalidated on every load, so a new version of the page is never mixed with an old one.
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["etag"]


def test_page_does_not_open_the_api(keyed_client: TestClient) -> None:
    search = keyed_client.post("/search/text", json={"query": "effusion"})
    is_problem(search, 401, "missing_api_key")
    is_problem(keyed_client.get("/images/1/thumbnail"), 401, "missing_api_key")
    is_problem(keyed_client.get("/evaluations"), 401, "missing_api_key")
    assert set(PUBLIC_PATHS) == {"/", "/static/app.css", "/static/app.js"}


@pytest.mark.parametrize(
    "path",
    ["/static/index.html", "/static/missing.js", "/static/..%2Fapi%2Fweb.py", "/static/"],
)
def test_only_the_listed_assets_are_served(keyed_client: TestClient, path: str) -> None:
    response = keyed_client.get(path, headers={"X-API-Key": KEY})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "def " not in response.text


def test_page_script_finds_every_element_it_uses() -> None:
    # A renamed id breaks the page silently in a browser: check the script against the page.
    html = (static_dir() / "index.html").read_text(encoding="utf-8")
    script = (static_dir() / "app.js").read_text(encoding="utf-8")
    ids_in_page = set(re.findall(r'\sid="([^"]+)"', html))
    ids_used = set(re.findall(r'\$\("([^"]+)"\)', script))
    assert ids_used, "the script looks up no element"
    assert ids_used <= ids_in_page, sorted(ids_used - ids_in_page)
    # Labels point at real controls.
    assert set(re.findall(r'\sfor="([^"]+)"', html)) <= ids_in_page


def test_page_calls_routes_the_service_has(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data"))
    paths = set(app.openapi()["paths"])
    script = (static_dir() / "app.js").read_text(encoding="utf-8")
    called = set(re.findall(r'apiJson\(\s*[`"]([a-z/]+)', script))
    assert {"ready", "search/text", "search/image", "images/", "evaluations"} <= called
    for relative in called:
        path = "/" + relative.rstrip("/")
        assert any(p == path or p.startswith(path + "/") for p in paths), path
