"""Hostile input: each test is the regression test of one defect of issue 11.

They send what a careless or hostile client sent to the running demo and check the
answer a client relies on: a 4xx problem with a stable code instead of a 500, no path
of the server's file system echoed, no series minted in /metrics, no request honoured
from a foreign host name or a foreign page.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.bundle import EncoderBundle
from tests.app.service_support import (
    is_problem,
    make_settings,
    noise_png,
    running_app,
    upload,
)

KEY = "k" * 24
LOOPBACK = ["localhost", "127.0.0.1", "[::1]"]


def _bare_client(tmp_path: Path, **extra: Any) -> TestClient:
    """An app whose lifespan is not run: the API answers 503, the guards still work."""
    settings = Settings(data_dir=tmp_path / "data", **extra)
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle) -> Any:
    settings = make_settings(tmp_path / "data", sqlite_url, bundle_dir)
    with running_app(settings, bundle) as client:
        response = upload(client, [noise_png(1)], labels='{"Cardiomegaly": 1}')
        assert response.status_code == 201, response.text
        yield client


# -- defect 10: /metrics series ------------------------------------------------------------


def test_unknown_methods_and_paths_share_one_metrics_label(tmp_path: Path) -> None:
    client = _bare_client(tmp_path)
    for number in range(5):
        client.request(f"FOO{number}", "/health")
        client.request("BREW", f"/pot-{number}")
        client.get(f"/random-{number}")
    lines = [
        line
        for line in client.app.state.metrics.render().decode().splitlines()  # type: ignore[attr-defined]
        if line.startswith("convirt_http_requests_total")
    ]
    assert not any("FOO" in line or "BREW" in line or "random-" in line for line in lines)
    assert 'convirt_http_requests_total{method="other",route="/health",status="405"} 5.0' in lines
    assert 'convirt_http_requests_total{method="other",route="unmatched",status="404"} 5.0' in lines
    assert 'convirt_http_requests_total{method="GET",route="unmatched",status="404"} 5.0' in lines


# -- defect 7: Host and Origin -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:8000", True),
        ("LOCALHOST", True),
        ("127.0.0.1:1234", True),
        ("[::1]:8000", True),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io:8000", False),
        ("localhost:80x", False),
    ],
)
def test_host_header_is_checked_against_the_allowed_hosts(
    tmp_path: Path, host: str, allowed: bool
) -> None:
    client = _bare_client(tmp_path, allowed_hosts=LOOPBACK)
    response = client.get("/", headers={"host": host})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        is_problem(response, 400, "host_not_allowed")
        # Probes that address the service by IP still get their answer.
        assert client.get("/health", headers={"host": host}).status_code == 200


def test_a_star_allows_any_host(tmp_path: Path) -> None:
    client = _bare_client(tmp_path, allowed_hosts=["*"])
    assert client.get("/", headers={"host": "api.example.org"}).status_code == 200


def test_default_allowed_hosts_are_loopback_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVIRT_ALLOWED_HOSTS", raising=False)
    assert Settings().allowed_hosts == LOOPBACK
    monkeypatch.setenv("CONVIRT_ALLOWED_HOSTS", "api.example.org, Localhost")
    assert Settings().allowed_hosts == ["api.example.org", "localhost"]


CROSS_ORIGIN: list[dict[str, str]] = [
    {"origin": "http://evil.example"},
    {"origin": "null"},
    {"origin": "http://localhost:9999"},
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site", "origin": "http://localhost:8000"},
]


@pytest.mark.parametrize("headers", CROSS_ORIGIN)
def test_anonymous_mode_refuses_unsafe_requests_from_other_origins(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    client = _bare_client(tmp_path)
    sent = {"host": "localhost:8000", **headers}
    for method, path in (("POST", "/images"), ("POST", "/evaluations"), ("DELETE", "/images/1")):
        response = client.request(method, path, headers=sent)
        is_problem(response, 403, "cross_origin_forbidden")
    # Reading is not refused: a cross-origin page cannot read the answer anyway (no CORS).
    assert client.get("/health", headers=sent).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"origin": "http://localhost:8000"},
        {"sec-fetch-site": "same-origin", "origin": "http://localhost:8000"},
        {"sec-fetch-site": "none"},
    ],
)
def test_same_origin_and_non_browser_requests_pass(tmp_path: Path, headers: dict[str, str]) -> None:
    client = _bare_client(tmp_path)
    response = client.post("/evaluations", json={}, headers={"host": "localhost:8000", **headers})
    # Past the guard: the (not started) service answers, not the origin check.
    is_problem(response, 503, "service_not_ready")


def test_a_valid_key_lets_another_origin_in(tmp_path: Path) -> None:
    client = _bare_client(tmp_path, api_keys=[KEY])
    foreign = {"host": "localhost:8000", "origin": "http://other.example"}
    is_problem(client.post("/evaluations", json={}, headers=foreign), 403, "cross_origin_forbidden")
    is_problem(
        client.post("/evaluations", json={}, headers={**foreign, "x-api-key": "x" * 24}),
        403,
        "cross_origin_forbidden",
    )
    keyed = client.post("/evaluations", json={}, headers={**foreign, "x-api-key": KEY})
    is_problem(keyed, 503, "service_not_ready")


# -- defect 11: headers, HEAD, offline docs ------------------------------------------------


def test_every_response_says_nosniff(tmp_path: Path) -> None:
    client = _bare_client(tmp_path)
    for response in (
        client.get("/health"),
        client.get("/ready"),
        client.get("/nope"),
        client.get("/openapi.json"),
        client.post("/search/text", json={"query": "x"}),
    ):
        assert response.headers.get("x-content-type-options") == "nosniff", response.url


def test_head_on_health_and_ready(tmp_path: Path) -> None:
    client = _bare_client(tmp_path)
    health = client.head("/health")
    assert health.status_code == 200
    assert health.content == b""
    # Not started: HEAD says so with the same status as GET.
    assert client.head("/ready").status_code == 503


def test_docs_work_offline(tmp_path: Path) -> None:
    client = _bare_client(tmp_path)
    page = client.get("/docs")
    assert page.status_code == 200
    assert "//" not in page.text.replace("<!doctype html>", ""), "the page loads nothing remote"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "http" not in csp
    for name, kind in (
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "css"),
        ("docs.js", "javascript"),
    ):
        assert f"docs/assets/{name}" in page.text
        asset = client.get(f"/docs/assets/{name}")
        assert asset.status_code == 200
        assert kind in asset.headers["content-type"]
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
    is_problem(client.get("/docs/assets/..%2Fsettings.py"), 404, "not_found")


def test_docs_assets_are_public_but_the_page_needs_the_key(tmp_path: Path) -> None:
    client = _bare_client(tmp_path, api_keys=[KEY])
    is_problem(client.get("/docs"), 401, "missing_api_key")
    assert client.get("/docs", headers={"x-api-key": KEY}).status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200


# -- defects 8 and 11: the 500s and the small defects, on a started service ---------------


def test_search_inputs_that_gave_500s(client: TestClient) -> None:
    def text(body: bytes) -> Any:
        return client.post(
            "/search/text", content=body, headers={"content-type": "application/json"}
        )

    is_problem(text(b'{"query": "chest \\ud800"}'), 422, "validation_error")
    is_problem(
        text(b'{"query": "x", "filters": {"labels": {"\\udfff": 1}}}'), 422, "validation_error"
    )
    many = {"query": "x", "filters": {"labels": {f"Label {i}": 1 for i in range(1000)}}}
    is_problem(client.post("/search/text", json=many), 422, "validation_error")
    form = client.post(
        "/search/image",
        files={"file": ("a.png", noise_png(2), "image/png")},
        data={"filters": "[" * 100_000},
    )
    is_problem(form, 422, "validation_error")


@pytest.mark.parametrize("route", ["/search/image", "/classify"])
def test_stored_image_requests_that_gave_500s(client: TestClient, route: str) -> None:
    # Ids outside 1..2**63-1 (the database's integer) and JSON nested past the parser's
    # recursion are the client's mistakes: 422, for a search and a classification alike.
    for image_id in (2**63, -(2**63) - 1, 2**70, 0):
        is_problem(client.post(route, json={"image_id": image_id}), 422, "validation_error")
    for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"image_id": ' + b"[" * 100_000 + b"}"):
        response = client.post(route, content=deep, headers={"content-type": "application/json"})
        is_problem(response, 422, "validation_error")
    # The largest valid id is merely absent.
    is_problem(client.post(route, json={"image_id": 2**63 - 1}), 404, "image_not_found")


def test_a_query_of_invisible_characters_is_empty(client: TestClient) -> None:
    for query in ("\u200b\u200c\u200d", "\ufeff \u2060", "\u200e\u200f\u00ad"):
        is_problem(client.post("/search/text", json={"query": query}), 422, "empty_query")
    # Visible text around them still searches.
    assert client.post("/search/text", json={"query": "\u200bedema"}).status_code == 200


def test_evaluation_list_offset_past_int64(client: TestClient) -> None:
    is_problem(client.get(f"/evaluations?offset={2**63}"), 422, "validation_error")
    last = client.get(f"/evaluations?offset={2**63 - 1}")
    assert last.status_code == 200
    assert last.json()["items"] == []


@pytest.mark.parametrize(
    "labels",
    [
        '{"Cardiomegaly": true}',
        '{"Cardiomegaly": "1"}',
        '{"Cardiomegaly": 2}',
        '{"Cardiomegaly": 0.5}',
        '{"\\ud800": 1}',
        '{"": 1}',
        '{"' + "L" * 65 + '": 1}',
        "{" + ", ".join(f'"L{i}": 1' for i in range(65)) + "}",
        "[" * 10_000,
    ],
)
def test_label_values_and_names_are_strict(client: TestClient, labels: str) -> None:
    response = upload(client, [noise_png(7)], labels=labels)
    is_problem(response, 422, "validation_error")


def test_a_megabyte_label_name_is_refused(client: TestClient) -> None:
    response = upload(client, [noise_png(8)], labels='{"' + "N" * 1_000_000 + '": 1}')
    is_problem(response, 422, "validation_error")
    # The boundary: 64 characters and the numbers 1, 0, -1 and null are accepted.
    labels = '{"' + "N" * 64 + '": 1, "A": 0, "B": -1, "C": null, "D": 1.0}'
    assert upload(client, [noise_png(9)], labels=labels).status_code == 201


def test_thumbnails_and_json_say_nosniff(client: TestClient) -> None:
    image = client.get("/images/1")
    assert image.headers["x-content-type-options"] == "nosniff"
    thumbnail = client.get("/images/1/thumbnail")
    assert thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.headers["x-content-type-options"] == "nosniff"
    assert client.head("/ready").status_code == 200


# -- defect 5: evaluation inputs confined to the evaluation roots -------------------------


def _manifest(folder: Path, image_paths: list[Path]) -> Path:
    from model.data.manifest import PairedRecord, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    records = [
        PairedRecord(path, report="", labels={"Pneumonia": 1.0}, patient_id=f"p{n}", study_id="s")
        for n, path in enumerate(image_paths)
    ]
    return write_manifest(records, folder / "manifest.csv")


def _manifest_run(manifest: str) -> dict[str, Any]:
    return {
        "protocol": "manifest",
        "manifest": manifest,
        "categories": ["Pneumonia"],
        "candidates_per_category": 1,
        "queries_per_category": 1,
    }


def test_evaluations_read_only_inside_the_roots(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    root = data / "evaluation"  # the default root
    secret = tmp_path / "elsewhere" / "secret-name.png"
    secret.parent.mkdir()
    secret.write_bytes(noise_png(3))
    inside = root / "inside.png"
    root.mkdir(parents=True)
    inside.write_bytes(noise_png(4))
    (root / "link.png").symlink_to(secret)
    (root / "link-dir").symlink_to(secret.parent)
    probing = _manifest(root / "probe", [inside, Path("/etc/hostname"), secret])
    via_link = _manifest(root / "via-link", [inside, root / "link.png"])
    outside_manifest = _manifest(tmp_path / "elsewhere" / "m", [inside, inside])
    settings = make_settings(data, sqlite_url, bundle_dir)
    assert settings.evaluation_roots == [root.resolve()]
    caplog.set_level(logging.DEBUG)
    with running_app(settings, bundle) as client:
        cases = [
            (_manifest_run(str(probing)), "path_outside_roots"),
            (_manifest_run(str(via_link)), "path_outside_roots"),
            (_manifest_run(str(outside_manifest)), "path_outside_roots"),
            (_manifest_run("/etc/passwd"), "path_outside_roots"),
            (_manifest_run("../../elsewhere/m/manifest.csv"), "path_outside_roots"),
            (_manifest_run("link-dir/m/manifest.csv"), "path_outside_roots"),
            (_manifest_run("probe/\x00manifest.csv"), "validation_error"),  # NUL: any text
            (_manifest_run("probe/\nmanifest.csv"), "invalid_path"),
            (_manifest_run("probe/\x1b[2Jmanifest.csv"), "invalid_path"),
            (_manifest_run("probe/" + "a" * 4000 + ".csv"), "invalid_path"),
            ({"protocol": "chexpert-8x200", "root": "/root"}, "path_outside_roots"),
            (
                {"protocol": "chexpert-8x200", "root": str(root), "protocol_dir": "/etc"},
                "path_outside_roots",
            ),
        ]
        for body, code in cases:
            response = client.post("/evaluations", json=body)
            is_problem(response, 422, code)
            for leaked in ("secret-name", "hostname", "/etc", "passwd", "elsewhere", "/root"):
                assert leaked not in response.text, (body, response.text)
        # The probe names the offending row, not the file.
        detail = client.post("/evaluations", json=_manifest_run(str(probing))).json()["detail"]
        assert detail.startswith("manifest record 2:")
        assert client.get("/evaluations").json()["total"] == 0
    for record in caplog.records:
        assert "secret-name" not in record.getMessage()
        assert "/etc/hostname" not in record.getMessage()


def test_relative_evaluation_paths_start_at_the_first_root(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    root = tmp_path / "evals"
    images = [root / "corpus" / f"{n}.png" for n in range(2)]
    images[0].parent.mkdir(parents=True)
    for n, path in enumerate(images):
        path.write_bytes(noise_png(20 + n))
    _manifest(root / "corpus", images)
    settings = make_settings(tmp_path / "data", sqlite_url, bundle_dir, evaluation_roots=[root])
    with running_app(settings, bundle) as client:
        body = {**_manifest_run("corpus/manifest.csv"), "backbone": False, "ks": [1]}
        response = client.post("/evaluations", json=body)
        assert response.status_code == 202, response.text
        assert client.app.state.evaluations.wait(120)  # type: ignore[attr-defined]


# -- defect 11: truncated DICOMs and decoder messages -------------------------------------


def _png_with_ihdr(color_type: int, bit_depth: int) -> bytes:
    """A complete PNG (valid CRCs, IDAT, IEND) whose header no decoder accepts."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", 64, 64, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 20))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
def test_a_dicom_missing_its_last_byte_is_corrupt(client: TestClient, name: str) -> None:
    from pydicom.data import get_testdata_file

    data = Path(str(get_testdata_file(name))).read_bytes()
    for cut in (1, 2, 7):
        is_problem(upload(client, [data[:-cut]]), 422, "corrupt_image")
    # The whole file is still accepted.
    assert upload(client, [data]).status_code == 201


def test_decoder_errors_name_no_python_objects(client: TestClient) -> None:
    response = upload(client, [_png_with_ihdr(color_type=1, bit_depth=8)])
    is_problem(response, 422, "corrupt_image")
    detail = response.json()["detail"]
    assert "object at 0x" not in detail
    assert "BytesIO" not in detail
    assert detail.startswith("cannot decode PNG")


# -- defect 6: log injection ---------------------------------------------------------------


def test_logged_user_text_cannot_forge_records() -> None:
    import io

    from app.logsafe import LOG_FORMAT, SafeFormatter, escape_control

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    log = logging.getLogger("tests.hostile.logsafe")
    log.addHandler(handler)
    log.propagate = False
    try:
        forged = "a.csv\n2026-11-30 10:00:00,000 CRITICAL app: forged\r\x00\x1b[31m\u2028end"
        log.warning("read %s", forged)
        log.warning(forged)
        try:
            raise ValueError(f"bad path {forged}")
        except ValueError:
            log.exception("failed on %s", forged)
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    # Every line starts a record of our own or is an indented traceback line.
    records = [line for line in lines if not line.startswith("    ")]
    assert len(records) == 3, lines
    assert all(" WARNING " in r or " ERROR " in r for r in records)
    assert not any(line.startswith("2026-11-30 10:00:00,000 CRITICAL") for line in lines)
    text = stream.getvalue()
    assert "\x00" not in text
    assert "\x1b" not in text
    assert "\\n2026-11-30" in records[0]
    assert "\\x00\\x1b[31m\\u2028end" in records[0]
    assert escape_control("plain text ü") == "plain text ü"
    assert escape_control("\ud800") == "\\ud800"


def test_the_command_line_logs_through_the_safe_formatter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.cli import main as cli_main
    from app.logsafe import SafeFormatter

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    # `convirt serve` refuses at once (no key, open address): logging is set up by then.
    assert cli_main(["serve", "--host", "0.0.0.0", "--data-dir", "/nonexistent/x"]) == 2
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, SafeFormatter)


# -- defect 11: `convirt ingest` logs no file names ---------------------------------------


@pytest.mark.parametrize("log_paths", [False, True])
def test_ingest_logs_positions_not_file_names(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    log_paths: bool,
) -> None:
    from app.cli import main as cli_main

    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(noise_png(30))
    (folder / "b-DOE_JOHN_1234567.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    if log_paths:
        monkeypatch.setenv("CONVIRT_LOG_PATHS", "true")
    args = ["ingest", str(folder), "--no-progress", "--data-dir", str(tmp_path / "data")]
    args += ["--database-url", sqlite_url, "--bundle-dir", str(bundle_dir)]
    caplog.set_level(logging.INFO)
    assert cli_main(args) == 1
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    failures = [m for m in failures if "corrupt_image" in m]
    assert len(failures) == 1, failures
    if log_paths:
        assert "DOE_JOHN_1234567" in failures[0]
    else:
        assert "DOE_JOHN" not in caplog.text
        assert failures[0].startswith("file 2 (path sha256 ")


def test_a_report_that_is_not_utf8_is_refused(client: TestClient) -> None:
    latin1 = "Kardiomegalie, Pleuraergu\u00df".encode("latin-1")
    response = client.post(
        "/images",
        files=[
            ("files", ("a.png", noise_png(40), "image/png")),
            ("report_text", (None, latin1)),
        ],
    )
    is_problem(response, 422, "invalid_text_encoding")
    assert "report_text" in response.json()["detail"]
    # The same text in UTF-8 is stored as written.
    utf8 = client.post(
        "/images",
        files=[
            ("files", ("a.png", noise_png(40), "image/png")),
            ("report_text", (None, "Kardiomegalie, Pleuraergu\u00df".encode())),
        ],
    )
    assert utf8.status_code == 201, utf8.text
    image_id = utf8.json()["results"][0]["id"]
    assert (
        client.get(f"/images/{image_id}").json()["report_text"] == "Kardiomegalie, Pleuraergu\u00df"
    )


def test_nul_in_stored_or_searched_text_is_refused_on_both_backends(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    # PostgreSQL cannot hold NUL in text or JSON: each of these was a 500 there.
    settings = make_settings(tmp_path / "data", database_url, bundle_dir)
    with running_app(settings, bundle) as client:
        for field in ("report_text", "study_ref", "view_position"):
            fields: dict[str, Any] = {field: "a\x00b"}
            response = upload(client, [noise_png(50)], **fields)
            is_problem(response, 422, "invalid_text_encoding")
            assert field in response.json()["detail"]
        is_problem(
            upload(client, [noise_png(51)], labels='{"a\\u0000": 1}'), 422, "validation_error"
        )
        for filters in ({"view_position": ["P\x00A"]}, {"labels": {"a\x00": 1}}):
            response = client.post("/search/text", json={"query": "x", "filters": filters})
            is_problem(response, 422, "validation_error")
        is_problem(client.post("/search/text", json={"query": "x\x00y"}), 422, "validation_error")
        assert client.get("/images/1").status_code == 404  # nothing was stored
        # The same fields without NUL are stored.
        ok = upload(client, [noise_png(52)], report_text="a b", study_ref="s-1", view_position="PA")
        assert ok.status_code == 201, ok.text
