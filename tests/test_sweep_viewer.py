"""The sweep's HTML viewer, in real headless Chromium: sliders, canvas blend, exact images,
the before/after split. The screenshot goes to test-artifacts/ (or $PISA_TEST_ARTIFACTS)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.sweep.core import BASIS, blend_basis
from pisa_cli.sweep.grid import LambdaGrid
from pisa_cli.sweep.viewer import build_viewer
from tests.builders import noise_image

ARTIFACTS = Path(
    os.environ.get("PISA_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1200,1000",
)
GRID = "pix=0:1:0.5 sem=0:1:0.5"


def test_the_viewer_is_one_file_with_no_network():
    grid = LambdaGrid((0.0, 1.0), (0.0, 1.0))
    images = {name: Image.new("RGB", (4, 3), (i * 80, 0, 0)) for i, name in enumerate(BASIS)}
    html = build_viewer("a</script><!--<script>.png", "x", grid, images, images["low"], {})
    assert re.search(r"(?:https?|wss?|ftp):", html) is None
    data = html.split('type="application/json">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data  # no name can end the data script or open a comment
    assert "a\\u003c/script\\u003e\\u003c!--\\u003cscript\\u003e.png" in data
    assert html.count("data:image/png;base64,") == 4
    assert "default-src 'none'" in html  # the page itself forbids fetching anything


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    binary = next(
        (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)),
        None,
    )
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(
            "Chromium and its driver are not installed here (Debian: apt-get install chromium "
            "chromium-driver; .ci/run does this when it can)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="pisa-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def viewer_folder(tiny_base, pisa_pkl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer")
    noise_image(40, 32, 3).save(folder / "photo.png")
    result = CliRunner().invoke(
        app,
        [str(a) for a in ("sweep", folder / "photo.png", "-o", folder / "out", "--viewer",
                          "--lambda-grid", GRID, "--process-size", "64", "--base-model",
                          tiny_base, "--weights", pisa_pkl, "--device", "cpu")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder / "out" / "photo"


def canvas_pixels(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('blend').toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_for_point(driver, key: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.getElementById('stage').dataset.point") == key
    )


HOSTILE_NAMES = (
    "x<!--<script>.png",
    "</script><script>document.title='owned'</script>.png",
    "a&amp;<b>\u2028\u2029\"'.png",
)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_viewer_survives_any_file_name(browser, tmp_path, name):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    grid = LambdaGrid((0.0, 1.0), (0.0, 1.0))
    images = {name: noise_image(8, 6, i) for i, name in enumerate(BASIS)}
    page = tmp_path / "viewer.html"
    page.write_text(build_viewer(name, name, grid, images, images["low"], {}), encoding="utf-8")
    browser.get(page.as_uri())
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.body.dataset.ready")
    )
    assert browser.find_element(By.ID, "title").get_attribute("textContent") == name
    assert browser.find_element(By.ID, "settings").get_attribute("textContent") == name
    assert browser.execute_script("return document.title") != "owned"


def test_sliders_blend_on_the_canvas_and_show_exact_points(browser, viewer_folder):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get((viewer_folder / "viewer.html").as_uri())
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.body.dataset.ready")
    )
    wait_for_point(browser, "1.00,1.00")
    status = browser.find_element(By.ID, "status")
    exact = browser.find_element(By.ID, "exact-image")
    assert status.text.startswith("Exact") and exact.is_displayed()
    assert exact.get_attribute("src").endswith("/pix1.00_sem1.00.png")
    assert browser.execute_script("return arguments[0].naturalWidth", exact) == 160  # from disk

    # Both sliders by keyboard, to a point that is not on the grid.
    browser.find_element(By.ID, "pix").send_keys(Keys.ARROW_LEFT * 37)
    browser.find_element(By.ID, "sem").send_keys(Keys.ARROW_LEFT * 79)
    wait_for_point(browser, "0.63,0.21")
    assert status.text.startswith("Blended") and not exact.is_displayed()
    basis = {
        name: np.asarray(Image.open(viewer_folder / f"{point.name}.png"))
        for name, point in BASIS.items()
    }
    expected = blend_basis(basis, 0.63, 0.21)
    shown = canvas_pixels(browser)
    assert shown.shape == expected.shape
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(shown.astype(int) - basis["pisa"].astype(int)).max() > 10  # really blended

    # Page Up jumps to the next grid value: (1.00, 0.50) is a grid point, shown exactly.
    browser.find_element(By.ID, "sem").send_keys(Keys.PAGE_UP)
    browser.find_element(By.ID, "pix").send_keys(Keys.PAGE_UP, Keys.PAGE_UP)
    wait_for_point(browser, "1.00,0.50")
    assert status.text.startswith("Exact") and "pix1.00_sem0.50.png" in status.text
    assert (
        np.abs(canvas_pixels(browser).astype(int) - basis["pix"] * 0.5 - basis["pisa"] * 0.5).max()
        <= 1
    )

    # Before/after: B shows the bicubic input left of a divider the split slider moves.
    browser.find_element(By.TAG_NAME, "body").send_keys("b")
    browser.find_element(By.ID, "split").send_keys(Keys.ARROW_LEFT * 20)
    WebDriverWait(browser, 10).until(
        lambda d: (
            d.find_element(By.ID, "bicubic").is_displayed()
            and d.find_element(By.ID, "split-value").text == "30%"
        )
    )
    clip = browser.find_element(By.ID, "bicubic").value_of_css_property("clip-path")
    assert "70%" in clip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "sweep-viewer.png"))
