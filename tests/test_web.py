"""The search page in a real headless Chromium (Debian's, driven by Playwright): text search on
Enter, the results toggle and k selector, upload by file picker and by drag and drop, and errors
shown to the user. The page's results are checked against the JSON API's for the same query.

Screenshots go to `$POLYSENSE_ARTIFACTS` (default `runs/artifacts/`): web-search.png,
web-upload.png, web-error.png."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from polysense.serve.app import create_app, serve_in_thread
from test_serve import make_index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), "
    "as .ci/run does",
)


def artifacts_dir() -> Path:
    out = Path(os.environ.get("POLYSENSE_ARTIFACTS", REPO / "runs" / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Save a screenshot to tmp_path and copy it to the artifacts folder."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not an empty image
    shutil.copyfile(path, artifacts_dir() / name)
    return path


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def url(index):
    with serve_in_thread(create_app(index)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('index-info').textContent.includes('items')")
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def api(url: str, **query) -> list[dict]:
    return httpx.post(url + "/search", json=query, timeout=20).json()["results"]


def cards(page) -> list[dict]:
    """What the page shows for each result card."""
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    return page.eval_on_selector_all(
        ".card",
        """cards => cards.map(c => {
            const img = c.querySelector('img');
            return {key: c.querySelector('.key').textContent,
                    caption: c.querySelector('.caption').textContent,
                    score: c.querySelector('.score').textContent,
                    path: c.querySelector('.path').hidden ? null : c.querySelector('.path').textContent,
                    natural: img.naturalWidth, shown: img.getBoundingClientRect().width,
                    rendering: getComputedStyle(img).imageRendering, alt: img.alt};
        })""",
    )


def assert_shows(shown: list[dict], results: list[dict]) -> None:
    assert [c["key"] for c in shown] == [r["key"] for r in results]
    assert [c["score"] for c in shown] == [f"score {r['score']:.3f}" for r in results]
    assert [c["caption"] for c in shown] == [r["caption"] or "(no caption)" for r in results]
    assert [c["path"] for c in shown] == [r["image_path"] for r in results]  # the image file
    assert all(c["path"] and c["path"].endswith(".png") for c in shown)
    for card in shown:
        assert card["natural"] == 32  # the item's 32 px PNG, loaded from /items/KEY/image
        assert card["shown"] >= 4 * 32 and card["rendering"] == "pixelated"
        assert card["alt"].startswith("result ")


def test_text_search_on_enter_shows_image_cards(page, url, tmp_path):
    assert re.fullmatch(r"24 items · 32-d embeddings", page.text_content("#index-info"))
    box = page.get_by_label("Describe what to find")
    box.fill("a red circle")
    box.press("Enter")
    page.wait_for_selector(".card")
    shown = cards(page)
    assert len(shown) == 10  # the default k
    assert_shows(shown, api(url, text="a red circle", k=10))
    assert page.text_content("#status").startswith("10 images for “a red circle”")
    screenshot(page, tmp_path, "web-search.png")

    page.get_by_label("captions").check()  # re-runs the query for caption results
    page.wait_for_function("document.getElementById('status').textContent.includes('captions')")
    assert_shows(cards(page), api(url, text="a red circle", k=10, modality="text"))

    page.select_option("#k", "5")
    page.wait_for_function("document.querySelectorAll('.card').length === 5")
    assert_shows(cards(page), api(url, text="a red circle", k=5, modality="text"))


def test_upload_by_file_picker_and_by_drop_finds_the_image_itself(page, index, url, tmp_path):
    key = index.search_text(["a blue square"], k=1)[0][0].key
    data = index.image_bytes(key)
    query = tmp_path / "query.png"
    query.write_bytes(data)

    page.get_by_label("Describe what to find").fill("leftover text")
    page.set_input_files("#image-file", str(query))
    page.wait_for_function("document.getElementById('status').textContent.includes('uploaded')")
    shown = cards(page)
    assert shown[0]["key"] == key and shown[0]["score"] == "score 1.000"
    assert_shows(shown, api(url, image=base64.b64encode(data).decode(), k=10))
    assert page.input_value("#query-text") == ""  # the image is the query now
    assert page.is_visible("#query-preview")
    screenshot(page, tmp_path, "web-upload.png")

    page.get_by_label("Describe what to find").fill("a green circle")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('green')")
    drop = page.evaluate_handle(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            return dt;
        }""",
        base64.b64encode(data).decode(),
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
    page.wait_for_function("document.getElementById('status').textContent.includes('uploaded')")
    assert cards(page)[0]["key"] == key


def test_errors_are_shown_to_the_user(page, tmp_path):
    page.get_by_role("button", name="Search").click()  # nothing typed
    assert "type a description" in page.text_content("#error")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"these bytes are not a PNG")
    page.set_input_files("#image-file", str(bad))
    page.wait_for_function("document.getElementById('error').textContent.includes('HTTP 422')")
    error = page.locator("#error")
    assert error.is_visible() and error.get_attribute("role") == "alert"
    assert "not a readable image" in error.text_content()
    assert page.locator(".card").count() == 0  # no stale results under an error
    screenshot(page, tmp_path, "web-error.png")
