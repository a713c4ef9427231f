"""A real browser on the search page: headless Chromium (playwright, system chromium) types a
query, sees result images, opens the larger view and searches by uploading an image.

Skips with a reason when playwright or chromium is missing. Screenshots are saved as test
artifacts in ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.search.conftest import SearchAssets

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server_url(assets: SearchAssets, built_index: Path) -> Iterator[str]:
    """The service on 127.0.0.1 with an ephemeral port, in a thread; shut down afterwards."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import uvicorn

    from rsitr.retrieval.index import Index
    from rsitr.service import create_app

    index = Index.open(built_index, assets.ckpt)
    config = uvicorn.Config(create_app(index), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1000):  # bounded wait for readiness (≤ 20 s); join returns early if it died
        if server.started or not thread.is_alive():
            break
        thread.join(0.02)
    assert server.started, "the test server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    index.close()


def _no_browser(reason: str) -> None:
    """Skip, or fail where CI requires the browser (``RSITR_REQUIRE_BROWSER=1``, set by .ci/run)."""
    if os.environ.get("RSITR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"RSITR_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright import sync_api
    except ImportError:
        _no_browser("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _no_browser(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        except Exception as e:  # noqa: BLE001 - any launch failure means: no usable browser here
            _no_browser(f"chromium could not be launched: {str(e).splitlines()[0]}")
        yield b
        b.close()


def test_page_search_by_text_view_and_upload(browser: object, server_url: str, assets: SearchAssets) -> None:
    caption, image = assets.query
    # bypass_csp: the page's CSP forbids eval, which playwright's wait_for_function uses.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server_url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('images indexed')")

    page.fill("#q", caption)
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card img")
    # every result image has actually loaded (decoded pixels, not a broken icon)
    page.wait_for_function(
        "[...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    cards = page.locator("#results .card")
    assert cards.count() == 24
    assert cards.first.locator(".name").inner_text() == image
    assert "score" in cards.first.locator(".score").inner_text()
    assert "results for" in page.locator("#status").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search_page.png"))

    cards.first.click()  # larger view
    page.wait_for_function("document.getElementById('viewer').open")
    page.wait_for_function("document.getElementById('view-img').naturalWidth > 0")
    assert page.locator("#view-name").inner_text() == image
    page.screenshot(path=str(ARTIFACTS / "search_page_view.png"))
    page.click("#view-close")

    query_image = assets.archive / "port_00002.jpg"
    page.set_input_files("#upload", str(query_image))
    page.wait_for_function("document.getElementById('status').textContent.includes('image port_00002.jpg')")
    assert page.locator("#results .card .name").first.inner_text() == "port_00002.jpg"
    assert errors == []
    context.close()
    runs = Path(__file__).resolve().parents[2] / "runs"
    if runs.is_dir():  # a copy next to the other run outputs, for people browsing runs/
        shutil.copyfile(ARTIFACTS / "search_page.png", runs / "search_page.png")
