"""mil.seg.annotations: QuPath GeoJSON read and rasterised exactly, slides paired with their
annotation files (on real pyramidal TIFFs where a slide is needed)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile

from mil.seg.annotations import pair_by_stem, rasterise, read_geojson
from featstore.synth import write_pyramid_tiff
from mil.seg.errors import SegError
from tests.mil.seg.conftest import ann, feature, rgb_noise, square, write_geojson


# ------------------------------------------------------------------ read_geojson
def test_read_geojson_accepts_qupath_shapes(tmp_path, caplog):
    sq = [square(0, 0, 10, 10)]
    feats = [feature(sq, "Tumor"), feature(sq, "Stroma", classification="str"),
             feature(sq, "Necrosis", classification="name", object_type="detection"),
             feature([sq, [square(20, 20, 30, 30)]], "Tumor", kind="MultiPolygon"),
             feature(sq, classification=None),
             {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
             {"type": "Feature", "id": "PathCellObject", "geometry": {"type": "Polygon", "coordinates": sq},
              "properties": {"classification": {"name": "Lymphocyte"}}}]
    with caplog.at_level(logging.INFO, logger="mil.seg.annotations"):
        anns = read_geojson(write_geojson(tmp_path / "a.geojson", feats))
    assert [a.name for a in anns] == ["Tumor", "Stroma", "Necrosis", "Tumor", "Lymphocyte"]
    assert [a.object_type for a in anns] == ["annotation", "annotation", "detection", "annotation", "cell"]
    assert len(anns[3].polygons) == 2 and anns[3].bounds == (0, 0, 30, 30)
    assert "1 Point" in caplog.text and "1 unclassified" in caplog.text
    assert len(read_geojson(tmp_path / "a.geojson", default_class="Other")) == 6
    # a bare list of Features and a single Feature
    assert len(read_geojson(write_geojson(tmp_path / "b.geojson", feats[:2], shape="list"))) == 2
    (tmp_path / "c.geojson").write_text(json.dumps(feats[0]))
    assert read_geojson(tmp_path / "c.geojson")[0].name == "Tumor"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ('{"type": "FeatureCollection", "features": []}', "no features"),
    ('{"type": "Polygon", "coordinates": []}', "expected a GeoJSON FeatureCollection"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]', "no usable polygon"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1]]]},'
     ' "properties": {"name": "x"}}]', "feature 0"),
])
def test_read_geojson_malformed_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(SegError, match=message) as err:
        read_geojson(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ rasterise
def test_square_rasterises_to_exact_block_at_downsample_2():
    m = rasterise([ann([[square(100, 100, 164, 164)]])], origin_xy0=(96, 96), size=40, downsample=2,
                  classes={"Tumor": 3})
    expected = np.zeros((40, 40), np.int64)
    expected[2:34, 2:34] = 3
    np.testing.assert_array_equal(m, expected)


def test_hole_is_background_and_multipolygon_parts_share_an_id():
    donut = [square(0, 0, 64, 64), square(16, 16, 48, 48)]
    m = rasterise([ann([donut])], origin_xy0=(0, 0), size=64, downsample=1)
    assert (m[16:48, 16:48] == 0).all() and m.sum() == 64 * 64 - 32 * 32
    two = ann([[square(0, 0, 8, 8)], [square(20, 20, 28, 28)]])
    other = ann([[square(40, 0, 50, 10)]])
    inst = rasterise([two, other], origin_xy0=(0, 0), size=64, downsample=1, instance=True)
    assert set(np.unique(inst[0:8, 0:8])) == {1} and set(np.unique(inst[20:28, 20:28])) == {1}
    assert set(np.unique(inst[0:10, 40:50])) == {2} and set(np.unique(inst).tolist()) == {0, 1, 2}


def test_any_polygon_fills_exactly_the_pixel_centres_inside():
    """PIL snaps vertices to whole pixels; the edge pixels are decided again exactly, so every
    pixel is in iff its centre is inside the exterior and outside the hole (matplotlib's test)."""
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(0)
    for t in range(30):
        n = int(rng.integers(3, 30))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        ring = np.c_[60 + 50 * np.cos(ang), 60 + 40 * np.sin(ang)] * rng.uniform(0.5, 2.5)
        ring = ring if t % 3 else rng.uniform(0, 150, (n, 2))              # self-intersecting too
        hole = np.c_[60 + 9 * np.cos(ang[:4]), 60 + 9 * np.sin(ang[:4])]
        ds, org = float(rng.choice([0.7, 1.0, 2.0, 3.3])), rng.uniform(-20, 40, 2)
        m = rasterise([ann([[ring, hole]])], origin_xy0=tuple(org), size=(50, 40), downsample=ds)
        yy, xx = np.mgrid[0:40, 0:50]
        c = np.c_[(xx.ravel() + 0.5) * ds + org[0], (yy.ravel() + 0.5) * ds + org[1]]
        expected = MplPath(ring).contains_points(c) & ~MplPath(hole).contains_points(c)
        np.testing.assert_array_equal(m.astype(bool), expected.reshape(40, 50))


def test_later_polygons_overwrite_and_a_hole_shows_what_is_beneath():
    below = ann([[square(0, 0, 32, 32)]], "Stroma")
    donut = ann([[square(0, 0, 32, 32), square(8, 8, 24, 24)]], "Tumor")
    m = rasterise([below, donut], origin_xy0=(0, 0), size=32, downsample=1, classes={"Stroma": 1, "Tumor": 2})
    assert (m[8:24, 8:24] == 1).all() and (m[:8] == 2).all()


def test_pair_by_stem(tmp_path, slide):
    path, rgb = slide
    (tmp_path / "case.geojson").write_text("{}")
    write_pyramid_tiff(tmp_path / "lonely.tif", rgb_noise(64, 64), 0.5, tile=64)
    svs = write_pyramid_tiff(tmp_path / "scan.svs", rgb, 0.5, tile=128, vendor="aperio")
    tifffile.imwrite(tmp_path / "scan.tif", np.zeros((96, 128), np.uint8))     # its label TIFF
    assert pair_by_stem(tmp_path) == ([path, svs], [tmp_path / "case.geojson", tmp_path / "scan.tif"])
