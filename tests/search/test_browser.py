"""A real browser on the search page: headless Chromium (playwright, system chromium) types a
query, sees result images, opens the larger view and searches by uploading an image; on an index
of GeoTIFFs it checks the map: footprints drawn in place, hover linking with the list, and a
rectangle drawn on the map that filters the search by its bbox.

Skips with a reason when playwright or chromium is missing. Screenshots are saved as test
artifacts in ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@contextmanager
def _serve(index_dir: Path, ckpt: Path) -> Iterator[str]:
    """The service over ``index_dir`` on 127.0.0.1 with an ephemeral port, in a thread; shut down afterwards."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import uvicorn

    from rsitr.retrieval.index import Index
    from rsitr.service import create_app

    index = Index.open(index_dir, ckpt)
    config = uvicorn.Config(create_app(index), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):  # bounded wait for readiness (≤ 20 s); join returns early if it died
            if server.started or not thread.is_alive():
                break
            thread.join(0.02)
        assert server.started, "the test server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        index.close()


@pytest.fixture(scope="module")
def server_url(assets: SearchAssets, built_index: Path) -> Iterator[str]:
    """The service over the session's (not georeferenced) index."""
    with _serve(built_index, assets.ckpt) as url:
        yield url


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


RES = 0.01  # degrees per pixel of the test GeoTIFFs
CLUSTERS = {"a": (10.0, 47.0), "b": (30.0, -8.0)}  # west, north of each cluster of 6 GeoTIFFs (3 × 2)


@dataclass(frozen=True)
class GeoServer:
    """A served index of 12 GeoTIFFs in two clusters and 2 plain JPEGs.

    Attributes:
        url: the service's base URL.
        boxes: GeoTIFF name → its footprint's (west, south, east, north) in degrees.
        cluster: GeoTIFF name → ``"a"`` (lon 10..14.3, lat 44.2..47) or ``"b"`` (lon 30..34.3, lat -10.8..-8).
        plain: names of the images without georeferencing.
    """

    url: str
    boxes: dict[str, tuple[float, float, float, float]]
    cluster: dict[str, str]
    plain: list[str]


@pytest.fixture(scope="module")
def geo_server(assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeoServer]:
    """GeoTIFF copies of 12 archive images at known, separate places (EPSG:4326), plus 2 plain JPEGs,
    indexed and served."""
    rasterio = pytest.importorskip("rasterio", reason="writing GeoTIFFs needs rasterio")
    import numpy as np
    from PIL import Image
    from rasterio.transform import from_origin

    from rsitr.retrieval.index import build_index

    root = tmp_path_factory.mktemp("geo")
    archive = root / "archive"
    archive.mkdir()
    sources = sorted(assets.archive.glob("*.jpg"))[:14]
    boxes: dict[str, tuple[float, float, float, float]] = {}
    cluster: dict[str, str] = {}
    for n, src in enumerate(sources[:12]):
        c, i = "ab"[n // 6], n % 6
        west, north = CLUSTERS[c][0] + 1.5 * (i % 3), CLUSTERS[c][1] - 1.5 * (i // 3)
        with Image.open(src) as im:
            pixels = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        _, height, width = pixels.shape
        name = f"{c}{i}_{src.stem}.tif"
        profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
        transform = from_origin(west, north, RES, RES)
        with rasterio.open(archive / name, "w", crs="EPSG:4326", transform=transform, **profile) as ds:
            ds.write(pixels)
        boxes[name] = (west, north - height * RES, west + width * RES, north)
        cluster[name] = c
    plain = [src.name for src in sources[12:]]
    for name in plain:
        shutil.copyfile(assets.archive / name, archive / name)
    build_index(archive, assets.ckpt, root / "index", batch_size=16)
    with _serve(root / "index", assets.ckpt) as url:
        yield GeoServer(url=url, boxes=boxes, cluster=cluster, plain=plain)


# Each result's footprint as drawn (its SVG path's client rect) and as expected (the GeoTIFF's corners
# projected by the map itself), in page pixels.
MEASURE_FOOTPRINTS = """(boxes) => {
  const map = window.rsitrMap, box = map.getContainer().getBoundingClientRect();
  const page = (lat, lon) => { const p = map.latLngToContainerPoint([lat, lon]); return [p.x + box.left, p.y + box.top]; };
  const names = [...document.querySelectorAll('#results .card .name')].map((el) => el.textContent);
  return window.rsitrFootprints.map((layer, i) => {
    const out = {name: names[i], map: [box.left, box.top, box.right, box.bottom], drawn: null, expected: null};
    if (layer) {
      const r = layer.getElement().getBoundingClientRect();
      out.drawn = [r.left, r.top, r.right, r.bottom];
    }
    const b = boxes[names[i]];
    if (b) out.expected = [...page(b[3], b[0]), ...page(b[1], b[2])];
    return out;
  });
}"""

# Page pixels of lon/lat points, from the map's own projection.
TO_PAGE = """(points) => {
  const map = window.rsitrMap, box = map.getContainer().getBoundingClientRect();
  return points.map(([lon, lat]) => {
    const p = map.latLngToContainerPoint([lat, lon]);
    return [p.x + box.left, p.y + box.top];
  });
}"""

# The centre of each drawn footprint where the footprint itself is the topmost element there, else null.
HOVER_POINTS = """() => window.rsitrFootprints.map((layer) => {
  if (!layer) return null;
  const r = layer.getElement().getBoundingClientRect(), x = (r.left + r.right) / 2, y = (r.top + r.bottom) / 2;
  return document.elementFromPoint(x, y) === layer.getElement() ? [x, y] : null;
})"""


def test_page_map_footprints_hover_and_draw_area(
    browser: object, geo_server: GeoServer, assets: SearchAssets
) -> None:
    geo = geo_server
    everything = sorted([*geo.boxes, *geo.plain])
    in_a = sorted(n for n, c in geo.cluster.items() if c == "a")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    foreign: list[str] = []  # anything the page loads from elsewhere (a CDN, fonts, tiles): must stay empty
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url.startswith((geo.url + "/", "blob:", "data:")) else foreign.append(r.url),
    )
    page.goto(geo.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('12 georeferenced')")
    assert page.evaluate("L.version") == "1.9.4"
    assert page.locator("#map").is_visible() and page.locator("#draw-area").is_visible()

    # a search returning everything: 12 footprints on the map, 2 labelled cards without
    page.fill("#k", "20")
    page.fill("#q", assets.query[0])
    page.press("#q", "Enter")
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {len(everything)}")
    cards = page.locator("#results .card")
    assert sorted(cards.locator(".name").all_inner_texts()) == everything
    assert cards.evaluate_all("cs => cs.map((c) => c.dataset.rank)") == [
        str(r + 1) for r in range(len(everything))
    ]
    assert sorted(page.locator("#results .card.no-georef .name").all_inner_texts()) == sorted(geo.plain)
    assert page.locator("#results .card.no-georef .tag").all_inner_texts() == ["not georeferenced"] * 2
    assert page.locator("#results .card.georef").count() == len(geo.boxes)
    assert page.locator("#results .card.georef .tag").count() == 0
    assert page.locator("#map path.footprint").count() == len(geo.boxes)

    # each footprint is drawn where its GeoTIFF lies, inside the map (fitted to the results)
    shapes = page.evaluate(MEASURE_FOOTPRINTS, {n: list(b) for n, b in geo.boxes.items()})
    for s in shapes:
        if s["name"] in geo.plain:
            assert s["drawn"] is None, s
            continue
        assert s["drawn"] is not None, s
        assert all(abs(d - e) <= 2 for d, e in zip(s["drawn"], s["expected"], strict=True)), s
        left, top, right, bottom = s["drawn"]
        assert right - left >= 5 and bottom - top >= 5, s  # big enough to hover
        assert (
            left >= s["map"][0] and top >= s["map"][1] and right <= s["map"][2] and bottom <= s["map"][3]
        ), s

    # hover a card → its footprint is highlighted
    first = next(i for i, s in enumerate(shapes) if s["drawn"])
    cards.nth(first).hover()
    page.wait_for_function(
        "(i) => window.rsitrFootprints[i].getElement().classList.contains('highlight')", arg=first
    )
    stroke = page.evaluate("(i) => getComputedStyle(window.rsitrFootprints[i].getElement()).stroke", first)
    assert stroke == "rgb(232, 89, 12)"  # the highlight colour wins over the path's own stroke attribute
    # hover another footprint on the map → its card is highlighted (and only that one)
    points = page.evaluate(HOVER_POINTS)
    other = next(i for i, p in enumerate(points) if p is not None and i != first)
    page.mouse.move(*points[other])
    page.wait_for_function(
        "(i) => document.querySelectorAll('#results .card')[i].classList.contains('highlight')", arg=other
    )
    assert page.locator("#results .card.highlight").count() == 1
    assert page.locator("#map path.footprint.highlight").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search_map.png"))
    # click it → its card gets the focus (scrolled into view)
    page.mouse.click(*points[other])
    page.wait_for_function(
        "(i) => document.activeElement === document.querySelectorAll('#results .card')[i]", arg=other
    )

    # draw a rectangle around cluster "a" → the query re-runs with a bbox and only cluster "a" is left
    page.click("#draw-area")
    assert page.get_attribute("#draw-area", "aria-pressed") == "true"
    assert page.evaluate("window.rsitrMap.dragging.enabled()") is False
    boxes_a = [geo.boxes[n] for n in in_a]
    want = (
        min(b[0] for b in boxes_a) - 0.5,
        min(b[1] for b in boxes_a) - 0.5,
        max(b[2] for b in boxes_a) + 0.5,
        max(b[3] for b in boxes_a) + 0.5,
    )
    start, end = page.evaluate(TO_PAGE, [[want[0], want[3]], [want[2], want[1]]])
    with page.expect_response(lambda r: "/api/search?" in r.url and "bbox=" in r.url) as answer:
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=8)
        page.mouse.up()
    data = answer.value.json()
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {len(in_a)}")
    assert sorted(cards.locator(".name").all_inner_texts()) == in_a
    assert data["count"] == len(in_a) < len(everything)
    assert data["bbox"] == pytest.approx(want, abs=0.25)  # a pixel is ~0.1° at this zoom
    shown = [float(v) for v in page.inner_text("#area-text").split(",")]
    assert shown == pytest.approx(data["bbox"], abs=1e-9)
    assert "bbox=" in page.url and "within the area" in page.inner_text("#status")
    assert page.get_attribute("#draw-area", "aria-pressed") == "false"
    assert page.evaluate("window.rsitrMap.dragging.enabled()") is True
    assert page.evaluate("window.rsitrFootprints.every((l) => l !== null)") is True
    page.screenshot(path=str(ARTIFACTS / "search_map_area.png"))

    # clear the area → everything again
    with page.expect_response(lambda r: "/api/search?" in r.url and "bbox=" not in r.url):
        page.click("#clear-area")
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {len(everything)}")
    assert page.locator("#area").is_hidden() and "bbox=" not in page.url

    # "Show on map" highlights the footprint and does not open the larger view
    georef = page.locator("#results .card.georef").nth(1)
    rank = int(georef.get_attribute("data-rank") or 0)
    georef.locator(".show-on-map").click()
    page.wait_for_function(
        "(i) => window.rsitrFootprints[i].getElement().classList.contains('highlight')", arg=rank - 1
    )
    assert page.evaluate("document.getElementById('viewer').open") is False

    # a narrow screen stacks the map above the results
    page.set_viewport_size({"width": 600, "height": 900})
    page.wait_for_function(
        "document.getElementById('map').getBoundingClientRect().bottom"
        " <= document.getElementById('results').getBoundingClientRect().top"
    )
    page.screenshot(path=str(ARTIFACTS / "search_map_narrow.png"))
    assert errors == []
    assert foreign == []
    context.close()
