"""Memory bounds of the service: inputs shaped to blow up memory are refused or bounded."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.services.budget import BusyError, PixelBudget
from app.services.runtime import IMAGE_WORK_NICE
from model.bundle import EncoderBundle
from tests.app.service_support import (
    assert_consistent,
    db_state,
    is_problem,
    make_settings,
    noise_png,
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


@pytest.mark.parametrize("shape", [(1, 6000), (6000, 1), (100, 401), (1, 2**25)])
def test_strips_are_refused_by_image_search_and_upload(
    client: TestClient, shape: tuple[int, int]
) -> None:
    # A 1 × 6000 PNG is a few kilobytes; framed for the model as it was it took 2.3 GB.
    # 1 × 2²⁵ is also over the pixel budget: the strip is still named for what it is.
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


NOISE_PIXELS = 96 * 80  # noise_png's default size


def test_a_multi_file_upload_is_processed_in_batches_within_the_budget(
    tmp_path: Path,
    sqlite_url: str,
    bundle_dir: Path,
    bundle: EncoderBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Room for two decoded images at a time: five files take three steps.
    settings = make_settings(
        tmp_path / "data", sqlite_url, bundle_dir, decode_pixel_budget=2 * NOISE_PIXELS
    )
    with running_app(settings, bundle) as client:
        runtime = runtime_of(client)
        held: list[int] = []
        encoded: list[int] = []
        real_encode = runtime.ingest.encode

        def encode(items: Any) -> Any:
            held.append(runtime.ingest.budget.in_use)
            encoded.append(len(items))
            return real_encode(items)

        monkeypatch.setattr(runtime.ingest, "encode", encode)
        response = upload(client, [noise_png(seed) for seed in range(5)])
        assert response.status_code == 201
        assert response.json()["created"] == 5
        assert encoded == [2, 2, 1]
        assert max(held) <= 2 * NOISE_PIXELS
        assert runtime.ingest.budget.in_use == 0
        assert_consistent(runtime)


def test_an_image_larger_than_the_whole_budget_is_refused_not_queued(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(
        tmp_path / "data", sqlite_url, bundle_dir, decode_pixel_budget=NOISE_PIXELS - 1
    )
    with running_app(settings, bundle) as client:
        big = noise_png(1)
        is_problem(upload(client, [big]), 422, "image_too_large")
        found = client.post("/search/image", files={"file": ("q.png", big, "image/png")})
        is_problem(found, 422, "image_too_large")
        small = noise_png(2, size=(40, 40))
        mixed = upload(client, [big, small]).json()
        assert [r["status"] for r in mixed["results"]] == ["failed", "created"]


def test_requests_beyond_the_budget_wait_then_get_503_busy(
    tmp_path: Path, sqlite_url: str, bundle_dir: Path, bundle: EncoderBundle
) -> None:
    settings = make_settings(
        tmp_path / "data",
        sqlite_url,
        bundle_dir,
        decode_pixel_budget=NOISE_PIXELS,
        decode_wait_s=0.3,
    )
    with running_app(settings, bundle) as client:
        budget = runtime_of(client).ingest.budget
        # Another request holds the whole budget for longer than this one may wait.
        with budget.reserve(NOISE_PIXELS):
            busy = upload(client, [noise_png(1)])
            found = client.post(
                "/search/image", files={"file": ("q.png", noise_png(2), "image/png")}
            )
            text = client.post("/search/text", json={"query": "effusion", "k": 3})
        for response in (busy, found):
            is_problem(response, 503, "busy")
            assert response.headers["retry-after"] == "5"
        assert text.status_code == 200  # text searches need no pixels
        assert db_state(runtime_of(client))[0] == 0
        assert upload(client, [noise_png(1)]).status_code == 201


def test_the_budget_serves_waiters_in_order_and_times_out() -> None:
    budget = PixelBudget(10, wait_s=30.0)
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with budget.reserve(8):
            first_in.set()
            release.wait(30)
        order.append("holder out")

    def waiter() -> None:
        with budget.reserve(5):
            order.append("waiter in")

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    threads[0].start()
    assert first_in.wait(30)
    threads[1].start()
    release.set()
    for thread in threads:
        thread.join(30)
    assert order == ["holder out", "waiter in"]
    assert budget.in_use == 0
    with pytest.raises(ValueError, match="exceed the whole budget"), budget.reserve(11):
        pass
    tight = PixelBudget(4, wait_s=0.05)
    with tight.reserve(4), pytest.raises(BusyError), tight.reserve(1):
        pass


def test_image_work_runs_below_the_priority_of_text_searches(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    nice: dict[str, int] = {}

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    real_encode, real_texts = runtime.ingest.encode, runtime.bundle.encode_texts

    def encode_images(items: Any) -> Any:
        nice["image"] = priority()
        return real_encode(items)

    def encode_texts(texts: Any) -> Any:
        nice["text"] = priority()
        return real_texts(texts)

    monkeypatch.setattr(runtime.ingest, "encode", encode_images)
    monkeypatch.setattr(runtime.bundle, "encode_texts", encode_texts)
    assert upload(client, [noise_png(5)]).status_code == 201
    assert client.post("/search/text", json={"query": "effusion", "k": 1}).status_code == 200
    assert nice["image"] == nice["text"] + IMAGE_WORK_NICE
