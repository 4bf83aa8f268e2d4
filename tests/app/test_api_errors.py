"""Bad input through HTTP: every case is a 4xx problem+json with its code, nothing changes.

After each bad request the database rows, the indexed ids and the stored files are
exactly what they were before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from model.bundle import EncoderBundle
from tests.app.service_support import (
    db_state,
    is_problem,
    make_settings,
    noise_png,
    running_app,
    runtime_of,
    upload,
)

MAX_UPLOAD = 64 * 1024
KEY = "k" * 8 + "0123456789abcdef"
OTHER_KEY = "z" * 24


@pytest.fixture
def client(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path / "data",
        database_url,
        bundle_dir,
        max_upload_bytes=MAX_UPLOAD,
        max_query_chars=200,
        k_max=50,
    )
    with running_app(settings, bundle) as client:
        assert upload(client, [noise_png(1), noise_png(2)]).status_code == 201
        yield client


def _snapshot(client: TestClient) -> tuple[Any, ...]:
    runtime = runtime_of(client)
    files = sorted(p.relative_to(runtime.store.root) for p in runtime.store.root.rglob("*.png"))
    return db_state(runtime), runtime.index.ids().tolist(), files


def _corrupt_dicom() -> bytes:
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert path is not None
    # The header of a real radiograph, cut off inside its pixel data.
    return Path(path).read_bytes()[:2000]


def test_bad_uploads(client: TestClient) -> None:
    before = _snapshot(client)
    is_problem(upload(client, [_corrupt_dicom()]), 422, "corrupt_image")
    is_problem(upload(client, [b"name,age\nx,1\n"], content_type="text/csv"), 415, "not_an_image")
    is_problem(upload(client, [b""]), 415, "not_an_image")
    is_problem(upload(client, [noise_png(7, size=(1, 1))]), 422, "image_too_small")
    is_problem(upload(client, [noise_png(8, size=(31, 100))]), 422, "image_too_small")
    # The files failing differently: one problem naming each.
    mixed = upload(client, [_corrupt_dicom(), b"plain text"])
    is_problem(mixed, 422, "upload_failed")
    assert "file 0: corrupt_image" in mixed.json()["detail"]
    # Not a multipart upload at all.
    is_problem(client.post("/images", json={"files": []}), 415, "unsupported_media_type")
    is_problem(
        client.post("/images", content=noise_png(3), headers={"content-type": "image/png"}),
        415,
        "unsupported_media_type",
    )
    # Multipart without files.
    is_problem(client.post("/images", files={"report_text": (None, "x")}), 422, "validation_error")
    is_problem(upload(client, [noise_png(4)], labels="{not json"), 422, "validation_error")
    is_problem(upload(client, [noise_png(5)], labels='{"Edema": 7}'), 422, "validation_error")
    assert _snapshot(client) == before


def test_oversized_upload_is_413(client: TestClient) -> None:
    before = _snapshot(client)
    big = noise_png(6, size=(400, 400))
    assert len(big) > MAX_UPLOAD
    is_problem(upload(client, [big]), 413, "payload_too_large")
    # Without a Content-Length (chunked): the bytes are counted as they arrive.
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = client.post(
        "/images",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    is_problem(response, 413, "payload_too_large")
    assert _snapshot(client) == before


def test_bad_text_queries(client: TestClient) -> None:
    before = _snapshot(client)
    is_problem(client.post("/search/text", json={"query": "", "k": 5}), 422, "empty_query")
    is_problem(client.post("/search/text", json={"query": " \n\t "}), 422, "empty_query")
    is_problem(client.post("/search/text", json={"query": "x" * 201}), 422, "query_too_long")
    is_problem(client.post("/search/text", json={"query": "edema", "k": 0}), 422, "invalid_k")
    is_problem(client.post("/search/text", json={"query": "edema", "k": 51}), 422, "invalid_k")
    is_problem(
        client.post("/search/text", json={"query": "edema", "k": "ten"}), 422, "validation_error"
    )
    is_problem(client.post("/search/text", json={"k": 5}), 422, "validation_error")
    is_problem(client.post("/search/text", json={"query": 5}), 422, "validation_error")
    is_problem(
        client.post("/search/text", json={"query": "edema", "filters": {"labels": {}}}),
        422,
        "validation_error",
    )
    is_problem(
        client.post(
            "/search/text", content=b"{bad json", headers={"content-type": "application/json"}
        ),
        422,
        "validation_error",
    )
    # Bodies that are not JSON text at all get the same answer as a syntax error: bytes
    # that are not UTF-8, and nesting deeper than the parser's recursion.
    for unparseable in (b'{"query": "\xff\xfe"}', b"[" * 30_000 + b"]" * 30_000):
        for path in ("/search/text", "/evaluations"):
            sent = client.post(
                path, content=unparseable, headers={"content-type": "application/json"}
            )
            is_problem(sent, 422, "validation_error")
            assert sent.json()["errors"][0]["type"] == "json_invalid"
    # JSON sent as a form (curl -d's default), as plain text or untyped: 415, not a 422
    # about fields the client did send.
    for headers in (
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "text/plain"},
        {},
    ):
        sent = client.post("/search/text", content=b'{"query": "edema"}', headers=headers)
        is_problem(sent, 415, "unsupported_media_type")
    # A charset parameter is fine.
    sent = client.post(
        "/search/text",
        content=b'{"query": "edema"}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert sent.status_code == 200, sent.text
    # The limits themselves are allowed.
    assert client.post("/search/text", json={"query": "x" * 200, "k": 50}).status_code == 200
    assert _snapshot(client) == before


def test_unknown_ids_and_routes(client: TestClient) -> None:
    before = _snapshot(client)
    is_problem(client.get("/images/987654"), 404, "image_not_found")
    is_problem(client.get("/images/987654/thumbnail"), 404, "image_not_found")
    is_problem(client.delete("/images/987654"), 404, "image_not_found")
    is_problem(client.get("/images/abc"), 422, "validation_error")
    is_problem(client.get("/images/0"), 422, "validation_error")
    is_problem(client.get("/nowhere"), 404, "not_found")
    is_problem(client.put("/images/1"), 405, "method_not_allowed")
    assert _snapshot(client) == before


def test_api_keys(tmp_path: Path, bundle_dir: Path, bundle: EncoderBundle) -> None:
    settings = make_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'k.db'}", bundle_dir, api_keys=[KEY, OTHER_KEY]
    )
    with running_app(settings, bundle) as client:
        # Open without a key: liveness and readiness only.
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for method, path in [
            ("POST", "/search/text"),
            ("POST", "/search/image"),
            ("POST", "/images"),
            ("GET", "/images/1"),
            ("GET", "/images/1/thumbnail"),
            ("DELETE", "/images/1"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
        ]:
            response = client.request(method, path, json={"query": "edema"})
            is_problem(response, 401, "missing_api_key")
            assert response.headers["www-authenticate"].startswith("Bearer")
        body = {"query": "edema", "k": 3}
        is_problem(
            client.post("/search/text", json=body, headers={"X-API-Key": KEY[:-1] + "X"}),
            401,
            "invalid_api_key",
        )
        is_problem(
            client.post("/search/text", json=body, headers={"Authorization": "Basic " + KEY}),
            401,
            "missing_api_key",
        )
        assert client.post("/search/text", json=body, headers={"X-API-Key": KEY}).status_code == 200
        assert (
            client.post(
                "/search/text", json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"}
            ).status_code
            == 200
        )
        assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
        assert db_state(runtime_of(client))[0] == 0


def test_not_ready_without_a_bundle(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data", f"sqlite:///{tmp_path / 'n.db'}", tmp_path / "no-bundle-here"
    )
    with running_app(settings, None) as client:
        assert client.get("/health").json() == {"status": "ok"}
        response = client.get("/ready")
        is_problem(response, 503, "service_not_ready")
        assert "bundle" in response.json()["detail"].lower()
        is_problem(client.post("/search/text", json={"query": "edema"}), 503, "service_not_ready")
        is_problem(upload(client, [noise_png(9)]), 503, "service_not_ready")
