"""QuPath GeoJSON out of a store: tissue contours (holes kept) and tiles in level-0 pixels, read
back by shapely and by the QuPath-format parser the segmentation tasks use; `mil heatmap
--geojson` adds each tile's attention (the heatmap's own numbers) and the slide's prediction."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import featstore_app, mil_app
from featstore.cohort import discover_slides
from featstore.extract import ExtractConfig, Extractor
from featstore.geojson import contour_rings, slide_tissue
from featstore.store import open_store
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402

TILING = TilingConfig(patch_size=64, mpp=1.0, min_tissue=0.5)     # 128 level-0 px at 0.5 um/px


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six 1024 x 768 slides: a frame of tissue around a glass hole (so the contour has a hole)
    and a separate block; a resnet18 minus2 store; labels."""
    root = tmp_path_factory.mktemp("geo")
    (root / "slides").mkdir()
    frame = [(64, 64, 640, 192), (64, 512, 640, 640), (64, 192, 192, 512), (512, 192, 640, 512)]
    for i in range(6):
        rects = frame + [(768, 256 + 32 * (i % 2), 960, 576)]
        write_pyramid_tiff(root / "slides" / f"s{i}.tif", rectangles_slide((1024, 768), rects, seed=i), mpp=0.5)
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(2,), tiling=TILING, input_size=32,
                        precision="fp32", batch_size=32, workers=1, device="cpu")
    assert Extractor(cfg).run(discover_slides([root / "slides"]), root / "c.zarr").ok
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows([f"s{i}", ["a", "b"][i % 2]] for i in range(6))
    return root


def test_contours_keep_holes_and_rasterise_back_to_the_mask():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 5:30] = True
    mask[12:20, 12:20] = False           # a hole
    mask[10:20, 36:46] = True            # a second region
    polys = contour_rings(mask, downsample=8.0)
    assert sorted(len(p) for p in polys) == [1, 2]                      # one region with its hole
    geoms = [shapely.geometry.Polygon(p[0], p[1:]) for p in polys]
    assert all(g.is_valid for g in geoms)
    # the traced area equals the mask's, in level-0 px (marching squares cuts each corner by 1/8 px)
    area = sum(g.area for g in geoms) / 8.0 ** 2
    assert area == pytest.approx(mask.sum(), abs=0.5 * 12)
    assert contour_rings(np.zeros((5, 5), bool), 4.0) == []


def test_export_geojson_round_trips_tiles_and_tissue(cohort, tmp_path):
    from mil.seg.annotations import rasterise, read_geojson

    store = str(cohort / "c.zarr")
    res = CliRunner().invoke(featstore_app, ["export-geojson", store, "s0", "--out", str(tmp_path / "s0.geojson")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s0.geojson").read_text())
    st = open_store(store)
    coords, size0 = st.coords("s0"), int(st.slide_info("s0")["size0"])
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    tissue = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert f"s0: {len(coords)} tiles, {len(tissue)} tissue region(s)" in res.output
    assert doc["type"] == "FeatureCollection" and len(tiles) == len(coords) and size0 == 128
    for f in tiles:                                         # each tile is its square at its store row
        g, m = shape(f["geometry"]), f["properties"]["measurements"]
        x, y = coords[int(m["row"])]
        assert g.is_valid and g.bounds == (x, y, x + size0, y + size0) and g.area == size0 ** 2
        assert m["tissue"] == pytest.approx(float(st.tissue("s0")[int(m["row"])]), abs=1e-6)
    # tissue: the frame (with its glass hole) and the block; every tile lies inside the tissue
    geoms = [shape(f["geometry"]) for f in tissue]
    assert len(geoms) == 2 and sorted(len(g.interiors) for g in geoms) == [0, 1]
    union = shapely.unary_union(geoms).buffer(size0 / 2)
    assert all(union.contains(shape(f["geometry"]).centroid) for f in tiles)
    frame, block = 576 ** 2 - 320 ** 2, 192 * 320                    # level-0 px² drawn on the slide
    assert sum(g.area for g in geoms) == pytest.approx(frame + block, rel=0.08)
    # the QuPath-format parser reads it back: classes, object types, and the mask it rasterises
    anns = read_geojson(tmp_path / "s0.geojson")
    assert sorted({(a.name, a.object_type) for a in anns}) == [("Tile", "tile"), ("Tissue", "annotation")]
    mask, ds = slide_tissue(st, "s0")
    drawn = rasterise([a for a in anns if a.name == "Tissue"], origin_xy0=(0, 0),
                      size=(mask.shape[1], mask.shape[0]), downsample=ds) > 0
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou > 0.97, iou


def test_export_geojson_errors_are_one_line(cohort, tmp_path):
    store = str(cohort / "c.zarr")
    res = CliRunner().invoke(featstore_app, ["export-geojson", store, "nope", "--out", str(tmp_path / "x.geojson")])
    assert res.exit_code == 1 and "has no slide 'nope'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(featstore_app, ["export-geojson", store, "s1", "--out", str(tmp_path / "y.geojson"),
                                             "--slide", str(tmp_path / "gone.tif")])
    assert res.exit_code == 1 and "gone.tif of s1 is not there; pass --slide PATH, or --no-tissue" in res.output
    res = CliRunner().invoke(featstore_app, ["export-geojson", store, "s1", "--out", str(tmp_path / "y.geojson"),
                                             "--slide", str(tmp_path / "gone.tif"), "--no-tissue"])
    assert res.exit_code == 0 and "tissue" not in res.output.split("tiles")[1]
    assert not (tmp_path / "x.geojson").exists()


def test_heatmap_geojson_carries_the_heatmaps_attention_and_the_prediction(cohort, tmp_path):
    from mil.heatmap import combine_attention
    from mil.predict import slide_attention
    from mil.run import load_run

    store = str(cohort / "c.zarr")
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--labels", str(cohort / "labels.csv"),
                                       "--encoder", "resnet18", "--minus", "2", "--folds", "2", "--epochs", "2",
                                       "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(mil_app, ["heatmap", "--run", str(tmp_path / "run"), "--slide",
                                       str(cohort / "slides" / "s3.tif"), "--store", store, "--out",
                                       str(tmp_path / "h.png"), "--geojson", str(tmp_path / "h.geojson")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "h.geojson").read_text())
    run, st = load_run(tmp_path / "run"), open_store(store)
    per_fold = slide_attention(run, st, "s3")
    want = combine_attention(per_fold, "rank")
    tiles = sorted((f for f in doc["features"] if f["properties"]["objectType"] == "tile"),
                   key=lambda f: f["properties"]["measurements"]["row"])
    got = np.array([f["properties"]["measurements"]["attention"] for f in tiles])
    np.testing.assert_allclose(got, want, atol=1e-9)
    ranks = np.array([f["properties"]["measurements"]["attention_rank"] for f in tiles])
    assert ranks[np.argmax(want)] == 1 and sorted(ranks) == list(range(1, len(tiles) + 1))
    for fold, a in per_fold.items():
        np.testing.assert_allclose([f["properties"]["measurements"][f"attention_{fold}"] for f in tiles], a,
                                   rtol=1e-5, atol=1e-6)
    whole = [f for f in doc["features"] if f["properties"].get("isLocked")]
    assert len(whole) == 1 and whole[0]["properties"]["classification"]["name"] in ("a", "b")
    probs = whole[0]["properties"]["measurements"]
    assert set(probs) == {"P(a)", "P(b)"} and probs["P(a)"] + probs["P(b)"] == pytest.approx(1.0)
    assert whole[0]["properties"]["name"].startswith("s3")
