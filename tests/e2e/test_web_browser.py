"""The web page in a real headless Chromium against a live service with an API key.

A user enters the key, searches by text and by an example image, opens a result's details,
and sees the service's error messages when something is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LiveService, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Milliseconds a page may take for one search on a busy 2-core machine.
WAIT_MS = 60_000


def open_page(page: Any, service: LiveService, *, key: str | None) -> None:
    """Load the page with ``key`` saved in the browser (None: no key saved)."""
    page.goto(service.base_url + "/")
    page.evaluate(
        "k => k ? localStorage.setItem('convirt.apiKey', k) "
        ": localStorage.removeItem('convirt.apiKey')",
        key,
    )
    page.reload()
    page.wait_for_selector("#service-status[data-state='ready']", timeout=WAIT_MS)


def result_ids(page: Any) -> list[int]:
    return [
        int(v)
        for v in page.locator(".result-button").evaluate_all(
            "buttons => buttons.map(b => b.dataset.imageId)"
        )
    ]


def alert_text(page: Any) -> str:
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible", timeout=WAIT_MS)
    text: str = alert.inner_text()
    return text


def test_text_search_shows_results_and_details(page: Any, live_service: LiveService) -> None:
    open_page(page, live_service, key=None)
    # Without a key the page says so at once (loading the evaluations needs one) and opens
    # the key form; the key entered there is saved and sent with every request.
    assert "API key" in alert_text(page)
    assert page.locator("#settings").get_attribute("open") is not None
    page.get_by_label(re.compile("API key \\(kept")).fill(live_service.api_key)
    page.get_by_role("button", name="Save key").click()
    assert page.evaluate("localStorage.getItem('convirt.apiKey')") == live_service.api_key
    assert page.get_by_role("alert").is_hidden()

    page.get_by_label("Describe a finding").fill("moderate right pleural effusion")
    page.get_by_role("button", name="Search", exact=True).click()
    cards = page.locator(".result-button")
    cards.first.wait_for(timeout=WAIT_MS)
    n = len(live_service.ids)
    assert cards.count() == n  # k = 12 > the 10 stored studies
    assert sorted(result_ids(page)) == sorted(live_service.ids)

    scores = [float(s) for s in page.locator(".result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    summary = page.locator("#results-summary").inner_text()
    assert f"{n} closest studies" in summary

    # Thumbnails come through fetch with the key, as blob URLs that the browser decoded.
    page.wait_for_function(
        "() => [...document.querySelectorAll('.result img')]"
        ".every(img => img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0)",
        timeout=WAIT_MS,
    )
    # Each card's chips are the study's positive labels.
    first = result_ids(page)[0]
    study = live_service.ids[first]
    positives = sorted(name for name, value in study.labels.items() if value == 1.0)
    chips = page.locator(".result").first.locator(".chip").all_inner_texts()
    assert sorted(chips) == positives

    page.screenshot(path=str(screenshot_dir() / "text-search.png"), full_page=True)

    cards.first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for(state="visible", timeout=WAIT_MS)
    assert dialog.locator("#detail-title").inner_text() == f"Image {first}"
    report = dialog.locator("#detail-report").inner_text()
    assert " ".join(report.split()) == " ".join(study.report.split())
    assert study.study_id in dialog.locator("#detail-meta").inner_text()
    page.wait_for_function(
        "() => document.querySelector('#detail-image').src.startsWith('blob:')", timeout=WAIT_MS
    )
    page.screenshot(path=str(screenshot_dir() / "detail.png"))

    # "Find similar" searches with the stored image: itself is left out of its hits.
    dialog.get_by_role("button", name="Find similar images").click()
    page.wait_for_function(
        f"() => document.querySelectorAll('.result-button').length === {n - 1}", timeout=WAIT_MS
    )
    assert first not in result_ids(page)
    assert page.errors == []


def test_upload_searches_by_example_image(page: Any, live_service: LiveService) -> None:
    open_page(page, live_service, key=live_service.api_key)
    image_id, study = next(iter(live_service.ids.items()))
    page.locator("#file").set_input_files(str(study.image_path))
    page.locator(".result-button").first.wait_for(timeout=WAIT_MS)
    # The same pixels as a stored image: that image is the closest, at similarity 1.
    assert result_ids(page)[0] == image_id
    best = float(page.locator(".result .score").first.inner_text())
    assert best == pytest.approx(1.0, abs=2e-3)
    assert study.image_path.name in page.locator("#results-summary").inner_text()
    assert page.get_by_role("alert").is_hidden()
    page.screenshot(path=str(screenshot_dir() / "image-search.png"), full_page=True)
    assert page.errors == []


def test_errors_are_shown_not_swallowed(
    page: Any, live_service: LiveService, tmp_path: Path
) -> None:
    open_page(page, live_service, key=live_service.api_key)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image, just notes\n", encoding="utf-8")
    with live_service.client() as client:
        expected = client.post(
            "/search/image", files={"file": ("notes.txt", text_file.read_bytes(), "text/plain")}
        ).json()
    assert expected["code"] == "not_an_image"

    page.locator("#file").set_input_files(str(text_file))
    shown = alert_text(page)
    assert expected["title"] in shown
    assert expected["detail"] in shown
    assert page.locator("#results-summary").inner_text() == "The search failed."
    page.screenshot(path=str(screenshot_dir() / "error.png"), full_page=True)

    # Dismissed, then a blank query: the service's own message again.
    page.get_by_role("button", name="Dismiss the message").click()
    assert page.get_by_role("alert").is_hidden()
    page.get_by_label("Describe a finding").fill("   ")
    page.get_by_role("button", name="Search", exact=True).click()
    assert "the query is empty" in alert_text(page)
    assert page.errors == []


def test_missing_key_is_explained(page: Any, live_service: LiveService) -> None:
    open_page(page, live_service, key=None)
    page.get_by_label("Describe a finding").fill("cardiomegaly")
    page.get_by_role("button", name="Search", exact=True).click()
    shown = alert_text(page)
    assert "Unauthorized" in shown
    assert "API key" in shown
    # The key form is opened for the user.
    assert page.locator("#settings").get_attribute("open") is not None
    assert page.locator(".result-button").count() == 0


def test_evaluation_section_hidden_without_runs(page: Any, live_service: LiveService) -> None:
    with live_service.client() as client:
        listed = client.get("/evaluations")
    open_page(page, live_service, key=live_service.api_key)
    if listed.status_code == 200:
        assert listed.json()["total"] == 0
    # Hidden whether the service has no evaluation routes or no run yet.
    page.wait_for_load_state("networkidle")
    assert page.locator("#evaluation").is_hidden()
    assert page.get_by_role("alert").is_hidden()
