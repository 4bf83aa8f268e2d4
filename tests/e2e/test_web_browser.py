"""The web page in a real headless Chromium against a live service with an API key.

A user enters the key, searches by text and by an example image, opens a result's details,
and sees the service's error messages when something is wrong.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.models import Image
from tests.e2e.conftest import VIEWER_URL_TEMPLATE, LiveService, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Milliseconds a page may take for one search on a busy 2-core machine.
WAIT_MS = 60_000
#: Results the page asks for by default (its first choice of k).
PAGE_K = 12
#: A small evaluation over the stored images (the Kermany normals and pneumonias).
EVALUATION_RUN: dict[str, Any] = {
    "protocol": "stored",
    "categories": ["No Finding", "Pneumonia"],
    "candidates_per_category": 5,
    "queries_per_category": 2,
    "seed": 3,
    "ks": [1, 5],
    "random_repeats": 5,
}


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
    assert live_service.n_images > PAGE_K
    assert cards.count() == PAGE_K
    shown = result_ids(page)
    assert len(set(shown)) == PAGE_K
    assert set(shown) <= set(live_service.ids) | set(live_service.kermany_ids)

    scores = [float(s) for s in page.locator(".result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    summary = page.locator("#results-summary").inner_text()
    assert f"{PAGE_K} closest studies" in summary
    # The header names the serving model; a text query has no query image.
    model_info = page.locator("#model-info").inner_text()
    assert "service-test" in model_info
    assert "trained here" in model_info
    assert page.locator("#model-warning").is_hidden()
    assert page.locator("#query-figure").is_hidden()

    # Thumbnails come through fetch with the key, as blob URLs that the browser decoded.
    page.wait_for_function(
        "() => [...document.querySelectorAll('.result img')]"
        ".every(img => img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0)",
        timeout=WAIT_MS,
    )
    # Each card's chips are its image's positive labels.
    for position, image_id in enumerate(shown):
        study = live_service.ids.get(image_id)
        if study is None:
            continue
        positives = sorted(name for name, value in study.labels.items() if value == 1.0)
        chips = page.locator(".result").nth(position).locator(".chip").all_inner_texts()
        assert sorted(chips) == positives
    # The details of the best synthetic study, which has a report.
    position, first = next((i, v) for i, v in enumerate(shown) if v in live_service.ids)
    study = live_service.ids[first]

    page.screenshot(path=str(screenshot_dir() / "text-search.png"), full_page=True)

    cards.nth(position).click()
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
        f"() => document.querySelector('#results-summary').textContent"
        f".startsWith('{PAGE_K} closest studies like image {first}')",
        timeout=WAIT_MS,
    )
    assert cards.count() == PAGE_K
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
    # The query image is drawn beside its results, from the file itself.
    figure = page.locator("#query-figure")
    assert figure.is_visible()
    assert study.image_path.name in figure.inner_text()
    page.wait_for_function(
        "() => { const img = document.querySelector('#query-image');"
        " return img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0; }",
        timeout=WAIT_MS,
    )
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


def test_latest_evaluation_is_shown(page: Any, live_service: LiveService) -> None:
    open_page(page, live_service, key=live_service.api_key)
    page.wait_for_load_state("networkidle")
    # No run yet: no section, and no error either.
    assert page.locator("#evaluation").is_hidden()
    assert page.get_by_role("alert").is_hidden()

    with live_service.client() as client:
        assert client.get("/evaluations").json()["total"] == 0
        started = client.post("/evaluations", json=EVALUATION_RUN)
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        deadline = time.monotonic() + WAIT_MS / 1000 * 5
        while (run := client.get(f"/evaluations/{run_id}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, run
            time.sleep(0.5)
    assert run["status"] == "succeeded", run["error"]
    summary = run["summary"]

    page.reload()
    section = page.locator("#evaluation")
    section.wait_for(state="visible", timeout=WAIT_MS)
    headers = section.locator("thead th").all_inner_texts()
    assert headers == ["Task", "Method", "P@1", "P@5", "mAP"]
    rows = section.locator("tbody tr")
    table = {
        (row.locator("th").inner_text(), row.locator("td").first.inner_text()): row.locator(
            "td.num"
        ).all_inner_texts()
        for row in rows.all()
    }
    model = summary["text_to_image"]["model"]
    assert table[("text → image", "ConVIRT")] == [
        f"{model['p@1']:.3f}",
        f"{model['p@5']:.3f}",
        f"{model['map']:.3f}",
    ]
    assert ("image → image", "random (expected)") in table
    assert f"Run {run_id}" in section.locator("#evaluation-meta").inner_text()
    page.screenshot(path=str(screenshot_dir() / "evaluation.png"), full_page=True)
    assert page.errors == []


def _findings_shown(page: Any, table: str) -> dict[str, tuple[str, str]]:
    rows = page.locator(f"{table} tr.finding")
    rows.first.wait_for(timeout=WAIT_MS)
    shown: dict[str, tuple[str, str]] = {}
    for index in range(rows.count()):
        row = rows.nth(index)
        cells = row.locator("td").all_inner_texts()
        shown[row.get_attribute("data-finding") or ""] = (cells[0].strip(), cells[1].strip())
    return shown


def _findings_expected(answer: dict[str, Any]) -> dict[str, tuple[str, str]]:
    expected = {}
    for finding in answer["findings"]:
        knn = finding["knn"]
        vote = (
            f"{round(knn['positive_fraction'] * knn['neighbours'])} of {knn['neighbours']} positive"
            if knn["neighbours"]
            else "no labelled neighbours"
        )
        expected[finding["name"]] = (f"{100 * finding['probability']:.0f} %", vote)
    return expected


def test_findings_are_shown_for_an_upload_and_in_details(
    page: Any, live_service: LiveService
) -> None:
    open_page(page, live_service, key=live_service.api_key)
    image_id, study = next(iter(live_service.ids.items()))
    page.locator("#file").set_input_files(str(study.image_path))
    shown = _findings_shown(page, "#findings-table")
    with live_service.client() as client:
        uploaded = client.post(
            "/classify", files={"file": (study.image_path.name, study.image_path.read_bytes())}
        ).json()
        stored = client.post("/classify", json={"image_id": image_id}).json()
    assert shown == _findings_expected(uploaded)
    # Listed from the most to the least probable finding.
    order = [
        name
        for name, _ in sorted(
            ((f["name"], f["probability"]) for f in uploaded["findings"]), key=lambda f: -f[1]
        )
    ]
    names = page.locator("#findings-table tr.finding").evaluate_all(
        "rows => rows.map(r => r.dataset.finding)"
    )
    assert names == order
    assert "chexpert-14" in page.locator("#findings-meta").inner_text()

    page.locator(".result-button").first.wait_for(timeout=WAIT_MS)
    assert result_ids(page)[0] == image_id
    page.locator(".result-button").first.click()
    page.get_by_role("dialog").wait_for(state="visible", timeout=WAIT_MS)
    assert _findings_shown(page, "#detail-findings") == _findings_expected(stored)
    page.screenshot(path=str(screenshot_dir() / "findings.png"), full_page=True)
    assert page.errors == []


def test_a_text_search_hides_the_findings_of_the_last_image(
    page: Any, live_service: LiveService
) -> None:
    open_page(page, live_service, key=live_service.api_key)
    _, study = next(iter(live_service.ids.items()))
    page.locator("#file").set_input_files(str(study.image_path))
    _findings_shown(page, "#findings-table")
    assert page.locator("#findings").is_visible()
    page.get_by_label("Describe a finding").fill("cardiomegaly")
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#results-summary').textContent.includes('cardiomegaly')",
        timeout=WAIT_MS,
    )
    assert page.locator("#findings").is_hidden()


def test_pacs_studies_link_to_the_viewer(page: Any, live_service: LiveService) -> None:
    # What a PACS connector records: the StudyInstanceUID of every Kermany image.
    uids = {image_id: f"1.2.826.0.1.3680043.10.{image_id}" for image_id in live_service.kermany_ids}
    engine = sa.create_engine(live_service.settings.database_url)
    try:
        with engine.begin() as conn:
            for image_id, uid in uids.items():
                conn.execute(
                    sa.update(Image).where(Image.id == image_id).values(study_instance_uid=uid)
                )
    finally:
        engine.dispose()

    open_page(page, live_service, key=live_service.api_key)
    page.get_by_label("Describe a finding").fill("pneumonia in a child")
    page.get_by_role("button", name="Search", exact=True).click()
    page.locator(".result-button").first.wait_for(timeout=WAIT_MS)
    shown = result_ids(page)
    linked = [image_id for image_id in shown if image_id in uids]
    assert linked, "no Kermany radiograph among the hits"
    for position, image_id in enumerate(shown):
        links = page.locator(".result").nth(position).locator("a.viewer-link")
        if image_id in uids:
            expected = VIEWER_URL_TEMPLATE.format(study_instance_uid=uids[image_id])
            assert links.get_attribute("href") == expected
            assert links.get_attribute("rel") == "noopener noreferrer"
        else:
            # An uploaded study has no PACS UID: no link to a viewer.
            assert links.count() == 0

    page.screenshot(path=str(screenshot_dir() / "viewer-links.png"), full_page=True)
    position = shown.index(linked[0])
    page.locator(".result-button").nth(position).click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for(state="visible", timeout=WAIT_MS)
    assert uids[linked[0]] in dialog.locator("#detail-meta").inner_text()
    detail_link = dialog.locator("#detail-meta a.viewer-link")
    assert detail_link.get_attribute("href") == VIEWER_URL_TEMPLATE.format(
        study_instance_uid=uids[linked[0]]
    )
    page.screenshot(path=str(screenshot_dir() / "viewer-link-detail.png"))
    assert page.errors == []
