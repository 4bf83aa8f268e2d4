"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis).

Every operation of ``/openapi.json`` gets generated requests, valid and invalid (fixed seed,
bounded examples per operation), against an in-process app on a real bundle with a few
stored images, on SQLite and on PostgreSQL (which refuses text SQLite stores, e.g. NUL).
Each response must:

- not be a 5xx;
- conform to the document: a documented status, media type, headers and body schema;
- be ``application/problem+json`` with a ``code`` when it is an error.

A failure names the operation and the request that broke it; schemathesis shrinks it first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from model.bundle import EncoderBundle  # noqa: E402
from tests.app.service_support import noise_png  # noqa: E402

#: Generated requests per operation, mode (valid, then invalid ones) and database backend.
EXAMPLES_PER_OPERATION = 50
#: The service's API key: sent with every case; schemathesis also tries without it.
KEY = "fuzz-" + "k" * 20

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)


@pytest.fixture
def api_schema(
    tmp_path: Path, database_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[Any]:
    """The app's document, loaded from the app, on each database backend."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        bundle_dir=bundle_dir,
        api_keys=[KEY],
    )
    app = create_app(settings, bundle=bundle)
    # Loading the document starts the app's lifespan; it is stopped after the test.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": KEY})
    with asgi.get_client(cast(Any, app)) as client:
        for seed in range(4):
            response = client.post(
                f"http://{asgi.HOST}/images",
                files={"files": (f"{seed}.png", noise_png(seed), "image/png")},
                data={"labels": json.dumps({"Pneumonia": seed % 2, "No Finding": 1 - seed % 2})},
                headers={"X-API-Key": KEY},
            )
            assert response.status_code == 201, response.text
    yield schema
    asgi.shutdown_lifespans()


@schemathesis.check
def errors_are_problems(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is ``application/problem+json`` whose body has the status and a code."""
    if response.status_code < 400:
        return None
    media_type = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    assert media_type == "application/problem+json", f"error served as {media_type!r}"
    body = response.json()
    assert body.get("status") == response.status_code, body
    assert isinstance(body.get("code"), str), body
    assert body["code"], body
    return True


#: What every response is checked for. ``positive_data_acceptance`` is left out on purpose:
#: a request can fit the schema and still be impossible (an evaluation over categories
#: the service holds no images of): a 422 there is the right answer, not a lie.
CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
    errors_are_problems,
]


def _fuzz(operation: Any, mode: Any) -> int:
    """Run the generated cases of one operation in one mode; the number of calls made."""
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,  # the fixed seed: the same requests on every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # An operation with no parameters has no invalid requests to make.
        assert mode == GenerationMode.NEGATIVE, operation.label
    return calls


def test_api_conforms_to_its_document(api_schema: Any) -> None:
    start = time.perf_counter()
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, "the document lost operations"
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                calls += _fuzz(operation, mode)
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    logger.info(
        "fuzzed %d operations with %d requests in %.1f s (load %.2f)",
        len(operations),
        calls,
        time.perf_counter() - start,
        os.getloadavg()[0],
    )
    assert not failures, "\n\n".join(failures)
