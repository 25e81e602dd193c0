"""Whole-slide segmentation (`mil seg predict-slides`, mil/seg/slides.py) and its class maps in the
viewer (`featstore view --seg`, mil/viewer/seg.py): a tiny U-Net trained on gland slides, real
pyramidal TIFFs read through OpenSlide, maps checked against a whole-image prediction."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.read.slide import Slide
from featstore.synth import write_gland_slides, write_pyramid_tiff
from mil.seg.annotations import rasterise, read_geojson
from mil.seg.predict import load_run
from mil.seg.slides import (Geometry, SlidePredictConfig, area_mm2, class_names, paste, segment_slide,
                            write_png, write_slide_geojson)
from mil.seg.train import evaluate_on
from mil.segmaps import MANIFEST, class_color, read_manifest
from mil.viewer.app import create_app
from mil.viewer.data import ViewerData, ViewerError, find_runs
from mil.viewer.seg import SegMaps
from tests.mil.browser import chrome, pixel, wait


# one worker trains the module's fixtures once (pyproject: --dist loadgroup), not each worker again
pytestmark = pytest.mark.xdist_group("segslides")

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four 384 px gland slides at 0.5 µm/px (stroma, rim, lumen) and a U-Net trained on them at 1 µm/px."""
    root = tmp_path_factory.mktemp("segslides")
    slides, labels = write_gland_slides(root / "cohort", 4, seed=0)
    r = CliRunner().invoke(mil_app, ["seg", "train", "--slides", str(slides), "--annotations", str(labels),
                                     "--mpp", "1.0", "--patch", "96", "--mask-kind", "multiclass", "--classes", "3",
                                     "--encoder", "resnet18", "--epochs", "6", "--crop", "96", "--test", "0.25",
                                     "--val", "0.25", "--n-boot", "0", "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    two = root / "two"
    two.mkdir()
    for name in ("case0.tiff", "case1.tiff"):
        shutil.copy(slides / name, two / name)
    model, cfg, pre = load_run(root / "run")
    return {"root": root, "slides": slides, "two": two, "run": root / "run", "model": model, "cfg": cfg, "pre": pre}


@pytest.fixture(scope="module")
def maps(trained):
    """`mil seg predict-slides` of two slides, with GeoJSON."""
    out = trained["root"] / "maps"
    r = CliRunner().invoke(mil_app, ["seg", "predict-slides", str(trained["two"]), "--run", str(trained["run"]),
                                     "--out", str(out), "--window", "64", "--margin", "16", "--geojson"])
    assert r.exit_code == 0, r.output
    assert "segmented 2, already done 0, skipped 0" in r.output
    return out


def _segment(trained, name="case0.tiff", **kw):
    cfg = SlidePredictConfig(**kw)
    return segment_slide(trained["model"], trained["pre"], trained["slides"] / name, 1.0, cfg, _cpu())


def _cpu():
    import torch

    return torch.device("cpu")


# ------------------------------------------------------------------------------ geometry
def test_paste_is_nearest_neighbour_by_pixel_centre():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, size0, ds = int(rng.integers(4, 40)), float(rng.uniform(20, 200)), float(rng.uniform(0.7, 9.3))
        x0, y0 = float(rng.uniform(-60, 300)), float(rng.uniform(-60, 300))
        pred = rng.integers(1, 250, (n, n)).astype(np.uint8)
        cmap = np.zeros((int(rng.integers(10, 60)), int(rng.integers(10, 60))), np.uint8)
        paste(cmap, pred, x0, y0, size0, ds)
        want = np.zeros_like(cmap)
        for i in range(cmap.shape[0]):
            for j in range(cmap.shape[1]):
                cx, cy = (j + 0.5) * ds, (i + 0.5) * ds
                if x0 <= cx < x0 + size0 and y0 <= cy < y0 + size0:
                    want[i, j] = pred[min(n - 1, int((cy - y0) * n / size0)), min(n - 1, int((cx - x0) * n / size0))]
        np.testing.assert_array_equal(cmap, want)


def test_geometry_covers_odd_sizes_and_caps_the_map():
    cfg = SlidePredictConfig(window=512, margin=32, max_side=4096)
    g = Geometry.of((50_001, 30_007), 0.25, 0.5, cfg)          # 40x-scanned slide, a 20x run
    assert g.size0 == 1024 and g.margin0 == 64
    assert g.downsample == pytest.approx(50_001 / 4096) and max(g.shape) == 4096
    o = g.origins((50_001, 30_007))
    assert len(o) == 49 * 30 and o[:, 0].max() == 48 * 1024 and o[:, 1].max() == 29 * 1024   # edge windows kept
    small = Geometry.of((900, 700), 0.5, 0.5, cfg)
    assert small.downsample == 1.0 and small.shape == (700, 900)


def test_class_names_from_the_run():
    assert class_names({"classes": 2, "mask_kind": "binary"}) == {0: "background", 1: "foreground"}
    named = class_names({"classes": 4, "mask_kind": "multiclass", "class_ids": {"Tumor": 1, "Stroma": 2, "3": 3}})
    assert named == {0: "background", 1: "Tumor", 2: "Stroma", 3: "class 3"}


# ------------------------------------------------------------------------------ the maps
def test_one_window_is_the_whole_image_prediction_and_tiling_agrees(trained):
    """window = the slide (at the run's 1 µm/px) and no margin: the map is the whole-image
    prediction exactly; 64 px windows with 32 px context agree on > 90 % of pixels."""
    whole, rec = _segment(trained, window=192, margin=0)
    assert rec["windows"] == 1 and rec["downsample"] == 2.0 and whole.shape == (192, 192)
    with Slide(trained["slides"] / "case0.tiff") as s:
        img = s.read_patch((0, 0), 384, 192)
    want = evaluate_on(trained["model"], [img], trained["pre"])[0]
    np.testing.assert_array_equal(whole, want)
    assert np.bincount(want.ravel(), minlength=3).min() > 500          # a model that learnt all three classes
    tiled, rec = _segment(trained, window=64, margin=32)
    assert rec["windows"] == 9 and rec["segmented"] == 9
    assert (tiled == whole).mean() > 0.9


def test_max_side_makes_a_coarser_map_of_the_same_prediction(trained):
    fine, _ = _segment(trained, window=64, margin=32)
    coarse, rec = _segment(trained, window=64, margin=32, max_side=64)
    assert rec["downsample"] == 6.0 and coarse.shape == (64, 64)
    np.testing.assert_array_equal(coarse, fine[1::3, 1::3])


def test_windows_on_glass_are_not_segmented(trained, tmp_path):
    rng = np.random.default_rng(0)
    rgb = np.full((384, 384, 3), 242, np.uint8)
    rgb[:, :200] = np.clip(rng.normal((150, 80, 160), 18, (384, 200, 3)), 0, 255).astype(np.uint8)   # stained
    path = write_pyramid_tiff(tmp_path / "half.tiff", rgb, 0.5, tile=128, compression="deflate")
    started = []
    cmap, rec = segment_slide(trained["model"], trained["pre"], path, 1.0, SlidePredictConfig(window=64, margin=16),
                              _cpu(), on_start=started.append)
    assert started == [6] and rec["windows"] == 9 and rec["segmented"] == 6     # the glass column is skipped
    assert not cmap[:, 128:].any()


def test_png_palette_areas_and_geojson_round_trip(trained, tmp_path):
    cmap, rec = _segment(trained, window=64, margin=32)
    names = class_names(trained["cfg"])
    write_png(cmap, tmp_path / "m.png", len(names))
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.getpalette()[:9] == [v for c in range(3) for v in class_color(c)]
        np.testing.assert_array_equal(np.asarray(img), cmap)
    areas = area_mm2(cmap, rec, names)
    px_mm2 = (2.0 * 0.5 / 1000) ** 2
    assert areas == {names[c]: pytest.approx((cmap == c).sum() * px_mm2) for c in (1, 2)}
    write_slide_geojson(cmap, rec, names, tmp_path / "m.geojson")
    back = rasterise(read_geojson(tmp_path / "m.geojson"), origin_xy0=(0, 0), size=(192, 192), downsample=2.0,
                     classes={names[c]: c for c in (1, 2)})
    for c in (1, 2):
        a, b = cmap == c, back == c
        assert a.sum() > 200 and (a & b).sum() / (a | b).sum() > 0.95, c


# ------------------------------------------------------------------------------ the command
def test_predict_slides_writes_the_folder_and_resumes(trained, maps):
    doc = read_manifest(maps)
    assert set(doc["slides"]) == {"case0", "case1"} and doc["skipped"] == {}
    assert doc["classes"][0]["name"] == "background" and len(doc["classes"]) == 3
    rec = doc["slides"]["case0"]
    assert rec["downsample"] == 2.0 and rec["map"] == [192, 192] and rec["size0"] == [384, 384]
    assert (maps / "case0.png").is_file() and (maps / "case1.geojson").is_file()
    stamp = (maps / "case0.png").stat().st_mtime_ns
    again = CliRunner().invoke(mil_app, ["seg", "predict-slides", str(trained["two"]), "--run", str(trained["run"]),
                                         "--out", str(maps), "--window", "64", "--margin", "16"])
    assert again.exit_code == 0 and "segmented 0, already done 2, skipped 0" in again.output, again.output
    assert (maps / "case0.png").stat().st_mtime_ns == stamp
    other = CliRunner().invoke(mil_app, ["seg", "predict-slides", str(trained["two"]), "--run", str(trained["run"]),
                                         "--out", str(maps), "--window", "128"])
    assert other.exit_code == 1 and "settings differs" in other.output and "Traceback" not in other.output
    assert len(other.output.strip().splitlines()) == 1          # one line, no progress bars before it


def test_geojson_asked_for_later_is_written_for_slides_done(trained, tmp_path):
    out = tmp_path / "m"
    base = ["seg", "predict-slides", str(trained["two"] / "case0.tiff"), "--run", str(trained["run"]), "--out",
            str(out), "--window", "64"]
    assert CliRunner().invoke(mil_app, base).exit_code == 0
    assert not (out / "case0.geojson").exists()
    r = CliRunner().invoke(mil_app, base + ["--geojson"])
    assert r.exit_code == 0 and "already done 1" in r.output
    assert {a.name for a in read_geojson(out / "case0.geojson")} <= set(class_names(trained["cfg"]).values())


def test_a_corrupt_slide_is_recorded_and_the_others_done(trained, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(trained["two"], folder)
    (folder / "broken.tiff").write_bytes(b"II*\x00" + b"\x00" * 64)
    r = CliRunner().invoke(mil_app, ["seg", "predict-slides", str(folder), "--run", str(trained["run"]),
                                     "--out", str(tmp_path / "m"), "--window", "96"])
    assert r.exit_code == 1 and "segmented 2, already done 0, skipped 1" in r.output, r.output
    doc = read_manifest(tmp_path / "m")
    assert set(doc["slides"]) == {"case0", "case1"} and "broken.tiff" in doc["skipped"]["broken"]


def test_a_run_without_mpp_asks_for_it(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg.pop("mpp")
    (run / "config.json").write_text(json.dumps(cfg))
    args = ["seg", "predict-slides", str(trained["two"] / "case0.tiff"), "--run", str(run), "--out", str(tmp_path / "m")]
    r = CliRunner().invoke(mil_app, args)
    assert r.exit_code == 1 and "--mpp" in r.output and "Traceback" not in r.output
    assert CliRunner().invoke(mil_app, args + ["--mpp", "1.0", "--window", "96"]).exit_code == 0


# ------------------------------------------------------------------------------ in the viewer
def test_viewer_shows_class_maps_without_a_store(trained, maps):
    data = ViewerData(None, {}, (), "cpu", SegMaps(maps))
    c = create_app(data).test_client()
    doc = read_manifest(maps)
    page = c.get("/").get_data(as_text=True)
    names = [k["name"] for k in doc["classes"][1:]]
    assert all(f"<th>{n} mm²</th>" in page for n in names) and "<th>tiles</th>" not in page
    assert f"{doc['slides']['case1']['area_mm2'][names[0]]:.4g}" in page
    page = c.get("/slide/case0").get_data(as_text=True)
    assert 'id="mask"' in page and 'id="legend"' in page and "#%02x%02x%02x" % class_color(2) in page
    rgba = np.asarray(Image.open(io.BytesIO(c.get("/seg/case0.png").data)))
    with Image.open(maps / "case0.png") as img:
        ids = np.asarray(img)
    assert rgba.shape == (192, 192, 4) and (rgba[ids == 0, 3] == 0).all()
    for cid in (1, 2):
        assert (rgba[ids == cid] == [*class_color(cid), 255]).all()
    for bad in ("/seg/nope.png", "/seg/..%2Fseg.png", "/seg/%2e%2e.png", "/slide/..%2Fcase0"):
        assert c.get(bad).status_code == 404, bad
    with pytest.raises(ViewerError, match="segmentation run.*predict-slides"):
        find_runs([trained["run"]])
    with pytest.raises(ViewerError, match="--seg .*no seg.json"):
        SegMaps(trained["root"])


def test_a_store_and_class_maps_together(trained, maps):
    """With a store the list is the store's slides (tiles column and areas) and a slide page has both."""
    from featstore.cohort import discover_slides
    from featstore.extract import ExtractConfig, Extractor
    from featstore.store import open_store
    from featstore.tiling import TilingConfig

    store = trained["root"] / "s.zarr"
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(2,), tiling=TilingConfig(patch_size=64, mpp=1.0),
                        input_size=32, precision="fp32", batch_size=32, workers=1, device="cpu")
    assert Extractor(cfg).run(discover_slides([trained["two"]]), store).ok
    data = ViewerData(open_store(str(store)), {}, (), "cpu", SegMaps(maps))
    c = create_app(data).test_client()
    page = c.get("/").get_data(as_text=True)
    assert "<th>tiles</th>" in page and "mm²</th>" in page and 'href="slide/case1"' in page
    page = c.get("/slide/case1").get_data(as_text=True)
    assert 'id="mask"' in page and f"{data.n_tiles('case1')} tissue tiles" in page
    assert c.get("/seg/case1.png").status_code == 200


def test_a_class_map_listing_a_file_outside_its_folder_is_refused(maps, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(maps, folder)
    doc = json.loads((folder / MANIFEST).read_text())
    doc["slides"]["case0"]["png"] = "../../case0.png"
    (folder / MANIFEST).write_text(json.dumps(doc))
    seg = SegMaps(folder)
    with pytest.raises(ViewerError, match="not a file of"):
        seg.png("case0")
    assert create_app(ViewerData(None, {}, (), "cpu", seg)).test_client().get("/seg/case0.png").status_code == 404


def test_the_class_map_in_headless_chromium(maps):
    from werkzeug.serving import make_server

    seg = SegMaps(maps)
    server = make_server("127.0.0.1", 0, create_app(ViewerData(None, {}, (), "cpu", seg)), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = chrome()
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/slide/case0")
        wait(driver, "window.fsReady === true && viewer.world.getItemCount() === 2")
        with Image.open(maps / "case0.png") as img:
            ids = np.asarray(img)
        ds = seg.record("case0")["downsample"]
        driver.execute_script("const o = document.getElementById('mask-opacity'); o.value = 100; o.oninput();")
        time.sleep(0.5)
        for cid in (1, 2):
            inner = ndimage.binary_erosion(ids == cid, iterations=3)     # well inside a region of the class
            i, j = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
            got = pixel(driver, (j + 0.5) * ds, (i + 0.5) * ds)
            assert np.abs(got - class_color(cid)).max() < 40, (cid, got)
        driver.find_element("id", "mask").click()                  # mask off: the slide itself
        time.sleep(0.5)
        assert np.abs(pixel(driver, (j + 0.5) * ds, (i + 0.5) * ds) - class_color(2)).max() > 60
        if os.environ.get("FEATSTORE_VIEWER_SEG_SHOT"):                   # docs/viewer.md's picture
            driver.find_element("id", "mask").click()
            driver.execute_script("const o = document.getElementById('mask-opacity'); o.value = 50; o.oninput();")
            time.sleep(0.5)
            driver.save_screenshot(os.environ["FEATSTORE_VIEWER_SEG_SHOT"])
    finally:
        driver.quit()
        server.shutdown()
