"""`eligen ui` in a real browser: headless Debian Chromium driven by selenium (`make test` installs both and sets
ELIGEN_REQUIRE_BROWSER=1, so there they must be present). The tests start `eligen ui` on a free loopback port and do
what a user would: draw entities with the mouse, generate on the shipped tiny model, download and reload, inpaint,
undo and redo, resize, cancel, reach every control with the keyboard; and what another web page would try (a
cross-origin POST, a DNS-rebound host name). Screenshots go to $ELIGEN_SCREENSHOTS (default: the tests' temporary
folder); the 1400x900 and 800x900 first views are the README's."""

from __future__ import annotations

import io
import json
import os
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
# one browser per run: these tests share one pytest-xdist worker
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=MISSING or ""), pytest.mark.xdist_group("browser")]


@pytest.fixture(scope="module")
def app_url():
    """`eligen ui` as a user starts it, on a free loopback port, with a 1 MiB upload cap."""
    yield from serve("--max-upload-mb", "1")


@pytest.fixture(scope="module")
def edit_app_url(tiny_kontext_dir):
    """`eligen ui` on an edit model (the tiny FLUX.1 Kontext pipeline), started only for the Edit test."""
    yield from serve("--model", str(tiny_kontext_dir), "--max-steps", "8")


def serve(*flags: str):
    """`eligen ui FLAGS` on a free loopback port: its address while it runs, then stopped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "eligen.cli", "ui", "--port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, seen = None, []
    deadline = time.monotonic() + WAIT_S
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("eligen ui: http://127.0.0.1:"):
            url = line.split()[2].rstrip("/")
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
                 "--disable-sync", "--window-size=1400,900",
                 "--host-resolver-rules=MAP rebound.test 127.0.0.1",  # a DNS-rebinding page, resolved to the app
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(30)
    viewport(driver, 1400, 900)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_job_left_running(app_url, browser):
    """A failing test leaves no long job in the queue for the next one."""
    yield
    try:
        running = browser.execute_script("return typeof state !== 'undefined' && state.running ? state.running : null")
    except Exception:
        return
    if running:
        post(app_url + f"/api/jobs/{running}/cancel", {})


def viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except Exception as exc:
        raise AssertionError(f"timed out waiting for {what}; status: "
                             f"{d_text(driver, 'status')!r}, errors: {d_text(driver, 'errors')!r}, "
                             f"notice: {d_text(driver, 'notice')!r}") from exc


def d_text(driver, element_id: str) -> str:
    try:
        return driver.find_element("id", element_id).text
    except Exception:
        return "<none>"


def body_data(driver, name: str) -> str | None:
    return driver.find_element("tag name", "body").get_attribute(f"data-{name}")


def open_app(driver, url: str, fresh: bool = True) -> None:
    """The page; ``fresh``: as a first visit (the layout kept across reloads is forgotten)."""
    if fresh:
        driver.get(url + "/api/info")  # the same origin, without the page (which saves itself as it goes)
        driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    wait_for(driver, lambda d: body_data(d, "ready") == "1", "the page")


def canvas_offset(canvas, x: float, y: float, size: int = SIZE) -> tuple[int, int]:
    """Image pixel ``(x, y)`` of a ``size`` x ``size`` image -> selenium's offset from the canvas's centre, in CSS
    pixels (the canvas is shown larger than the image; its on-screen size is read, not assumed)."""
    width, height = canvas.rect["width"], canvas.rect["height"]
    return round((x / size - 0.5) * width), round((y / size - 0.5) * height)


def drag(driver, points: list[tuple[float, float]], size: int = SIZE) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "canvas")
    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, *points[0], size)).click_and_hold()
    for point in points[1:]:
        actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, *point, size))
    actions.release().perform()


def keys(driver, *sequence) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*sequence).perform()


def press(driver, modifier: str, key: str, shift: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    chain = ActionChains(driver).key_down(modifier)
    if shift:
        chain = chain.key_down(Keys.SHIFT)
    chain = chain.send_keys(key)
    if shift:
        chain = chain.key_up(Keys.SHIFT)
    chain.key_up(modifier).perform()


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


def post(url: str, data: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def mask_uris(driver) -> list[str]:
    return driver.execute_script("return state.entities.map((e) => maskDataURI(e.layer));")


def page_masks(driver) -> list[np.ndarray]:
    return [binarize_mask(uri) for uri in mask_uris(driver)]


def generate_and_wait(driver) -> str:
    """Press Generate; the id of the result shown once the job is done."""
    previous = body_data(driver, "result")
    driver.find_element("id", "generate").click()
    wait_for(driver, lambda d: body_data(d, "result") not in (None, previous), "the result")
    return body_data(driver, "result")


def fixed_seed(driver, seed: int) -> None:
    if driver.find_element("id", "random-seed").is_selected():
        driver.find_element("id", "random-seed").click()
    set_value(driver, "seed", seed)


def two_entities(driver) -> None:
    """A layout drawn by hand: two rectangles with their prompts."""
    driver.find_element("id", "prompt").send_keys("a red circle and a blue square on a gray background")
    driver.find_element("id", "tool-rect").click()
    drag(driver, [(4, 6), (30, 32)])
    driver.find_elements("css selector", ".entity-prompt")[0].send_keys("a red circle")
    driver.find_element("id", "add-entity").click()
    drag(driver, [(34, 30), (60, 58)])
    driver.find_elements("css selector", ".entity-prompt")[1].send_keys("a blue square")


RECT = (4, 6, 30, 32)  # x0, y0, x1, y1 in image pixels
STROKE, BRUSH = ((40, 38), (56, 54)), 12


def test_draw_generate_download_and_reload(app_url, browser, screenshots, tmp_path):
    open_app(browser, app_url)
    browser.find_element("id", "prompt").send_keys("a red circle and a blue square on a gray background")

    # entity 1: a rectangle, dragged with the mouse
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(RECT[0], RECT[1]), ((RECT[0] + RECT[2]) / 2, (RECT[1] + RECT[3]) / 2), (RECT[2], RECT[3])])
    browser.find_elements("css selector", ".entity-prompt")[0].send_keys("a red circle")

    # entity 2: a brush stroke, its prompt still empty -> the preview names entity 2's prompt
    browser.find_element("id", "add-entity").click()
    browser.find_element("id", "tool-brush").click()
    set_value(browser, "brush-size", BRUSH)
    drag(browser, [STROKE[0], ((STROKE[0][0] + STROKE[1][0]) / 2, (STROKE[0][1] + STROKE[1][1]) / 2), STROKE[1]])
    wait_for(browser, lambda d: "Entity 2, prompt" in d_text(d, "errors"), "the empty-prompt to-do")
    assert "To do" in d_text(browser, "errors")  # not an error before the first Generate
    browser.find_element("id", "generate").click()  # refused by the server too, naming the same field
    wait_for(browser, lambda d: "Entity 2, prompt" in d_text(d, "errors") and "To do" not in d_text(d, "errors")
             and d.find_element("id", "generate").is_enabled(), "the refused generation")
    assert browser.find_element("id", "result-image").get_attribute("src") in (None, "")

    browser.find_elements("css selector", ".entity-prompt")[1].send_keys("a blue square")
    wait_for(browser, lambda d: d_text(d, "errors") == "", "the errors to clear")
    tokens = [e.text for e in browser.find_elements("css selector", ".entity-tokens")]
    assert all("of 16×16 tokens" in t for t in tokens), tokens

    fixed_seed(browser, 5)
    set_value(browser, "steps", 4)
    generate_and_wait(browser)
    image = browser.find_element("id", "result-image")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
             == SIZE, "the image to be shown")
    assert browser.execute_script("return document.getElementById('result-overlay').naturalWidth") >= 512
    assert image.rect["width"] >= 300  # shown large, not as a 256-pixel thumbnail

    layout = json.loads(fetch(browser.find_element("id", "download-layout").get_attribute("href")))
    assert [e["prompt"] for e in layout["entities"]] == ["a red circle", "a blue square"]
    masks = [binarize_mask(e["mask"]) for e in layout["entities"]]
    rect = np.zeros((SIZE, SIZE), bool)
    rect[RECT[1]:RECT[3], RECT[0]:RECT[2]] = True
    assert iou(masks[0], rect) > 0.9, iou(masks[0], rect)
    assert iou(masks[1], capsule(*STROKE, BRUSH / 2)) > 0.9, iou(masks[1], capsule(*STROKE, BRUSH / 2))
    assert browser.find_element("id", "download-png").get_attribute("download") == "eligen_5.png"
    assert fetch(browser.find_element("id", "download-overlay").get_attribute("href")).startswith(b"\x89PNG")

    png = tmp_path / "eligen_5.png"
    png.write_bytes(fetch(browser.find_element("id", "download-png").get_attribute("href")))
    reload_keeps_the_page_and_a_png_restores_it(browser, app_url, masks, png)


def reload_keeps_the_page_and_a_png_restores_it(browser, app_url: str, masks: list[np.ndarray], png: Path) -> None:
    open_app(browser, app_url, fresh=False)  # the page survives a reload as it was
    assert [e.get_attribute("value") for e in browser.find_elements("css selector", ".entity-prompt")] == \
        ["a red circle", "a blue square"]
    assert all((r == m).all() for r, m in zip(page_masks(browser), masks, strict=True))
    open_app(browser, app_url)  # the downloaded PNG into a fresh page: the layout comes back exactly
    assert len(browser.find_elements("css selector", ".entity")) == 1
    browser.find_element("id", "load-file").send_keys(str(png))
    wait_for(browser, lambda d: body_data(d, "loaded"), "the PNG to load")
    assert [e.get_attribute("value") for e in browser.find_elements("css selector", ".entity-prompt")] == \
        ["a red circle", "a blue square"]
    assert browser.find_element("id", "prompt").get_attribute("value").startswith("a red circle and a blue square")
    assert browser.find_element("id", "seed").get_attribute("value") == "5"
    assert all((r == m).all() for r, m in zip(page_masks(browser), masks, strict=True))


def test_an_oversize_upload_is_refused_in_the_page(app_url, browser, tmp_path):
    open_app(browser, app_url)
    browser.find_element("id", "mode-inpaint").click()
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(int(1.5 * 2**20)))  # the app runs with a 1 MiB cap
    browser.find_element("id", "upload-image").send_keys(str(big))
    wait_for(browser, lambda d: "above this app's limit of 1 MiB" in d_text(d, "notice"), "the refusal")
    assert d_text(browser, "background-status") == "no image yet"


def swatches(driver) -> dict[str, str]:
    return {item.find_element("css selector", ".entity-prompt").get_attribute("value"):
            item.find_element("css selector", ".entity-colour").value_of_css_property("background-color")
            for item in driver.find_elements("css selector", ".entity")}


def test_polygon_eraser_reorder_keeps_colours_and_inpaint(app_url, browser, screenshots, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    open_app(browser, app_url)
    browser.find_element("id", "prompt").send_keys("shapes on a gray background")
    browser.find_element("id", "tool-polygon").click()
    canvas = browser.find_element("id", "canvas")
    triangle = [(8, 56), (32, 8), (56, 56)]
    actions = ActionChains(browser, duration=10)
    for x, y in triangle:
        actions.move_to_element_with_offset(canvas, *canvas_offset(canvas, x, y)).click()
    actions.perform()
    keys(browser, "\ue007")  # Enter closes the polygon
    browser.find_elements("css selector", ".entity-prompt")[0].send_keys("a green triangle")
    assert iou(page_masks(browser)[0], polygon_to_mask(triangle, SIZE, SIZE)) > 0.9
    browser.find_element("id", "tool-eraser").click()
    set_value(browser, "brush-size", 8)
    drag(browser, [(20, 44), (44, 44)])
    assert not page_masks(browser)[0][44, 32]

    browser.find_element("id", "add-entity").click()
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(40, 4), (60, 20)])
    browser.find_elements("css selector", ".entity-prompt")[1].send_keys("a red square")
    before = swatches(browser)
    pixel = "return [...document.getElementById('canvas').getContext('2d').getImageData(50, 10, 1, 1).data];"
    square_colour = browser.execute_script(pixel)
    browser.find_elements("css selector", ".entity-up")[1].click()  # the square becomes entity 1
    assert [e.get_attribute("value") for e in browser.find_elements("css selector", ".entity-prompt")] == \
        ["a red square", "a green triangle"]
    assert page_masks(browser)[0][10, 50]
    assert swatches(browser) == before and len(set(before.values())) == 2  # each entity keeps its colour
    browser.find_element("css selector", ".entity-prompt").click()  # the square is the active one on both sides
    assert browser.execute_script(pixel) == square_colour

    photo = tmp_path / "photo.png"
    Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(photo)
    browser.find_element("id", "upload-image").send_keys(str(photo))
    wait_for(browser, lambda d: "photo.png: 64×64" in d_text(d, "background-status"), "the upload")
    assert browser.find_element("id", "mode-inpaint").is_selected()
    set_value(browser, "steps", 2)
    generate_and_wait(browser)
    out = np.asarray(Image.open(io.BytesIO(fetch(browser.find_element("id", "download-png").get_attribute("href"))))
                     .convert("RGB"))
    masks = page_masks(browser)
    assert (out[~(masks[0] | masks[1])] == 90).all()
    browser.save_screenshot(str(screenshots / "inpaint.png"))


def test_other_web_pages_cannot_use_the_app(app_url, browser):
    port = app_url.rsplit(":", 1)[1]
    browser.get(f"http://rebound.test:{port}/")  # a DNS-rebinding page: its name now points at the app
    assert "answers only requests addressed to it" in browser.find_element("tag name", "body").text
    open_app(browser, f"http://localhost:{port}")  # another origin than 127.0.0.1's; the page itself works there
    body = {"layout": {"prompt": "p", "width": SIZE, "height": SIZE, "seed": 4242, "entities": []},
            "params": {"steps": 1}}
    outcomes = browser.execute_async_script("""
        const [target, body, done] = arguments;
        const text = fetch(target + '/api/jobs', {method: 'POST', mode: 'no-cors', body: JSON.stringify(body),
                                                  headers: {'Content-Type': 'text/plain'}});
        const json = fetch(target + '/api/jobs', {method: 'POST', body: JSON.stringify(body),
                                                  headers: {'Content-Type': 'application/json'}});
        Promise.allSettled([text, json]).then((r) => done(r.map((x) => x.status)));""", app_url, body)
    assert outcomes[1] == "rejected"  # no CORS for another origin
    time.sleep(1.5)  # a queued 1-step job would be done by now
    history = json.loads(fetch(app_url + "/api/jobs"))["jobs"]
    assert all(job["seed"] != 4242 for job in history), "another origin queued a job"
    request = urllib.request.Request(app_url + "/api/info", headers={"Host": "rebound.test"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def test_a_png_loaded_in_inpaint_mode_renders_again_byte_for_byte(app_url, browser, tmp_path):
    from PIL import Image

    open_app(browser, app_url)
    two_entities(browser)
    fixed_seed(browser, 9)
    set_value(browser, "steps", 2)
    generate_and_wait(browser)
    original = fetch(browser.find_element("id", "download-png").get_attribute("href"))
    png = tmp_path / "original.png"
    png.write_bytes(original)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (SIZE, SIZE), (30, 160, 30)).save(photo)
    browser.find_element("id", "upload-image").send_keys(str(photo))  # now inpainting over another image
    wait_for(browser, lambda d: "photo.png" in d_text(d, "background-status"), "the upload")
    browser.find_element("id", "load-file").send_keys(str(png))
    wait_for(browser, lambda d: body_data(d, "loaded"), "the PNG to load")
    assert browser.find_element("id", "mode-generate").is_selected()  # the mode it was made in
    generate_and_wait(browser)
    again = fetch(browser.find_element("id", "download-png").get_attribute("href"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(again))), np.asarray(Image.open(io.BytesIO(original))))


def test_use_as_background_during_a_running_job_takes_the_image_shown(app_url, browser):
    open_app(browser, app_url)
    two_entities(browser)
    set_value(browser, "steps", 2)
    shown = generate_and_wait(browser)
    set_value(browser, "steps", 200)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda d: any(w in d_text(d, "status") for w in ("queued", "generating", "waiting")),
             "the second job")
    browser.find_element("id", "use-background").click()
    wait_for(browser, lambda d: "eligen_" in d_text(d, "background-status"), "the background")
    assert browser.execute_script("return state.background.ref") == f"job:{shown}"  # not the running job's
    assert browser.execute_script("return state.running") not in (None, shown)
    browser.find_element("id", "cancel").click()
    wait_for(browser, lambda d: "cancelled" in d_text(d, "status"), "the cancelled job")


def test_a_size_the_canvas_cannot_hold_changes_nothing_and_round_trips_keep_every_pixel(app_url, browser):
    open_app(browser, app_url)
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(5, 7), (33, 41)])
    browser.find_element("id", "tool-brush").click()
    drag(browser, [(40, 50), (60, 10)])
    drawn = mask_uris(browser)
    for width, says in ((99999, "at most 16384"), (6400, "above this app's limit"), (1024, "thin strip")):
        set_value(browser, "width", width)
        assert says in d_text(browser, "notice"), (width, d_text(browser, "notice"))
        assert browser.execute_script("return [state.width, state.height]") == [SIZE, SIZE]
        assert browser.find_element("id", "width").get_attribute("value") == str(SIZE)
        assert mask_uris(browser) == drawn
    set_value(browser, "width", 30)
    assert browser.execute_script("return [state.width, state.height]") == [30, SIZE]
    set_value(browser, "width", 64)
    assert mask_uris(browser) == drawn  # 64 -> 30 -> 64 loses nothing
    press(browser, "\ue009", "z")  # Ctrl+Z: back to 30 wide
    assert browser.execute_script("return state.width") == 30
    press(browser, "\ue009", "z")
    assert browser.execute_script("return state.width") == SIZE and mask_uris(browser) == drawn


def test_undo_and_redo_return_the_exact_masks(app_url, browser):
    from selenium.webdriver.common.keys import Keys

    open_app(browser, app_url)
    states = [(mask_uris(browser), 1)]

    def record():
        states.append((mask_uris(browser), len(browser.find_elements("css selector", ".entity"))))

    keys(browser, "b")
    set_value(browser, "brush-size", 6)
    drag(browser, [(8, 8), (30, 20)])
    record()
    drag(browser, [(10, 50), (50, 40)])
    record()
    browser.find_element("id", "add-entity").click()
    record()
    keys(browser, "r")
    assert browser.find_element("id", "tool-rect").is_selected()
    drag(browser, [(36, 30), (60, 60)])
    record()
    browser.find_elements("css selector", ".entity-colour")[0].click()
    browser.execute_script("document.activeElement.blur()")
    keys(browser, Keys.DELETE)  # clears the selected (first) mask
    record()
    assert states[-1][0][0] != states[-2][0][0]
    browser.find_elements("css selector", ".entity-remove")[1].click()
    record()
    assert states[-1][1] == 1
    browser.execute_script("document.activeElement.blur()")
    for expected in reversed(states[:-1]):
        press(browser, Keys.CONTROL, "z")
        assert (mask_uris(browser), len(browser.find_elements("css selector", ".entity"))) == expected
    for expected in states[1:]:
        press(browser, Keys.CONTROL, "z", shift=True)
        assert (mask_uris(browser), len(browser.find_elements("css selector", ".entity"))) == expected
    keys(browser, "[")
    assert int(browser.find_element("id", "brush-size").get_attribute("value")) < 6


def test_cancel_a_queued_and_a_running_job_and_a_reloaded_tab_finds_its_job(app_url, browser):
    open_app(browser, app_url)
    browser.find_element("id", "load-example").click()
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".entity")) == 2, "the example")
    layout = browser.execute_script("return layoutPayload()")
    blocker = post(app_url + "/api/jobs", {"layout": layout, "params": {"steps": 200}})  # another tab's long job
    try:
        set_value(browser, "steps", 2)
        browser.find_element("id", "generate").click()
        wait_for(browser, lambda d: "ahead" in d_text(d, "status"), "the queued job")
        browser.find_element("id", "cancel").click()
        wait_for(browser, lambda d: "cancelled at step 0" in d_text(d, "status"), "the queued job to be cancelled")
    finally:
        post(app_url + f"/api/jobs/{blocker['id']}/cancel", {})

    set_value(browser, "steps", 200)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda d: "generating" in d_text(d, "status"), "the running job")
    running = browser.execute_script("return state.running")
    open_app(browser, app_url, fresh=False)  # the tab is reloaded: it finds its job
    assert browser.execute_script("return state.running") == running
    wait_for(browser, lambda d: "generating" in d_text(d, "status"), "the job after the reload")
    browser.find_element("id", "cancel").click()
    wait_for(browser, lambda d: "cancelled at step" in d_text(d, "status"), "the running job to stop")
    job = json.loads(fetch(app_url + f"/api/jobs/{running}"))
    assert job["state"] == "cancelled" and job["step"] < 200


FOCUSABLE = """
    const all = [...document.querySelectorAll('input, select, textarea, button, a[href], [tabindex]')];
    const visible = (e) => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden'
        && !e.closest('[hidden]') && !e.closest('details:not([open]) > :not(summary)');
    const seen = new Set(); const out = [];
    all.filter((e) => !e.disabled && visible(e) && e.tabIndex >= 0).forEach((e, i) => {
      const key = e.type === 'radio' ? 'radio:' + e.name : 'el:' + i;
      e.dataset.tabKey = key;
      if (!seen.has(key)) { seen.add(key); out.push(key); }
    });
    return out;"""


def test_the_keyboard_reaches_every_control(app_url, browser):
    from selenium.webdriver.common.keys import Keys

    open_app(browser, app_url)
    browser.find_element("id", "load-example").click()
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".entity")) == 2, "the example")
    if browser.find_elements("css selector", "#history button"):
        browser.find_element("css selector", "#history button").click()  # a result's links are controls too
    else:
        set_value(browser, "steps", 2)
        generate_and_wait(browser)
    wanted = browser.execute_script(FOCUSABLE)
    browser.execute_script("""document.activeElement.blur(); document.querySelector('main').scrollTop = 0;
        window.reached = new Set();
        document.addEventListener('focusin', (e) => {
          if (e.target.dataset.tabKey) reached.add(e.target.dataset.tabKey);
        });""")
    keys(browser, *[Keys.TAB] * (len(wanted) + 40))
    reached = set(browser.execute_script("return [...window.reached]"))
    missing = [browser.execute_script(
        "const e = document.querySelector(`[data-tab-key='${arguments[0]}']`); return e.outerHTML.slice(0, 120)", k)
        for k in wanted if k not in reached]
    assert not missing, missing
    names = browser.execute_script("""return [...document.querySelectorAll('#entities input, #entities button')]
        .filter((e) => !(e.getAttribute('aria-label') || (e.labels && e.labels.length))).map((e) => e.outerHTML)""")
    assert names == []  # every prompt box, button and file input in the entity list is named for screen readers


def first_view(browser, screenshots, width: int) -> None:
    image = browser.find_element("id", "result-image")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
             "the image")
    browser.execute_script("document.querySelector('main').scrollTop = 0")
    generate = browser.find_element("id", "generate").rect
    assert generate["y"] + generate["height"] <= 900
    if width == 1400:
        assert image.rect["y"] + image.rect["height"] <= 900, image.rect  # no scrolling at all
    else:
        assert image.rect["y"] < 900, image.rect  # it starts on the first screen
    browser.save_screenshot(str(screenshots / f"ui_{width}x900.png"))


def test_the_first_view_shows_generate_and_the_result(app_url, browser, screenshots):
    open_app(browser, app_url)
    browser.find_element("id", "load-example").click()
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".entity")) == 2, "the example")
    fixed_seed(browser, 3)
    set_value(browser, "steps", 3)
    generate_and_wait(browser)
    first_view(browser, screenshots, 1400)
    viewport(browser, 800, 900)
    try:
        open_app(browser, app_url, fresh=False)  # the same page, narrow: the result shown is kept too
        first_view(browser, screenshots, 800)
    finally:
        viewport(browser, 1400, 900)


def test_edit_mode_on_an_edit_model_uploads_draws_and_edits(edit_app_url, browser, screenshots, tmp_path):
    from PIL import Image

    edit = 32  # the tiny Kontext pipeline's test size
    open_app(browser, edit_app_url)
    assert browser.find_element("id", "mode-edit").is_selected()  # the model's only mode
    assert not browser.find_element("id", "mode-generate").is_displayed()
    assert not browser.find_element("id", "mode-inpaint").is_displayed()
    assert browser.find_element("id", "keep-outside").is_selected()  # on by default
    photo = tmp_path / "photo.png"
    pixels = (np.random.default_rng(1).random((edit, edit, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(photo)
    browser.find_element("id", "upload-image").send_keys(str(photo))
    wait_for(browser, lambda d: "photo.png: 32×32" in d_text(d, "background-status"), "the upload")
    browser.find_element("id", "prompt").send_keys("make it brighter")
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(4, 4), (20, 16)], edit)
    browser.find_elements("css selector", ".entity-prompt")[0].send_keys("a dog")
    browser.find_element("id", "auto-resize").click()  # the tiny model sees the input at its own size
    fixed_seed(browser, 4)
    set_value(browser, "steps", 2)
    set_value(browser, "max-sequence-length", 16)
    wait_for(browser, lambda d: d_text(d, "errors") == "", "the errors to clear")
    generate_and_wait(browser)
    assert d_text(browser, "result-caption").startswith("edited: seed 4, 32×32")
    png = fetch(browser.find_element("id", "download-png").get_attribute("href"))
    image = Image.open(io.BytesIO(png))
    record = json.loads(image.text["eligen"])
    assert record["command"] == "edit" and record["params"]["auto_resize"] is False
    assert record["layout"]["entities"][0]["prompt"] == "a dog"
    mask = page_masks(browser)[0]
    rect = np.zeros((edit, edit), bool)
    rect[4:16, 4:20] = True
    assert iou(mask, rect) > 0.8, iou(mask, rect)
    out = np.asarray(image.convert("RGB"))
    assert (out[~mask] == pixels[~mask]).all() and not (out[mask] == pixels[mask]).all()  # kept outside
    browser.save_screenshot(str(screenshots / "edit.png"))


@pytest.fixture(scope="module")
def control_app_url(tmp_path_factory, random_lora_file):
    """`eligen ui` on a tiny FLUX.1 ControlNet pipeline (its ControlNet saved inside) offering one entity LoRA."""
    from eligen.families.flux.testing import save_tiny_controlnet_pipeline

    folder = save_tiny_controlnet_pipeline(tmp_path_factory.mktemp("ui-controlnet") / "pipe")
    yield from serve("--model", str(folder), "--entity-lora", f"style={random_lora_file}", "--max-steps", "4")


def test_an_entity_with_a_lora_and_one_with_a_control_image(control_app_url, browser, screenshots, random_lora_file,
                                                           tmp_path):
    import base64

    from PIL import Image
    from selenium.webdriver.support.ui import Select

    size = 32  # the tiny pipeline's test size: 8x8 tokens
    open_app(browser, control_app_url)
    assert browser.find_element("id", "control-panel").is_displayed()  # the model runs a ControlNet
    set_value(browser, "width", size)
    set_value(browser, "height", size)
    browser.find_element("id", "prompt").send_keys("a cat")
    browser.find_element("id", "tool-rect").click()
    drag(browser, [(0, 0), (15.5, 31.5)], size)
    browser.find_elements("css selector", ".entity-prompt")[0].send_keys("a dog")
    Select(browser.find_element("css selector", ".entity-lora")).select_by_value("style")  # by name: no path
    browser.execute_script("const e = arguments[0]; e.value = '0.7'; e.dispatchEvent(new Event('input'));",
                           browser.find_element("css selector", ".entity-lora-scale"))
    browser.find_element("id", "add-entity").click()
    drag(browser, [(16.5, 0), (31.5, 31.5)], size)
    browser.find_elements("css selector", ".entity-prompt")[1].send_keys("a red ball")
    pose = tmp_path / "pose.png"
    Image.fromarray((np.random.default_rng(2).random((size, size, 3)) * 255).astype(np.uint8)).save(pose)
    browser.find_element("css selector", 'input[aria-label="Control image for entity 2"]').send_keys(str(pose))
    wait_for(browser, lambda d: d.find_elements("css selector", ".entity-control-scale"), "the control image")
    assert not browser.find_elements("css selector", ".entity:first-child .entity-control")  # entity 2's alone
    fixed_seed(browser, 4)
    set_value(browser, "steps", 2)
    set_value(browser, "max-sequence-length", 16)
    wait_for(browser, lambda d: d_text(d, "errors") == "", "the errors to clear")
    generate_and_wait(browser)
    png = fetch(browser.find_element("id", "download-png").get_attribute("href"))
    record = json.loads(Image.open(io.BytesIO(png)).text["eligen"])
    first, second = record["layout"]["entities"]
    assert first["lora"] == str(random_lora_file) and first["lora_scale"] == 0.7 and "control_image" not in first
    assert second["control_image"] == "data:image/png;base64," + base64.b64encode(pose.read_bytes()).decode()
    assert "lora" not in second and record["params"]["steps"] == 2
    browser.save_screenshot(str(screenshots / "entity-lora-and-control.png"))
    # a reload keeps both
    open_app(browser, control_app_url, fresh=False)
    assert Select(browser.find_element("css selector", ".entity-lora")).first_selected_option.text == "LoRA style"
    assert len(browser.find_elements("css selector", ".entity-control")) == 1
