"""The explorer page in a real browser: Debian's chromium, headless, driven by selenium and chromium-driver,
against a `detr serve` app on 127.0.0.1. No browser download: a machine without /usr/bin/chromium and
/usr/bin/chromedriver fails this test (`.ci/run` installs them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import REPO
from detr.inference.predictor import Detector
from detr.serve import ServeOptions
from serve_helpers import SIZE, png, running, tiny_model

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
           [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40]]  # explorer.js
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
ALPHA = 0.6  # explorer.js OVERLAY_ALPHA


def viridis(v: float) -> np.ndarray:
    x = min(max(v, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    return np.rint(VIRIDIS[i] + (x - i) * (VIRIDIS[i + 1] - VIRIDIS[i]))


@pytest.fixture
def browser(tmp_path):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:  # fail, not skip: CI must run this test
        raise FileNotFoundError(f"browser test needs Debian's chromium and chromium-driver; missing {missing} "
                                "(apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def pixel(driver, x: int, y: int) -> np.ndarray:
    script = "const c = document.getElementById('view').getContext('2d');" \
             "return Array.from(c.getImageData(arguments[0], arguments[1], 1, 1).data);"
    rgba = driver.execute_script(script, x, y)
    return np.array(rgba[:3], dtype=np.float64)


def state(driver, expression: str):
    return driver.execute_script(f"return JSON.parse(JSON.stringify({expression}));")


def clear_of(x: float, y: float, boxes: list[list[float]], margin: float = 4.0) -> bool:
    """(x, y) is at least ``margin`` pixels from every box outline and outside the label strips above them."""
    for x0, y0, x1, y1 in boxes:
        near_edge = (min(abs(x - x0), abs(x - x1)) < margin and y0 - margin < y < y1 + margin) or \
                    (min(abs(y - y0), abs(y - y1)) < margin and x0 - margin < x < x1 + margin)
        label = max(x0, 0) - margin < x < max(x0, 0) + 130 and max(y0 - 16, 0) - margin < y < max(y0, 16) + margin
        if near_edge or label:
            return False
    return True


def check_overlay(driver, attention_map: list[list[float]], data: dict, boxes: list[list[float]], image: np.ndarray,
                  avoid: tuple[float, float] | None = None) -> int:
    """Canvas pixels at feature-cell centres equal the image blended with the map's viridis colour (cells
    clear of boxes, labels and the point marker); returns how many cells were checked."""
    values = np.array(attention_map)
    lo, hi = values.min(), values.max()
    sx = data["stride"] * data["image"]["width"] / data["input_size"]["width"]
    sy = data["stride"] * data["image"]["height"] / data["input_size"]["height"]
    checked = 0
    order = np.argsort(values, axis=None)
    for flat in [*order[:6], *order[-6:]]:  # the coolest and the hottest cells
        i, j = divmod(int(flat), values.shape[1])
        x, y = (j + 0.5) * sx, (i + 0.5) * sy
        if x >= data["image"]["width"] - 1 or y >= data["image"]["height"] - 1 or not clear_of(x, y, boxes):
            continue
        if avoid is not None and abs(x - avoid[0]) < 12 and abs(y - avoid[1]) < 12:
            continue
        under = image[int(y), int(x)].astype(np.float64)
        expected = ALPHA * viridis((values[i, j] - lo) / max(hi - lo, 1e-12)) + (1 - ALPHA) * under
        assert np.abs(pixel(driver, int(x), int(y)) - expected).max() <= 2, (i, j, values[i, j])
        checked += 1
    assert checked >= 4
    return checked


def test_explorer_in_chromium(browser, tmp_path):
    image_path = tmp_path / "street.png"
    image_path.write_bytes(png(320, 240, seed=3))  # noise and a yellow square: distinct scores, known pixels
    image = np.asarray(Image.open(image_path).convert("RGB"))
    model = tiny_model(two_stage=True, encoder_content=True)  # the demo's query options: reference boxes too
    detector = Detector(model, threshold=0.0, batch_size=4, **SIZE)
    with running(detector, ServeOptions(threshold=0.0, max_batch=4, batch_wait_ms=2)) as s:
        driver, wait = browser, WebDriverWait(browser, 60)
        driver.get(s.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("tiny"))
        assert driver.find_element(By.ID, "reference-label").is_displayed()  # anchor queries
        assert not driver.find_element(By.ID, "panoptic-label").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(image_path))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

        # The detections the service gives this image (all 8 queries at threshold 0).
        answer = s.call("POST", "/v1/attention?threshold=0&max_detections=8", image_path.read_bytes()).json
        detections = answer["detections"]
        assert state(driver, "window.explorer.data.detections") == json.loads(json.dumps(detections))
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and len(scores) == 8

        def visible() -> list[str]:
            return [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#detections li:not([hidden]) button")]

        def set_threshold(value: float) -> None:
            driver.execute_script("const t = document.getElementById('threshold'); t.value = arguments[0];"
                                  "t.dispatchEvent(new Event('input'));", value)

        # The slider filters in the page: the list shows the detections scoring above it.
        assert visible() == [] and max(scores) < 0.5  # the page's default 0.5; this random model scores less
        set_threshold(0.3)
        assert visible() == [f"{d['name']} {d['score']:.3f}" for d in detections if d["score"] > 0.3]
        assert 1 < len(visible()) < 8
        # Only the best detection: its box outline on the canvas, in its class colour.
        assert scores[0] - scores[1] > 0.002  # the slider's step is 0.001
        set_threshold(round((scores[0] + scores[1]) / 2, 3))
        assert visible() == [f"{detections[0]['name']} {scores[0]:.3f}"]
        x0, y0, x1, y1 = detections[0]["box_xyxy"]
        width, height = 320, 240
        edges = [(round(x0), round((y0 + y1) / 2)), (round(x1), round((y0 + y1) / 2)),
                 (round((x0 + x1) / 2), round(y1))]
        inside = [(x, y) for x, y in edges if 1 <= x < width - 1 and 18 <= y < height - 1]
        assert inside, detections[0]
        colour = PALETTE[detections[0]["label"] % len(PALETTE)]
        for x, y in inside:
            assert pixel(driver, x, y).tolist() == colour, (x, y)
        # The slider at its top (keyboard: End) hides everything: the plain image is back under the box.
        slider = driver.find_element(By.ID, "threshold")
        slider.send_keys(Keys.END)
        assert driver.find_element(By.ID, "threshold-value").text == "1.00" and visible() == []
        for x, y in inside:
            assert pixel(driver, x, y).tolist() == image[y, x].tolist()

        # A detection chosen with the keyboard (Tab to its button, Enter) overlays its decoder attention.
        set_threshold(round((scores[0] + scores[1]) / 2, 3))
        button = driver.find_element(By.CSS_SELECTOR, "#detections li:not([hidden]) button")
        button.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-overlay") == "decoder")
        assert button.get_attribute("aria-pressed") == "true"
        assert check_overlay(driver, answer["decoder"][0], answer, [detections[0]["box_xyxy"]], image) >= 4

        # Encoder mode: a click on a pixel overlays the encoder self-attention from that pixel.
        driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=encoder]").click()
        canvas = driver.find_element(By.ID, "view")
        assert (canvas.size["width"], canvas.size["height"]) == (width, height)  # CSS pixels = image pixels
        target = (250, 60)
        ActionChains(driver).move_to_element_with_offset(canvas, target[0] - width // 2,
                                                         target[1] - height // 2).click().perform()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-overlay") == "encoder")
        wait.until(lambda d: "encoder self-attention" in d.find_element(By.ID, "status").text)
        point = state(driver, "window.explorer.overlay.point")
        assert abs(point[0] - target[0]) <= 1 and abs(point[1] - target[1]) <= 1
        at_point = s.call("POST", f"/v1/attention?threshold=0&max_detections=1&points={point[0]:.1f},{point[1]:.1f}",
                          image_path.read_bytes()).json
        assert state(driver, "window.explorer.overlay.map") == at_point["encoder"][0]
        assert at_point["encoder"][0] != answer["decoder"][0]
        check_overlay(driver, at_point["encoder"][0], at_point, [detections[0]["box_xyxy"]], image, avoid=target)
        assert pixel(driver, *target).tolist() == [255, 23, 68]  # the point marker (#ff1744)

        # Reference boxes of the anchor queries, dashed (toggle), and a screenshot for the record.
        driver.find_element(By.ID, "reference").click()
        assert state(driver, "window.explorer.data.reference_boxes") == answer["reference_boxes"]
        shot = tmp_path / "explorer.png"
        assert driver.save_screenshot(str(shot))
        viewport = state(driver, "[window.innerWidth, window.innerHeight]")
        with Image.open(shot) as taken:
            assert list(taken.size) == viewport and viewport[0] == 1280
        artifacts = REPO / "outputs" / "test-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "explorer.png")  # kept after the run (CI artifact)
