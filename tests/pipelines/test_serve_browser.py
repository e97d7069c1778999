"""The web page of ``ldmseg serve`` in a real headless Chromium (Selenium, Debian's chromium and
chromium-driver): upload, segment, paint known regions, inpaint; checked against direct HTTP calls
with the same parameters, and the page may talk to no host but the server.

The browser is a requirement, not an option: without /usr/bin/chromium and /usr/bin/chromedriver
the test fails and says how to install them (scripts/setup.sh as root).
"""

from __future__ import annotations

import base64
import io
import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
import requests
from PIL import Image

from ldmseg.data.ids import decode_panoptic_png, id_to_rgb

pytestmark = pytest.mark.ray

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
W, H = 64, 48


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def rects_image() -> np.ndarray:
    """(48, 64, 3) uint8: three flat rectangles on a flat background."""
    image = np.empty((H, W, 3), np.uint8)
    image[:] = (40, 90, 160)
    image[4:24, 6:30] = (220, 40, 40)
    image[20:44, 34:60] = (40, 200, 60)
    image[28:46, 4:22] = (240, 220, 30)
    return image


def post(url: str, path: str, files: dict[str, bytes], params: dict) -> dict:
    r = requests.post(url + path, files={k: (k + ".png", v, "image/png") for k, v in files.items()},
                      params=params, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def id_map(body: dict) -> np.ndarray:
    return decode_panoptic_png(base64.b64decode(body["id_map_png"])).astype(np.int64)


def require_browser() -> None:
    """Fail (never skip) without the browser: the page must be tested wherever the suite runs."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"browser missing: {', '.join(missing)} not found; install Debian's chromium and "
                    "chromium-driver by running scripts/setup.sh as root", pytrace=False)


@contextmanager
def chromium(monkeypatch):
    """Headless Chromium driven by Debian's chromedriver, with Chrome's performance log on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=900,700"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def request_urls(driver) -> list[str]:
    """The URLs of all requests the page started since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def canvas_rgb(driver) -> np.ndarray:
    data = driver.execute_script(
        "const c = document.getElementById('view');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
    return np.array(data, dtype=np.int64).reshape(H, W, 4)[..., :3]


def page_array(driver, name: str) -> np.ndarray:
    return np.array(driver.execute_script(f"return Array.from(window.ldmseg.{name});"), dtype=np.int64).reshape(H, W)


def test_page_segments_paints_and_inpaints_like_the_api(request, monkeypatch, tmp_path):
    require_browser()  # before Ray and Serve start, so that a missing browser fails fast
    served = request.getfixturevalue("served")
    with chromium(monkeypatch) as driver:
        check_page(driver, served, tmp_path)


def check_page(driver, served, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, info = served
    image = rects_image()
    path = tmp_path / "rects.png"
    path.write_bytes(png_bytes(image))
    # the page sends the model's default sampler and steps and seed 0
    params = {"sampler": info["sampling"]["sampler"], "steps": str(info["sampling"]["steps"]), "seed": "0"}

    # the API first, with the parameters the page will send
    seg = post(url, "/v1/segment", {"image": path.read_bytes()}, params)
    api_ids = id_map(seg)
    assert api_ids.shape == (H, W)

    wait = WebDriverWait(driver, 60)
    state = lambda d: d.execute_script("return document.body.dataset.state || ''")  # noqa: E731
    driver.get(url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) == len(info["samplers"]))
    assert Select(driver.find_element(By.ID, "sampler")).first_selected_option.text == params["sampler"]
    assert driver.find_element(By.ID, "steps").get_attribute("value") == params["steps"]
    assert driver.find_element(By.ID, "segment").get_attribute("disabled") is not None

    driver.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: state(d) == "loaded")
    plain = canvas_rgb(driver)
    np.testing.assert_array_equal(plain, image)  # the canvas shows the image, pixel for pixel

    driver.find_element(By.ID, "segment").click()
    wait.until(lambda d: state(d) == "segmented" or "failed" in d.find_element(By.ID, "status").text)
    assert state(driver) == "segmented", driver.find_element(By.ID, "status").text

    # the page decoded the same map the API returns for the same request (the model is seeded)
    ids = page_array(driver, "ids")
    np.testing.assert_array_equal(ids, api_ids)
    rows = driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
    assert [int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows] == [s["id"] for s in seg["segments"]]
    assert len(rows) == len(seg["segments"]) >= 1, "the tiny model should find segments in this image"

    # the overlay: void pixels are the image darkened (0.45), segment pixels are tinted by their colour
    overlay = canvas_rgb(driver)
    void, segs = ids == 0, ids > 0
    assert segs.sum() > 100
    assert np.abs(overlay[void] - 0.45 * plain[void]).max() <= 1
    assert (np.abs(overlay[segs] - plain[segs]).sum(-1) > 10).mean() > 0.95
    for sid in np.unique(ids[segs]):  # one flat colour per segment where the image is flat
        same = (ids == sid) & np.all(plain == plain[ids == sid][0], -1)
        assert len(np.unique(overlay[same].reshape(-1, 3), axis=0)) == 1

    # paint a horizontal stroke through the middle with brush "keep" (radius 8 image pixels)
    driver.find_element(By.CSS_SELECTOR, "input[name=brush][value=keep]").click()
    assert driver.find_element(By.ID, "brush").get_attribute("value") == "8"
    canvas = driver.find_element(By.ID, "view")
    # offsets from the centre of the canvas, whose CSS size is the image's (1 CSS px = 1 image px)
    assert (canvas.size["width"], canvas.size["height"]) == (W + 2, H + 2)  # plus the 1 px border
    ActionChains(driver).move_to_element_with_offset(canvas, -10, 0).click_and_hold() \
        .move_by_offset(10, 0).move_by_offset(10, 0).release().perform()
    known = page_array(driver, "known") > 0
    assert known.sum() > 0
    # the brush disks around the stroke's points (x = 22..42, y = 24), no further; +-1 pixel, as the
    # canvas may sit at a fractional CSS position while pointer events come at whole ones
    yy, xx = np.nonzero(known)
    box = (yy.min(), yy.max(), xx.min(), xx.max())
    assert known[24, 22] and known[24, 32] and known[24, 42], box
    assert abs(yy.min() - 16) <= 1 and abs(yy.max() - 32) <= 1 and yy.max() - yy.min() >= 15, box
    assert abs(xx.min() - 14) <= 1 and abs(xx.max() - 50) <= 1 and xx.max() - xx.min() >= 35, box
    painted = canvas_rgb(driver)
    assert np.all(painted[known].sum(-1) > overlay[known].sum(-1))  # every painted pixel got lighter
    np.testing.assert_array_equal(painted[~known], overlay[~known])  # and nothing else changed
    # the stroke covers segment pixels and (with this image and seed) void ones
    assert (known & segs).sum() > 0 and (known & void).sum() > 0, ((known & segs).sum(), (known & void).sum())

    # The API's inpainting, with the map and known mask the page sends: known pixels keep their ids
    # exactly, known void included. (Without the 'known' mask, the server treats black map pixels
    # as unknown, so only the painted segment pixels would be kept and painted void pixels could get
    # new segments: the page therefore sends the mask.)
    partial = np.where(known, ids, 0)
    inp = post(url, "/v1/inpaint", {"image": path.read_bytes(), "map": png_bytes(id_to_rgb(partial)),
                                    "known": png_bytes((known * 255).astype(np.uint8))}, params)
    api_new = id_map(inp)
    np.testing.assert_array_equal(api_new[known], ids[known])

    driver.find_element(By.ID, "inpaint").click()
    wait.until(lambda d: state(d) == "inpainted" or "failed" in d.find_element(By.ID, "status").text)
    assert state(driver) == "inpainted", driver.find_element(By.ID, "status").text
    new = page_array(driver, "ids")
    np.testing.assert_array_equal(new[known], ids[known])  # inpainting keeps the known segments (and void)
    np.testing.assert_array_equal(new, api_new)  # the page sent what the API call sent
    rows = driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
    assert [int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows] == [s["id"] for s in inp["segments"]]

    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    with Image.open(shot) as im:
        assert im.size[0] > 0 and im.size[1] > 0

    # every request of the page went to the server (data: and blob: URLs are local)
    urls = request_urls(driver)
    assert any(u.startswith(url + "/v1/inpaint") for u in urls), urls
    assert any(u.startswith(url + "/v1/segment") for u in urls), urls
    foreign = [u for u in urls if not (u.startswith(url + "/") or u.startswith(("data:", "blob:")))]
    assert not foreign, foreign
