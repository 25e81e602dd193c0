"""mil.seg.wsi: patches cut at a target mpp with masks drawn from QuPath GeoJSON or read from
label TIFFs, on real pyramidal TIFF slides that OpenSlide reads (no mocks). The annotation
readers themselves: tests/mil/seg/test_annotations.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from featstore.read.slide import Slide
from featstore.synth import write_pyramid_tiff
from mil.seg.errors import SegError
from mil.seg.annotations import LabelTiff
from mil.seg.wsi import wsi_dataset
from tests.mil.seg.conftest import feature, rgb_noise, square, write_geojson


# ------------------------------------------------------------------ wsi_dataset on GeoJSON
def test_patch_mask_and_pixels_at_twice_the_slide_mpp(tmp_path, slide):
    path, rgb = slide
    ann = write_geojson(tmp_path / "case.geojson", [feature([square(100, 100, 164, 164)])])
    data = wsi_dataset([path], [ann], mpp=1.0, patch=64, min_annotated=0.0)
    # grid of 128 level-0 px from (0, 0) over the bounding box [100, 164)
    assert data.names == ["case_x0_y0", "case_x128_y0", "case_x0_y128", "case_x128_y128"]
    assert data.classes == {"Tumor": 1} and data.n_classes == 2 and data.mask_kind == "multiclass"
    expected = np.zeros((64, 64), np.int64)
    expected[50:64, 50:64] = 1                                   # [100, 128) / 2
    np.testing.assert_array_equal(data.masks[0], expected)
    expected = np.zeros((64, 64), np.int64)
    expected[0:18, 0:18] = 1                                     # [128, 164) / 2
    np.testing.assert_array_equal(data.masks[3], expected)
    with Slide(path) as s:
        np.testing.assert_array_equal(data.images[3], s.read_patch((128, 128), 128, 64))
    assert data.sources[3] == (str(path), 128, 128, 128)
    # at the slide's own mpp the patch is the level-0 pixels exactly
    same = wsi_dataset([path], [ann], mpp=0.5, patch=64, min_annotated=0.3)
    i = same.names.index("case_x128_y128")
    np.testing.assert_array_equal(same.images[i], rgb[128:192, 128:192])
    assert (same.masks[i][:36, :36] == 1).all() and same.masks[i].sum() == 36 * 36


def test_min_annotated_filters_and_class_names_map_sorted(tmp_path, slide):
    path, _ = slide
    feats = [feature([square(0, 0, 256, 128)], "Tumor"), feature([square(0, 128, 256, 256)], "Stroma"),
             feature([square(300, 300, 302, 302)], "Necrosis")]        # a speck: 1 px at mpp 1
    ann = write_geojson(tmp_path / "case.geojson", feats)
    data = wsi_dataset([path], [ann], mpp=1.0, patch=64)
    assert data.classes == {"Necrosis": 1, "Stroma": 2, "Tumor": 3} and data.n_classes == 4
    assert data.names == ["case_x0_y0", "case_x128_y0", "case_x0_y128", "case_x128_y128"]
    assert set(np.unique(data.masks[0])) == {3} and set(np.unique(data.masks[2])) == {2}
    everything = wsi_dataset([path], [ann], mpp=1.0, patch=64, min_annotated=0.0)
    assert "case_x256_y256" in everything.names and len(everything) == 9
    only = wsi_dataset([path], [ann], mpp=1.0, patch=64, classes={"Tumor": 1}, mask_kind="binary")
    assert only.names == ["case_x0_y0", "case_x128_y0"] and only.classes == {"Tumor": 1}
    capped = wsi_dataset([path], [ann], mpp=1.0, patch=64, max_patches_per_slide=2, seed=3)
    again = wsi_dataset([path], [ann], mpp=1.0, patch=64, max_patches_per_slide=2, seed=3)
    assert capped.names == again.names and len(capped) == 2 and set(capped.names) <= set(data.names)


def test_instance_ids_are_distinct_per_feature(tmp_path, slide):
    path, _ = slide
    feats = [feature([square(10 + 20 * i, 10, 22 + 20 * i, 22)], "Nucleus", object_type="detection")
             for i in range(4)]
    ann = write_geojson(tmp_path / "case.geojson", feats)
    data = wsi_dataset([path], [ann], mpp=0.5, patch=128, mask_kind="instance", min_annotated=0.0)
    m = data.masks[0]
    assert data.names == ["case_x0_y0"] and set(np.unique(m).tolist()) == {0, 1, 2, 3, 4}
    assert all((m == i + 1).sum() == 144 for i in range(4)) and data.n_classes is None


def test_two_mpps_cover_the_same_physical_region(tmp_path):
    base = rgb_noise(256, 256, seed=5)
    fine = np.repeat(np.repeat(base, 2, axis=0), 2, axis=1)          # same tissue at 0.25 mpp
    a = write_pyramid_tiff(tmp_path / "fine.tif", fine, 0.25, tile=128, compression="deflate")
    b = write_pyramid_tiff(tmp_path / "coarse.tif", base, 0.5, tile=128, compression="deflate")
    um = (40.0, 30.0, 90.0, 61.0)                                     # a rectangle in microns
    ga = write_geojson(tmp_path / "fine.geojson", [feature([square(*(v / 0.25 for v in um))])])
    gb = write_geojson(tmp_path / "coarse.geojson", [feature([square(*(v / 0.5 for v in um))])])
    data = wsi_dataset([a, b], [ga, gb], mpp=1.0, patch=32, min_annotated=0.0)
    fine_names = [n for n in data.names if n.startswith("fine_")]
    # level-0 (160, 120)-(360, 244) at 0.25 mpp; 128 px patches
    assert fine_names == ["fine_x128_y0", "fine_x256_y0", "fine_x128_y128", "fine_x256_y128"]
    assert len(data) == 8
    for name in fine_names:       # fine origin (x, y) at 0.25 mpp is coarse (x/2, y/2) at 0.5 mpp
        x, y = (int(t[1:]) for t in name.split("_")[1:])
        i, j = data.names.index(name), data.names.index(f"coarse_x{x // 2}_y{y // 2}")
        np.testing.assert_array_equal(data.masks[i], data.masks[j])
        diff = np.abs(data.images[i].astype(int) - data.images[j].astype(int))
        assert diff.mean() < 2.0
    assert sum(int(m.sum()) for m in data.masks) == 2 * 50 * 31


def test_annotation_past_the_slide_edge_is_clipped_and_padded(tmp_path):
    rgb = rgb_noise(300, 200, seed=2)
    path = write_pyramid_tiff(tmp_path / "edge.tif", rgb, 0.5, tile=128, compression="deflate")
    ann = write_geojson(tmp_path / "edge.geojson", [feature([square(250, 150, 400, 300)])])
    data = wsi_dataset([path], [ann], mpp=0.5, patch=64, min_annotated=0.0)
    assert data.names == ["edge_x192_y128", "edge_x256_y128", "edge_x192_y192", "edge_x256_y192"]
    m, img = data.masks[3], data.images[3]
    assert m.sum() == 44 * 8 and (m[:8, :44] == 1).all()           # x < 300, y < 200 only
    np.testing.assert_array_equal(img[:8, :44], rgb[192:200, 256:300])
    assert (img[8:] == 255).all() and (img[:, 44:] == 255).all()


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_skipped_and_recorded(tmp_path, slide, caplog):
    path, rgb = slide
    good = write_geojson(tmp_path / "case.geojson", [feature([square(0, 0, 200, 200)])])
    other = write_pyramid_tiff(tmp_path / "other.tif", rgb, 0.5, tile=128, compression="deflate")
    bad = tmp_path / "other.geojson"
    bad.write_text("{oops")
    nompp = write_pyramid_tiff(tmp_path / "nompp.tif", rgb, None, tile=128, compression="deflate")
    missing = tmp_path / "gone.tif"
    outside = write_pyramid_tiff(tmp_path / "far.tif", rgb, 0.5, tile=128, compression="deflate")
    far = write_geojson(tmp_path / "far.geojson", [feature([square(5000, 5000, 5100, 5100)])])
    with caplog.at_level(logging.WARNING, logger="mil.seg.wsi"):
        data = wsi_dataset([other, path, nompp, missing, outside], [bad, good, good, good, far],
                           mpp=1.0, patch=64)
    assert {n.split("_x")[0] for n in data.names} == {"case"}
    assert set(data.skipped) == {"other", "nompp", "gone", "far"}
    assert str(bad) in data.skipped["other"] and "not JSON" in data.skipped["other"]
    assert "microns-per-pixel" in data.skipped["nompp"] and "no such slide" in data.skipped["gone"]
    assert "extent" in data.skipped["far"]
    assert str(bad) in caplog.text
    assert len(wsi_dataset([nompp], [good], mpp=1.0, patch=64, slide_mpp=0.5)) == 4
    with pytest.raises(SegError, match="no usable slide"):
        wsi_dataset([other], [bad], mpp=1.0, patch=64)


# ------------------------------------------------------------------ label TIFF
def test_label_tiff_quarter_size_reads_back(tmp_path, slide):
    path, _ = slide
    mask = np.zeros((96, 128), np.uint8)                               # slide 512x384 / 4
    mask[10:20, 4:14] = 2                                              # even-aligned: level 1 is exact
    mask[40:60, 64:96] = 1
    tif = tmp_path / "case_mask.tif"
    with tifffile.TiffWriter(tif) as tw:                               # pyramidal, tiled
        tw.write(mask, tile=(32, 32), subifds=1, compression="zlib")
        tw.write(mask[::2, ::2], tile=(32, 32), subfiletype=1, compression="zlib")
    level0 = np.kron(mask, np.ones((4, 4), np.uint8))                  # the mask at slide level 0
    with LabelTiff(tif, (512, 384)) as lt:
        np.testing.assert_array_equal(lt.read((16, 24), 64, 64), level0[24:88, 16:80])
        np.testing.assert_array_equal(lt.read((0, 0), 256, 32), level0[4:256:8, 4:256:8])
        np.testing.assert_array_equal(lt.read((480, 352), 64, 64)[:32, :32], level0[352:, 480:])
        assert (lt.read((480, 352), 64, 64)[32:] == 0).all()
    data = wsi_dataset([path], [tif], mpp=1.0, patch=64, classes={"Stroma": 1, "Tumor": 2})
    i = data.names.index("case_x0_y0")
    np.testing.assert_array_equal(data.masks[i], level0[0:128:2, 0:128:2])
    assert data.n_classes == 3 and data.classes == {"Stroma": 1, "Tumor": 2}
    assert wsi_dataset([path], [tif], mpp=1.0, patch=64).classes == {"1": 1, "2": 2}
    with pytest.raises(SegError, match=r"case_mask.tif: label value\(s\) \[1\] .* not class ids \[2\]"):
        wsi_dataset([path], [tif], mpp=1.0, patch=64, classes={"Tumor": 2})


def test_label_tiff_non_integer_factor_is_nearest_neighbour(tmp_path):
    mask = np.random.default_rng(1).integers(0, 4, (200, 200), dtype=np.uint16)
    tif = tmp_path / "m.tif"
    tifffile.imwrite(tif, mask)
    expected = np.asarray(Image.fromarray(mask).resize((500, 500), Image.NEAREST))
    with LabelTiff(tif, (500, 500)) as lt:
        np.testing.assert_array_equal(lt.read((0, 0), 500, 500), expected)


@pytest.mark.parametrize("array, message", [
    (np.zeros((100, 120), np.uint8), "aspect"),
    (np.zeros((96, 128, 3), np.uint8), "one channel"),
    (np.zeros((96, 128), np.float32), "not an integer"),
])
def test_label_tiff_refused_names_the_file(tmp_path, slide, array, message):
    tif = tmp_path / "bad_mask.tif"
    tifffile.imwrite(tif, array)
    with pytest.raises(SegError, match=message) as err:
        LabelTiff(tif, (512, 384))
    assert str(tif) in str(err.value)
    path, _ = slide
    good = write_geojson(tmp_path / "good.geojson", [feature([square(0, 0, 200, 200)])])
    other = write_pyramid_tiff(tmp_path / "good.tif", np.full((384, 512, 3), 200, np.uint8), 0.5, tile=128)
    data = wsi_dataset([path, other], [tif, good], mpp=1.0, patch=64, mask_kind="binary")
    assert message in data.skipped["case"] and data.names[0].startswith("good_")
    with pytest.raises(SegError, match="explicit classes"):     # names 1..n vs stored values
        wsi_dataset([path, other], [tif, good], mpp=1.0, patch=64)


def test_aperio_svs_gives_the_same_masks_as_generic_tiff(tmp_path, slide):
    path, rgb = slide
    svs = write_pyramid_tiff(tmp_path / "scan.svs", rgb, 0.5, tile=128, vendor="aperio", factor=4)
    feats = [feature([square(100, 100, 164, 164)])]
    anns = [write_geojson(tmp_path / f"{n}.geojson", feats) for n in ("case", "scan")]
    data = wsi_dataset([path, svs], anns, mpp=1.0, patch=64, min_annotated=0.0)
    with Slide(svs) as s:
        assert s.vendor == "aperio"
        i = data.names.index("scan_x128_y128")
        np.testing.assert_array_equal(data.images[i], s.read_patch((128, 128), 128, 64))
    for name in ("x0_y0", "x128_y0", "x0_y128", "x128_y128"):
        np.testing.assert_array_equal(data.masks[data.names.index(f"case_{name}")],
                                      data.masks[data.names.index(f"scan_{name}")])
