"""problem+json responses of a real FastAPI app with the service's handlers installed."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import pytest
from fastapi import FastAPI, HTTPException, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from app.api.problems import (
    MODEL_ERROR_STATUS,
    PROBLEM_MEDIA_TYPE,
    Problem,
    install_problem_handlers,
    problem_responses,
)
from app.errors import ProblemError, ProblemFieldError
from index.errors import IndexCorruptError, InvalidInputError
from model.errors import ModelError
from model.inputs.decode import (
    ColorDicomError,
    CorruptImageError,
    ImageTooLargeError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedTransferSyntaxError,
)

SECRET = "postgresql://admin:hunter2@db/prod"


class SearchBody(BaseModel):
    query: str = Field(min_length=1, max_length=20)
    k: int = Field(default=10, ge=1, le=100)


def _app(status_by_code: dict[str, int] | None = None) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app, status_by_code=status_by_code)

    @app.get("/images/{image_id}", responses=problem_responses(404))
    def get_image(image_id: int) -> dict[str, int]:
        if image_id != 1:
            raise ProblemError(404, "image_not_found", f"no image with id {image_id}")
        return {"id": 1}

    @app.get("/busy")
    def busy() -> None:
        raise ProblemError(
            409,
            "evaluation_running",
            "an evaluation is already running",
            headers={"Retry-After": "30"},
        )

    @app.post("/decode/{kind}")
    def decode(kind: str) -> None:
        errors: dict[str, ModelError] = {
            "not_an_image": NotAnImageError("neither DICOM, PNG nor JPEG"),
            "corrupt": CorruptImageError("the PNG stream is truncated"),
            "no_pixels": NoPixelDataError("the DICOM has no PixelData"),
            "multi_frame": MultiFrameError("the DICOM has 3 frames"),
            "color": ColorDicomError("the DICOM is RGB"),
            "syntax": UnsupportedTransferSyntaxError("JPEG-LS is not decodable here"),
            "too_large": ImageTooLargeError("40000 x 40000 pixels is over the limit"),
            "bundle": ModelError(f"cannot read {SECRET}", code="bundle_corrupt"),
            "custom": ModelError("the sentence is empty", code="empty_sentence"),
        }
        raise errors[kind]

    @app.get("/index/{kind}")
    def index_error(kind: str) -> None:
        if kind == "k":
            raise InvalidInputError("k=5000 exceeds the 1000 vectors", code="k_out_of_range")
        if kind == "corrupt":
            raise IndexCorruptError(f"checksum of {SECRET}/index.faiss differs")
        raise InvalidInputError(f"vectors of {SECRET} have dim 3", code="dim_mismatch")

    @app.post("/search")
    def search(body: SearchBody, page: Annotated[int, Query(ge=1)] = 1) -> dict[str, Any]:
        return {"query": body.query, "k": body.k, "page": page}

    @app.get("/too-big")
    def too_big() -> None:
        raise HTTPException(413, "the upload exceeds 50 MiB")

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError(f"connection to {SECRET} lost")

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(_app())


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    Problem.model_validate(body)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:convirt:problem:{code}"
    assert body["title"]
    return body


def test_problem_error_carries_status_code_detail_and_instance(client: TestClient) -> None:
    assert client.get("/images/1").json() == {"id": 1}
    body = _problem(client.get("/images/7"), 404, "image_not_found")
    assert body["detail"] == "no image with id 7"
    assert body["title"] == "Not Found"
    assert body["instance"] == "/images/7"
    assert "errors" not in body


def test_problem_error_headers_are_sent(client: TestClient) -> None:
    response = client.get("/busy")
    _problem(response, 409, "evaluation_running")
    assert response.headers["retry-after"] == "30"


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("not_an_image", 415, "not_an_image"),
        ("corrupt", 422, "corrupt_image"),
        ("no_pixels", 422, "no_pixel_data"),
        ("multi_frame", 422, "multi_frame"),
        ("color", 422, "color_dicom"),
        ("syntax", 422, "unsupported_transfer_syntax"),
        ("too_large", 422, "image_too_large"),
        ("custom", 422, "empty_sentence"),
    ],
)
def test_decode_errors_map_to_415_or_422_with_their_message(
    client: TestClient, kind: str, status: int, code: str
) -> None:
    body = _problem(client.post(f"/decode/{kind}"), status, code)
    assert body["detail"]
    assert MODEL_ERROR_STATUS.get(code, 422) == status


def test_service_side_model_error_is_a_500_without_details(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.api.problems"):
        body = _problem(client.post("/decode/bundle"), 500, "internal_error")
    assert "hunter2" not in str(body)
    assert "hunter2" in caplog.text  # the operator still sees what happened


def test_status_overrides_per_code() -> None:
    client = TestClient(_app(status_by_code={"empty_sentence": 400, "dim_mismatch": 503}))
    _problem(client.post("/decode/custom"), 400, "empty_sentence")
    _problem(client.get("/index/dim"), 503, "dim_mismatch")


def test_index_errors_by_code_hiding_server_side_messages(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = _problem(client.get("/index/k"), 422, "k_out_of_range")
    assert "5000" in body["detail"]

    with caplog.at_level(logging.ERROR, logger="app.api.problems"):
        corrupt = _problem(client.get("/index/corrupt"), 503, "checksum_mismatch")
        internal = _problem(client.get("/index/dim"), 500, "dim_mismatch")
    for problem in (corrupt, internal):
        assert "hunter2" not in str(problem)
    assert "checksum_mismatch" in caplog.text


def test_validation_errors_list_each_field(client: TestClient) -> None:
    response = client.post("/search?page=0", json={"query": "", "k": 5000})
    body = _problem(response, 422, "validation_error")
    errors = [ProblemFieldError.model_validate(e) for e in body["errors"]]
    by_loc = {tuple(e.loc): e for e in errors}
    assert set(by_loc) == {("body", "query"), ("body", "k"), ("query", "page")}
    assert by_loc[("body", "k")].type == "less_than_equal"
    assert by_loc[("body", "k")].ctx == {"le": 100}
    assert by_loc[("body", "query")].type == "string_too_short"
    # The submitted values are not echoed back.
    assert "input" not in response.text


def test_malformed_json_is_a_validation_problem(client: TestClient) -> None:
    response = client.post(
        "/search", content=b"{not json", headers={"content-type": "application/json"}
    )
    body = _problem(response, 422, "validation_error")
    assert body["errors"][0]["type"] == "json_invalid"


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    _problem(client.get("/nowhere"), 404, "not_found")
    response = client.delete("/search")
    _problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_http_exception_keeps_status_and_detail(client: TestClient) -> None:
    body = _problem(client.get("/too-big"), 413, "payload_too_large")
    assert body["detail"] == "the upload exceeds 50 MiB"


def test_unexpected_exception_is_a_500_with_a_reference_only(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.api.problems"):
        response = client.get("/crash")
    body = _problem(response, 500, "internal_error")
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text
    assert "Traceback" not in response.text
    reference = body["instance"].removeprefix("urn:uuid:").replace("-", "")
    assert reference in body["detail"]
    assert reference in caplog.text
    assert "hunter2" in caplog.text


def test_openapi_documents_problem_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert set(components["Problem"]["required"]) == {"type", "title", "status", "code"}
    assert "ProblemFieldError" in components
    assert "HTTPValidationError" not in components
    problem = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    get_image = schema["paths"]["/images/{image_id}"]["get"]["responses"]
    assert get_image["404"]["content"] == problem
    assert get_image["422"]["content"] == problem  # FastAPI's automatic validation response
    assert "application/json" in get_image["200"]["content"]
