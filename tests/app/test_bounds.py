"""Memory bounds of the service: inputs shaped to blow up memory are refused or bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.bundle import EncoderBundle
from tests.app.service_support import (
    db_state,
    is_problem,
    make_settings,
    png_bytes,
    running_app,
    runtime_of,
    upload,
)


@pytest.fixture
def client(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", sqlite_url, bundle_dir)
    with running_app(settings, bundle) as client:
        yield client


@pytest.mark.parametrize("shape", [(1, 6000), (6000, 1), (100, 401)])
def test_strips_are_refused_by_image_search_and_upload(
    client: TestClient, shape: tuple[int, int]
) -> None:
    # A 1 × 6000 PNG is a few kilobytes; framed for the model as it was it took 2.3 GB.
    strip = png_bytes(np.full(shape, 128, np.uint8))
    found = client.post("/search/image", files={"file": ("s.png", strip, "image/png")})
    is_problem(found, 422, "aspect_ratio_out_of_range")
    stored = upload(client, [strip])
    is_problem(stored, 422, "aspect_ratio_out_of_range")
    assert db_state(runtime_of(client))[0] == 0


def test_a_long_leg_film_proportion_is_accepted(client: TestClient) -> None:
    # 1:3.9, within the 4:1 default: long-leg and scoliosis films are this shape.
    film = png_bytes(np.random.default_rng(0).integers(0, 256, (390, 100), dtype=np.uint8))
    assert upload(client, [film]).status_code == 201
