"""Headless Chromium for the viewer tests (tests/mil/test_viewer.py, tests/mil/seg/test_slides.py):
the driver, waiting on a page condition, and the screenshot colour at a slide point."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image


def chrome():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800",
              "--force-device-scale-factor=1", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(f"return {script}"):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {script}")


def pixel(driver, x0: float, y0: float) -> np.ndarray:
    """The screenshot's RGB at level-0 point (x0, y0) of the slide."""
    xy = driver.execute_script(
        "const p = viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(arguments[0], "
        "arguments[1])); const r = document.getElementById('osd').getBoundingClientRect(); "
        "return [p.x + r.left, p.y + r.top];", float(x0), float(y0))
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return np.asarray(shot, np.float64)[int(round(xy[1])), int(round(xy[0]))]
