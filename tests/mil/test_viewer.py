"""`featstore view`: the Flask app over a real store and run (slides through OpenSlide's deep
zoom), its refusals (unknown ids, files outside --slides, a broken slide), and the page in a real
headless Chromium: the overlay's colours at known tiles, the opacity slider, the toggle, zooming."""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.cohort import discover_slides
from featstore.extract import ExtractConfig, Extractor
from featstore.store import open_store
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig
from mil.run import load_run
from mil.viewer.app import create_app
from mil.viewer.data import OVERLAY_PX_PER_TILE, ViewerData
from tests.mil.browser import chrome, pixel, wait


# one worker trains the module's fixtures once (pyproject: --dist loadgroup), not each worker again
pytestmark = pytest.mark.xdist_group("viewer")

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six 1536 x 1024 slides (tissue blocks), a resnet18 minus2 store and a 2-fold run."""
    root = tmp_path_factory.mktemp("view")
    (root / "slides").mkdir()
    for i in range(6):
        rects = [(128, 128, 1024, 896), (1152, 256 + 64 * (i % 2), 1408, 768)]
        write_pyramid_tiff(root / "slides" / f"s{i}.tif", rectangles_slide((1536, 1024), rects, seed=i), mpp=0.5)
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(2,), tiling=TilingConfig(patch_size=64, mpp=1.0),
                        input_size=32, precision="fp32", batch_size=32, workers=1, device="cpu")
    assert Extractor(cfg).run(discover_slides([root / "slides"]), root / "c.zarr").ok
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows([f"s{i}", ["a", "b"][i % 2]] for i in range(6))
    res = CliRunner().invoke(mil_app, ["train", "--store", str(root / "c.zarr"), "--labels", str(root / "labels.csv"),
                                       "--encoder", "resnet18", "--minus", "2", "--folds", "2", "--epochs", "2",
                                       "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def client(cohort):
    data = ViewerData(open_store(str(cohort / "c.zarr")), load_run(cohort / "run"), (cohort / "slides",))
    return create_app(data).test_client(), data


def test_the_list_and_a_slide_page(client):
    c, data = client
    page = c.get("/").get_data(as_text=True)
    assert page.count('href="slide/') == 6 and "auc" in page and "probability" in page
    page = c.get("/slide/s1").get_data(as_text=True)
    assert "openseadragon.min.js" in page and 'id="opacity"' in page and 'id="overlay"' in page
    assert page.count("data-box=") == 8 and "s1: true b" in page
    assert c.get("/static/openseadragon/openseadragon.min.js").status_code == 200


def test_deep_zoom_tiles_are_the_slides_pixels(client, cohort):
    import openslide

    c, _ = client
    xml = c.get("/dzi/s0.dzi").get_data(as_text=True)
    assert 'Width="1536"' in xml and 'Height="1024"' in xml
    levels = 12      # ceil(log2(1536)) + 1
    tile = Image.open(io.BytesIO(c.get(f"/dzi/s0_files/{levels - 1}/0_0.jpeg").data)).convert("RGB")
    assert tile.size == (255, 255)    # 254 + 1 overlap at the corner tile
    want = np.asarray(openslide.OpenSlide(str(cohort / "slides" / "s0.tif")).read_region((0, 0), 0, (255, 255))
                      .convert("RGB"), np.float64)
    assert np.abs(np.asarray(tile, np.float64) - want).mean() < 6          # JPEG, not a different image
    assert c.get(f"/dzi/s0_files/{levels}/0_0.jpeg").status_code == 404    # past the last level
    assert c.get("/dzi/s0_files/3/99_0.jpeg").status_code == 404


def test_overlay_paints_each_tile_in_its_attention_colour(client):
    from matplotlib import colormaps

    c, data = client
    png = Image.open(io.BytesIO(c.get("/overlay/s2.png").data))
    size0 = int(data.store.slide_info("s2")["size0"])
    assert png.mode == "RGBA" and png.size == (int(np.ceil(1536 / (size0 / OVERLAY_PX_PER_TILE))),
                                               int(np.ceil(1024 / (size0 / OVERLAY_PX_PER_TILE))))
    px = np.asarray(png)
    scores, coords = data.scores("s2"), data.store.coords("s2")
    for i in (int(np.argmax(scores)), int(np.argmin(scores))):
        x, y = (coords[i] * OVERLAY_PX_PER_TILE // size0) + 1
        want = (np.asarray(colormaps["jet"](scores[i]))[:3] * 255).astype(int)
        assert np.abs(px[y, x, :3].astype(int) - want).max() <= 1 and px[y, x, 3] == 255
    assert px[0, 0, 3] == 0                        # glass: no tile, transparent


def test_ids_not_paths_and_files_outside_the_folders_are_refused(client, cohort, tmp_path):
    c, _ = client
    for url in ("/slide/nope", "/dzi/nope.dzi", "/dzi/..%2F..%2Fetc%2Fpasswd.dzi", "/slide/..%2Fc.zarr",
                "/overlay/..%2F..%2Fetc%2Fpasswd.png", "/static/../app.py", "/static/..%2Fapp.py",
                "/dzi/s0_files/0/0_0.jpeg/../../../../etc/passwd"):
        assert c.get(url).status_code == 404, url
    # a viewer allowed only another folder: the page says why, tiles are error tiles, no crash
    other = tmp_path / "elsewhere"
    other.mkdir()
    data = ViewerData(open_store(str(cohort / "c.zarr")), None, (other,))
    c2 = create_app(data).test_client()
    page = c2.get("/slide/s0").get_data(as_text=True)
    assert "is not inside" in page and str(other) in page
    r = c2.get("/dzi/s0_files/0/0_0.jpeg")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"


def test_a_slide_that_cannot_be_opened_shows_an_error_tile(cohort, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    (slides / "s3.tif").write_bytes(b"not a slide")
    data = ViewerData(open_store(str(cohort / "c.zarr")), load_run(cohort / "run"), (slides,))
    c = create_app(data).test_client()
    page = c.get("/slide/s3").get_data(as_text=True)
    assert c.get("/slide/s3").status_code == 200 and "cannot be opened" in page and 'id="overlay"' not in page
    tile = Image.open(io.BytesIO(c.get("/dzi/s3_files/0/0_0.jpeg").data)).convert("RGB")
    assert np.asarray(tile)[2, 2, 0] > 60 and np.asarray(tile)[2, 2, 1] < 40      # the dark red error tile
    assert c.get("/slide/s4").status_code == 200 and c.get("/overlay/s4.png").status_code == 200


# ------------------------------------------------------------------------------ in a real browser
@pytest.fixture(scope="module")
def served(cohort):
    from werkzeug.serving import make_server

    data = ViewerData(open_store(str(cohort / "c.zarr")), load_run(cohort / "run"), (cohort / "slides",))
    server = make_server("127.0.0.1", 0, create_app(data), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", data
    server.shutdown()


def test_the_page_in_headless_chromium_overlay_opacity_toggle_and_zoom(served):
    from matplotlib import colormaps

    url, data = served
    driver = chrome()
    try:
        driver.get(f"{url}/slide/s2")
        wait(driver, "window.fsReady === true && viewer.world.getItemCount() === 2")
        scores, coords = data.scores("s2"), data.store.coords("s2")
        size0 = int(data.store.slide_info("s2")["size0"])
        hot = int(np.argmax(scores))
        cx, cy = coords[hot] + size0 / 2
        driver.execute_script("const o = document.getElementById('opacity'); o.value = 100; o.oninput();")
        time.sleep(0.5)
        want = np.asarray(colormaps["jet"](scores[hot]))[:3] * 255
        assert np.abs(pixel(driver, cx, cy) - want).max() < 40, (pixel(driver, cx, cy), want)
        driver.find_element("id", "overlay").click()              # overlay off: the tissue itself
        time.sleep(0.5)
        tissue = pixel(driver, cx, cy)
        assert np.abs(tissue - want).max() > 60 and tissue.mean() < 235        # stained tissue, not glass
        driver.find_element("id", "overlay").click()
        driver.execute_script("const o = document.getElementById('opacity'); o.value = 50; o.oninput();")
        time.sleep(0.5)
        half = pixel(driver, cx, cy)
        assert np.abs(half - (want + tissue) / 2).max() < 45                    # alpha blending at 0.5
        if os.environ.get("FEATSTORE_VIEWER_SHOT"):                             # docs/viewer.md's picture
            driver.save_screenshot(os.environ["FEATSTORE_VIEWER_SHOT"])
        # zoom in on the hottest tile: deeper deep-zoom levels are fetched and drawn
        driver.execute_script("document.querySelector('#top a').click();")
        wait(driver, "window.fsReady === true")
        levels = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('_files/'))"
            ".map(n => +n.split('_files/')[1].split('/')[0]);")
        assert max(levels) >= 10, sorted(set(levels))
        assert driver.execute_script("return viewer.viewport.getZoom()") > 4
    finally:
        driver.quit()


def test_several_runs_one_viewer(cohort, tmp_path):
    """--run of a folder of runs: ?run=NAME picks the run whose predictions, attention and
    overlay are shown; an unknown run is a 404; a folder without runs is one line."""
    from mil.viewer.data import ViewerError, find_runs

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(cohort / "run", runs / "a")
    res = CliRunner().invoke(mil_app, ["train", "--store", str(cohort / "c.zarr"), "--labels",
                                       str(cohort / "labels.csv"), "--encoder", "resnet18", "--minus", "2", "--folds",
                                       "2", "--epochs", "2", "--seed", "1", "--out", str(runs / "b")])
    assert res.exit_code == 0, res.output
    data = ViewerData(open_store(str(cohort / "c.zarr")), find_runs([runs]), (cohort / "slides",))
    assert list(data.runs) == ["a", "b"]
    c = create_app(data).test_client()
    page = c.get("/").get_data(as_text=True)
    assert 'href="?run=a"' in page and 'href="?run=b"' in page and 'href="slide/s0"' in page
    assert 'href="slide/s0?run=b"' in c.get("/?run=b").get_data(as_text=True)
    a, b = data.scores("s1", "a"), data.scores("s1", "b")
    assert not np.allclose(a, b)                               # two seeds, two attentions
    page = c.get("/slide/s1?run=b").get_data(as_text=True)
    assert "overlay/s1.png?run=b" in page and str(runs / "b") in page
    assert c.get("/overlay/s1.png?run=b").status_code == 200 and c.get("/overlay/s1.png?run=zz").status_code == 404
    assert c.get("/slide/s1?run=zz").status_code == 404
    with pytest.raises(ViewerError, match="no run folder here"):
        find_runs([cohort / "slides"])


def test_view_on_a_busy_port_is_one_line(cohort):
    import socket

    from featstore.cli import featstore_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = CliRunner().invoke(featstore_app, ["view", str(cohort / "c.zarr"), "--port", str(port)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and f"--port {port}: cannot listen there" in lines[0], res.output
