"""The upload page in a real browser: Playwright driving Debian's Chromium.

Drag-and-drop an X-ray and a holiday photo, see the X-ray's label and probability, toggle and
fade the Grad-CAM heatmap, switch operating points, and see the photo refused. A screenshot is
kept in ``test-artifacts/`` (or ``$PNEUMOSCAN_TEST_ARTIFACTS``).
"""

from __future__ import annotations

from dataclasses import replace

import base64
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

ARTIFACTS = Path(os.environ.get("PNEUMOSCAN_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture()
def live_server(tiny_bundle: Path, tmp_path: Path):
    """The app on a free loopback port, with three distinct operating points so switching shows."""
    from werkzeug.serving import make_server

    from pneumoscan.integrity import read_spec, rewrite_bundle
    from pneumoscan.web import create_app

    spec = read_spec(tiny_bundle)
    points = {"balanced": 0.5, "high_sensitivity": 0.0, "high_specificity": 1.0}
    # a review band over (0.01, 0.99): the tiny model's films land inside it, so the flag shows
    review = {**spec.decision.review, "low": 0.01, "high": 0.99}
    bundle = tmp_path / "bundle"
    rewrite_bundle(tiny_bundle, spec.replace(decision=replace(spec.decision, operating_points=points, threshold=0.5,
                                                                review=review)), bundle,
                   extra_files={"split.csv": tiny_bundle / "split.csv"})
    app = create_app({"MODEL_DIR": str(bundle), "SECRET_KEY": "test"})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture()
def page():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def _drop_files(page, selector: str, files: dict[str, tuple[bytes, str]]) -> None:
    """Fire a real drop event carrying ``files`` (name -> (bytes, MIME type)) on ``selector``."""
    payload = {name: [base64.b64encode(data).decode(), mime] for name, (data, mime) in files.items()}
    transfer = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const [name, [b64, mime]] of Object.entries(files)) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, {type: mime}));
        }
        return dt;
    }""", payload)
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_upload_explain_switch_and_refuse_in_chromium(live_server: str, page) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    xray = image_bytes(make_xray(7, pneumonia=True, size=(160, 144)))
    photo = image_bytes(__import__("PIL.Image", fromlist=["Image"]).fromarray(skimage_data.astronaut()), "JPEG")

    page.goto(live_server + "/")
    assert "Research use only" in page.inner_text(".notice")
    _drop_files(page, "#dropzone", {"chest.png": (xray, "image/png"), "holiday.jpg": (photo, "image/jpeg")})
    assert page.inner_text("#chosen").split() == ["chest.png", "holiday.jpg"]
    # The page says it is working as soon as the form is sent (checked with the send cancelled).
    state = page.evaluate("""() => {
        const form = document.getElementById("upload-form");
        const cancel = (event) => event.preventDefault();
        form.addEventListener("submit", cancel);
        form.requestSubmit();
        form.removeEventListener("submit", cancel);
        const button = form.querySelector("button[type=submit]");
        const state = [document.getElementById("working").textContent, button.disabled];
        button.disabled = false;
        return state;
    }""")
    assert state == ["Analysing 2 images\u2026", True]
    page.click("button[type=submit]")
    page.wait_for_selector(".results")

    card = page.locator("article.card", has_text="chest.png")
    assert card.get_attribute("class").split()[:2] == ["card", "ok"]
    probability = float(card.get_attribute("data-probability"))
    assert card.locator(".label").inner_text() == ("PNEUMONIA" if probability >= 0.5 else "NORMAL")
    assert card.locator(".probability").inner_text() == f"{probability:.3f}"

    if 0.01 < probability < 0.99:
        assert card.locator(".review-flag").inner_text().startswith("Review recommended")
        assert "review" in card.get_attribute("class").split()
    assert card.locator(".cam-legend").inner_text().split() == ["low", "high", "evidence", "for", "pneumonia"]
    heatmap = card.locator("img.heatmap")
    # hidden by default on a NORMAL answer, shown on a PNEUMONIA one
    assert heatmap.is_visible() is (probability >= 0.5)
    card.locator(".cam-toggle").check()
    assert heatmap.is_visible()
    xray_box = card.locator("img.xray").bounding_box()
    assert xray_box["width"] >= 448  # drawn at least 448 px wide
    natural = card.locator("img.xray").evaluate("el => [el.naturalWidth, el.naturalHeight]")
    assert natural[1] / natural[0] == pytest.approx(144 / 160, abs=0.01)  # the film's own aspect ratio
    card.locator(".cam-opacity").fill("80")
    assert heatmap.evaluate("el => getComputedStyle(el).opacity") == "0.8"
    card.locator(".cam-toggle").uncheck()
    assert not heatmap.is_visible()
    card.locator(".cam-toggle").check()
    assert heatmap.is_visible()

    card.locator(".card-operating-point").select_option("high_sensitivity")
    assert card.locator(".label").inner_text() == "PNEUMONIA"
    assert card.locator(".threshold-value").inner_text() == "0.000"
    if probability < 1.0:
        card.locator(".card-operating-point").select_option("high_specificity")
        assert card.locator(".label").inner_text() == "NORMAL"
        assert "normal" in card.get_attribute("class").split()

    photo_card = page.locator("article.card", has_text="holiday.jpg")
    assert "rejected" in photo_card.get_attribute("class").split()
    assert photo_card.locator("li[data-reason=colour_image]").count() == 1
    assert photo_card.locator(".label").inner_text() == "Not analysed"
    assert photo_card.locator("li[data-reason=colour_image]").inner_text() == "a colour image; radiographs are greyscale"
    thumbnail = photo_card.locator("img.thumbnail")
    assert thumbnail.is_visible() and 0 < max(thumbnail.evaluate("el => [el.naturalWidth, el.naturalHeight]")) <= 160

    with page.expect_download() as download:
        page.click("#download-csv")
    rows = Path(download.value.path()).read_text().splitlines()
    assert rows[0] == ("filename,status,label,probability_pneumonia,threshold,operating_point,review_recommended,"
                       "review_reasons,outside_gate,reasons,gate_reasons,error,image_sha256")
    assert rows[1].startswith("chest.png,ok,") and rows[2].startswith("holiday.jpg,rejected,,")
    assert "colour_image" in rows[2]
    with page.expect_download() as download:
        page.click("#download-json")
    results = json.loads(Path(download.value.path()).read_text())
    assert [r["filename"] for r in results] == ["chest.png", "holiday.jpg"]
    assert results[0]["probability_pneumonia"] == pytest.approx(probability, abs=1e-6)
    assert not any(key.endswith("_png") or key == "upload_b64" for r in results for key in r)  # no images

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-upload.png"), full_page=True)

    # "Analyse anyway" sends the refused photo again with force=true: it comes back analysed,
    # marked as outside the gate, with review recommended.
    page.locator("article.card", has_text="holiday.jpg").locator(".analyse-anyway").click()
    page.wait_for_selector("article.card.outside-gate")
    forced = page.locator("article.card", has_text="holiday.jpg")
    assert forced.get_attribute("class").split()[:2] == ["card", "ok"]
    assert forced.locator(".label").inner_text() in ("NORMAL", "PNEUMONIA")
    assert "Analysed outside the input gate" in forced.locator(".outside-gate-note").inner_text()
    assert forced.locator("li[data-review-reason=outside_gate]").count() == 1
    # in place: the other film's card is still there, and the downloads carry the new answer
    assert page.locator("article.card").count() == 2
    assert page.locator("article.card", has_text="chest.png").locator(".label").inner_text() in ("NORMAL", "PNEUMONIA")
    with page.expect_download() as download:
        page.click("#download-json")
    results = json.loads(Path(download.value.path()).read_text())
    assert [(r["filename"], r["status"]) for r in results] == [("chest.png", "ok"), ("holiday.jpg", "ok")]
    assert results[1]["outside_gate"] is True
    page.screenshot(path=str(ARTIFACTS / "browser-analyse-anyway.png"), full_page=True)

    page.click("nav >> text=Model card")
    assert "Intended use" in page.inner_text(".model-card")
    assert "Review is recommended when P(pneumonia) lies between 0.010 and 0.990" in page.inner_text(".review-band")


def test_api_docs_render_from_the_package_under_the_csp(live_server: str, page) -> None:
    """Swagger UI at /api/docs: its files come from this server, and the CSP blocks nothing."""
    violations, requests, warnings = [], [], []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.on("console", lambda message: warnings.append(message.text) if message.type in ("warning", "error") else None)
    page.on("request", lambda request: requests.append(request.url))
    page.goto(live_server + "/api/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "pneumoscan API" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector("#operations-default-predict")
    page.click("#operations-default-predict .opblock-summary")
    # Swagger UI expands the operation on a later render, so wait for its text rather than read it at once
    playwright_api.expect(page.locator("#operations-default-predict")).to_contain_text("force", timeout=15_000)
    # Try it out: the upload field is a file chooser per part, and a film sent from it is analysed
    page.click("#operations-default-predict .try-out__btn")
    add = page.locator("#operations-default-predict .json-schema-form-item-add")
    playwright_api.expect(add).to_be_visible(timeout=15_000)
    add.click()
    page.locator("#operations-default-predict input[type=file]").set_input_files(
        files=[{"name": "film.png", "mimeType": "image/png", "buffer": image_bytes(make_xray(7, size=(160, 144)))}])
    page.click("#operations-default-predict .execute")
    playwright_api.expect(page.locator("#operations-default-predict .live-responses-table")).to_contain_text(
        '"probability_pneumonia"', timeout=30_000)
    assert "Add a file" in page.evaluate(
        "getComputedStyle(document.querySelector('.json-schema-form-item-add'), '::after').content")
    assert not [w for w in warnings if "Could not find component" in w], warnings
    assert not violations, violations
    assert all(url.startswith(live_server) or url.startswith("data:") for url in requests), requests
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-api-docs.png"), full_page=False)
