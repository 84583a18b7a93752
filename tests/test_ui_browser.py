"""`eligen ui` in a real browser: headless Debian Chromium driven by selenium (`make test` installs both and sets
ELIGEN_REQUIRE_BROWSER=1, so there they must be present). The test starts `eligen ui` on a free loopback port, draws
two entities with mouse events, generates on the shipped tiny model, and checks what a user would: the image shown,
the downloaded layout's masks against the strokes, the error naming an empty prompt's entity and field, an
over-size upload refused, and a downloaded PNG restoring the layout. Screenshots go to $ELIGEN_SCREENSHOTS (default:
the test's temporary folder)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from eligen.entities import binarize_mask, polygon_to_mask

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZE = 64  # the tiny model's native size
WAIT_S = 120


def _browser_available() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver; `make test` does it)"
    return None


MISSING = _browser_available()
if MISSING and os.environ.get("ELIGEN_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"ELIGEN_REQUIRE_BROWSER=1 but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`eligen ui` as a user starts it, on a free loopback port, with a 1 MiB upload cap."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "eligen.cli", "ui", "--port", "0", "--max-upload-mb", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, seen = None, []
    deadline = time.monotonic() + WAIT_S
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("eligen ui: http://127.0.0.1:"):
            url = line.split()[2]
    if url is None:
        process.kill()
        raise AssertionError("eligen ui did not start:\n" + "".join(seen))
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ELIGEN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1500,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as exc:
        raise AssertionError(f"timed out waiting for {what}; status: "
                             f"{d_text(driver, 'status')!r}, errors: {d_text(driver, 'errors')!r}, "
                             f"notice: {d_text(driver, 'notice')!r}") from exc


def d_text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def open_app(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1", "the page")


def checked_after(driver, previous: str | None) -> str:
    """Wait until the live preview has answered again (body[data-checked] changes)."""
    body = lambda d: d.find_element("tag name", "body").get_attribute("data-checked")  # noqa: E731
    return wait_for(driver, lambda d: body(d) not in (None, previous) and body(d), "the live preview")


def canvas_offset(canvas, x: float, y: float) -> tuple[int, int]:
    """Image pixel ``(x, y)`` -> selenium's offset from the canvas's centre, in CSS pixels (the canvas is shown
    larger than the image; its on-screen size is read, not assumed)."""
    width, height = canvas.rect["width"], canvas.rect["height"]
    return round((x / SIZE - 0.5) * width), round((y / SIZE - 0.5) * height)


def drag(driver, points: list[tuple[float, float]]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "canvas")
    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, *points[0])).click_and_hold()
    for point in points[1:]:
        actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, *point))
    actions.release().perform()


def capsule(p0, p1, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` of the segment ``p0 p1`` (a round-capped brush stroke)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, str(value))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def page_masks(driver) -> list[np.ndarray]:
    uris = driver.execute_script("return state.entities.map((e) => maskDataURI(e.layer));")
    return [binarize_mask(uri) for uri in uris]


RECT = (4, 6, 30, 32)  # x0, y0, x1, y1 in image pixels
STROKE, BRUSH = ((40, 38), (56, 54)), 12


def test_draw_generate_download_and_reload(app_url, browser, screenshots, tmp_path):
    open_app(browser, app_url)
    browser.find_element("id", "prompt").send_keys("a red circle and a blue square on a gray background")

    # entity 0: a rectangle, dragged with the mouse
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(RECT[0], RECT[1]), ((RECT[0] + RECT[2]) / 2, (RECT[1] + RECT[3]) / 2), (RECT[2], RECT[3])])
    prompts = browser.find_elements("css selector", ".entity-prompt")
    prompts[0].send_keys("a red circle")

    # entity 1: a brush stroke, its prompt still empty -> the preview names entity 1's prompt
    browser.find_element("id", "add-entity").click()
    browser.find_element("id", "tool-brush").click()
    set_value(browser, "brush-size", BRUSH)
    drag(browser, [STROKE[0], ((STROKE[0][0] + STROKE[1][0]) / 2, (STROKE[0][1] + STROKE[1][1]) / 2), STROKE[1]])
    wait_for(browser, lambda d: "entity 1, field 'prompt'" in d_text(d, "errors"), "the empty-prompt error")
    browser.save_screenshot(str(screenshots / "1_empty_prompt_error.png"))
    browser.find_element("id", "generate").click()  # refused by the server too, naming the same field
    wait_for(browser, lambda d: "entity 1, field 'prompt'" in d_text(d, "errors")
             and d.find_element("id", "generate").is_enabled(), "the refused generation")
    assert browser.find_element("id", "result-image").get_attribute("src") in (None, "")

    browser.find_elements("css selector", ".entity-prompt")[1].send_keys("a blue square")
    wait_for(browser, lambda d: d_text(d, "errors") == "", "the errors to clear")
    tokens = [e.text for e in browser.find_elements("css selector", ".entity-tokens")]
    assert all("of 16×16 tokens" in t for t in tokens), tokens

    # generate on the tiny model and wait for the result
    browser.find_element("id", "random-seed").click()
    set_value(browser, "seed", 5)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-result"), "the result")
    image = browser.find_element("id", "result-image")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
             == SIZE, "the image to be shown")
    assert browser.execute_script("return document.getElementById('result-overlay').naturalWidth") >= 512
    browser.save_screenshot(str(screenshots / "2_result.png"))

    # the downloaded layout: two entities whose masks are the strokes drawn
    layout = json.loads(fetch(browser.find_element("id", "download-layout").get_attribute("href")))
    assert [e["prompt"] for e in layout["entities"]] == ["a red circle", "a blue square"]
    masks = [binarize_mask(e["mask"]) for e in layout["entities"]]
    rect = np.zeros((SIZE, SIZE), bool)
    rect[RECT[1]:RECT[3], RECT[0]:RECT[2]] = True
    assert iou(masks[0], rect) > 0.9, iou(masks[0], rect)
    assert iou(masks[1], capsule(*STROKE, BRUSH / 2)) > 0.9, iou(masks[1], capsule(*STROKE, BRUSH / 2))
    assert browser.find_element("id", "download-png").get_attribute("download") == "eligen_5.png"

    # reload the downloaded PNG into a fresh page: the layout comes back exactly
    png = tmp_path / "eligen_5.png"
    png.write_bytes(fetch(browser.find_element("id", "download-png").get_attribute("href")))
    open_app(browser, app_url)
    assert len(browser.find_elements("css selector", ".entity")) == 1
    browser.find_element("id", "load-file").send_keys(str(png))
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"), "the PNG to load")
    assert [e.get_attribute("value") for e in browser.find_elements("css selector", ".entity-prompt")] == \
        ["a red circle", "a blue square"]
    assert browser.find_element("id", "prompt").get_attribute("value").startswith("a red circle and a blue square")
    assert browser.find_element("id", "seed").get_attribute("value") == "5"
    restored = page_masks(browser)
    assert all((r == m).all() for r, m in zip(restored, masks, strict=True))
    browser.save_screenshot(str(screenshots / "3_reloaded.png"))


def test_an_oversize_upload_is_refused_in_the_page(app_url, browser, screenshots, tmp_path):
    open_app(browser, app_url)
    browser.find_element("id", "mode-inpaint").click()
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(int(1.5 * 2**20)))  # the app runs with a 1 MiB cap
    browser.find_element("id", "upload-image").send_keys(str(big))
    wait_for(browser, lambda d: "above this app's limit of 1 MiB" in d_text(d, "notice"), "the refusal")
    assert d_text(browser, "background-status") == "no image yet"
    browser.save_screenshot(str(screenshots / "4_upload_refused.png"))


def test_polygon_eraser_reorder_and_inpaint_in_the_page(app_url, browser, screenshots, tmp_path):
    from PIL import Image

    open_app(browser, app_url)
    browser.find_element("id", "prompt").send_keys("shapes on a gray background")
    browser.find_element("id", "tool-polygon").click()
    canvas = browser.find_element("id", "canvas")
    from selenium.webdriver.common.action_chains import ActionChains

    triangle = [(8, 56), (32, 8), (56, 56)]
    actions = ActionChains(browser, duration=10)
    for x, y in triangle:
        actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, x, y)).click()
    actions.perform()
    ActionChains(browser).send_keys("\ue007").perform()  # Enter closes the polygon
    browser.find_elements("css selector", ".entity-prompt")[0].send_keys("a green triangle")
    mask = page_masks(browser)[0]
    assert iou(mask, polygon_to_mask(triangle, SIZE, SIZE)) > 0.9
    browser.find_element("id", "tool-eraser").click()
    set_value(browser, "brush-size", 8)
    drag(browser, [(20, 44), (44, 44)])
    assert not page_masks(browser)[0][44, 32]

    browser.find_element("id", "add-entity").click()
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(40, 4), (60, 20)])
    browser.find_elements("css selector", ".entity-prompt")[1].send_keys("a red square")
    browser.find_elements("css selector", ".entity-up")[1].click()  # the square becomes entity 0
    assert [e.get_attribute("value") for e in browser.find_elements("css selector", ".entity-prompt")] == \
        ["a red square", "a green triangle"]
    assert page_masks(browser)[0][10, 50]

    # inpaint an uploaded image: only the entities' regions change
    photo = tmp_path / "photo.png"
    Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(photo)
    browser.find_element("id", "upload-image").send_keys(str(photo))
    wait_for(browser, lambda d: "photo.png: 64×64" in d_text(d, "background-status"), "the upload")
    assert browser.find_element("id", "mode-inpaint").is_selected()
    previous = browser.find_element("tag name", "body").get_attribute("data-result")
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-result") not in (None, previous),
             "the inpainting result")
    out = np.asarray(Image.open(io.BytesIO(fetch(browser.find_element("id", "download-png").get_attribute("href"))))
                     .convert("RGB"))
    masks = page_masks(browser)
    outside = ~(masks[0] | masks[1])
    assert (out[outside] == 90).all()
    browser.save_screenshot(str(screenshots / "5_inpaint.png"))
    if os.environ.get("ELIGEN_SCREENSHOTS"):
        shutil.copy(screenshots / "2_result.png", screenshots / "latest.png")
