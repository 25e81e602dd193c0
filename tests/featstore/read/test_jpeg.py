"""featstore.read.jpeg: Aperio-style abbreviated tiles made whole, and cut-off tiles caught."""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from featstore.read.jpeg import ADOBE_RGB, EOI, SOI, complete, is_whole, segments, split_tables
from featstore.synth import rectangles_slide, write_pyramid_tiff


def _full_jpeg(rgb: np.ndarray, colorspace: str = "YCbCr") -> bytes:
    return bytes(imagecodecs.jpeg8_encode(rgb, level=90, colorspace="RGB", outcolorspace=colorspace))


def test_segments_walk_the_header_to_the_scan():
    data = _full_jpeg(np.full((16, 16, 3), 128, np.uint8))
    markers = [m for m, _, _ in segments(data)]
    assert 0xDB in markers and 0xC4 in markers and markers[-1] == 0xDA
    with pytest.raises(ValueError, match="SOI"):
        segments(b"not a jpeg")


def test_split_then_complete_round_trips_an_ycbcr_stream():
    rgb = rectangles_slide((64, 48), [(0, 0, 64, 48)], seed=1)
    full = _full_jpeg(rgb)
    tables, tile = split_tables(full)
    assert tables[:2] == SOI and tables[-2:] == EOI
    assert b"\xff\xdb" not in tile and b"\xff\xc4" not in tile      # tables stripped
    whole = complete(tile, tables, rgb=False)
    ref = imagecodecs.jpeg8_decode(full)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(whole)).convert("RGB")), ref)


def test_rgb_tile_needs_the_adobe_marker_to_decode_right():
    """An RGB-colour-space stream with ids 0,1,2 (Aperio) decodes wrong unless told it is RGB."""
    rgb = rectangles_slide((64, 64), [(0, 0, 64, 64)], seed=2)
    tables, tile = split_tables(_full_jpeg(rgb, "RGB"), component_ids=b"\x00\x01\x02")
    right = np.asarray(Image.open(io.BytesIO(complete(tile, tables, rgb=True))).convert("RGB")).astype(int)
    wrong = np.asarray(Image.open(io.BytesIO(complete(tile, tables, rgb=False))).convert("RGB")).astype(int)
    assert complete(tile, tables, rgb=True).count(ADOBE_RGB) == 1
    assert np.abs(right - rgb).mean() < 3
    assert np.abs(wrong - rgb).mean() > 20


def test_is_whole_catches_a_cut_off_stream():
    data = _full_jpeg(np.full((32, 32, 3), 200, np.uint8))
    assert is_whole(data) and is_whole(data + b"\x00\x00")
    assert not is_whole(data[: len(data) // 2])


def test_svs_like_slide_is_aperio_to_openslide_and_decodes_the_same(tmp_path):
    rgb = rectangles_slide((700, 500), [(0, 0, 700, 500)], seed=4)
    path = write_pyramid_tiff(tmp_path / "s.svs", rgb, mpp=0.25, tile=240, vendor="aperio", jpeg_tables=True)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.photometric == 2 and page.jpegtables is not None
        assert page.compression == 7 and page.is_tiled
        native = page.asarray()
    osr = openslide.OpenSlide(str(path))
    assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
    region = np.asarray(osr.read_region((0, 0), 0, (700, 500)))[..., :3]
    osr.close()
    assert np.array_equal(region, native)                           # one decoding, two readers
    assert np.abs(region.astype(int) - rgb).mean() < 6               # JPEG loss only, colours right
