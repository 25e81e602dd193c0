"""featstore.read.slide on real pyramidal TIFFs written with tifffile and read through OpenSlide."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from featstore.core.errors import ConfigError
from featstore.errors import (FeatstoreError, MissingMppError, SlideFormatError, SlideNotFoundError,
                              SlideReadError)
from featstore.read.slide import Slide, composite_white
from featstore.synth import BACKGROUND, rectangles_slide, write_pyramid_tiff


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> tuple:
    """A 1024x768 slide fully covered by texture, lossless (deflate), 3 levels; and its pixels."""
    rgb = rectangles_slide((1024, 768), [(0, 0, 1024, 768)], seed=3)
    path = write_pyramid_tiff(tmp_path_factory.mktemp("slide") / "full.tif", rgb, mpp=0.5, compression="deflate")
    return path, rgb


def _one_line_naming(exc: BaseException, path) -> None:
    msg = str(exc)
    assert "\n" not in msg
    assert str(path) in msg


# ------------------------------------------------------------------ geometry and metadata

def test_geometry_and_mpp_from_the_file(textured):
    path, _ = textured
    with Slide(path) as s:
        assert s.dimensions == (1024, 768)
        assert s.level_count == 3
        assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx(0.5)
        assert s.vendor == "generic-tiff"


def test_read_region_returns_the_written_pixels(textured):
    path, rgb = textured
    with Slide(path) as s:
        out = s.read_region((300, 200), 0, (96, 64))
        assert out.shape == (64, 96, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, rgb[200:264, 300:396])


def test_area_outside_the_slide_is_white(textured):
    path, rgb = textured
    with Slide(path) as s:
        out = s.read_region((1000, 740), 0, (64, 64))   # slide is 1024x768: x >= 24, y >= 28 outside
    assert (out[:, 24:] == 255).all() and (out[28:, :] == 255).all()
    np.testing.assert_array_equal(out[:28, :24], rgb[740:, 1000:])


def test_read_patch_from_a_reduced_level_matches_level0_plus_resize(textured):
    path, _ = textured
    with Slide(path) as s:
        assert s.best_level(4.0) == 2 and s.best_level(3.0) == 1 and s.best_level(1.0) == 0
        for xy in [(0, 0), (300, 200), (700, 500)]:
            fast = s.read_patch(xy, 256, 64)     # downsample 4 -> level 2
            ref = np.asarray(Image.fromarray(s.read_region(xy, 0, (256, 256))).resize((64, 64), Image.BILINEAR))
            assert fast.shape == (64, 64, 3) and fast.dtype == np.uint8
            assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 3.0


def test_read_patch_resizes_with_the_named_filter(textured):
    path, _ = textured
    with Slide(path) as s:
        region = Image.fromarray(s.read_region((300, 200), 0, (256, 256)))
        for name, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
            want = np.asarray(region.resize((224, 224), pil))     # 256 -> 224 reads level 0
            np.testing.assert_array_equal(s.read_patch((300, 200), 256, 224, name), want)
        np.testing.assert_array_equal(s.read_patch((300, 200), 256, 224), s.read_patch((300, 200), 256, 224, "bilinear"))
        assert not np.array_equal(s.read_patch((300, 200), 256, 224, "bicubic"), s.read_patch((300, 200), 256, 224))
        with pytest.raises(ConfigError, match="interpolation 'spline': use one of nearest, box, bilinear"):
            s.read_patch((300, 200), 256, 224, "spline")


def test_read_patch_at_native_size_is_exact(textured):
    path, rgb = textured
    with Slide(path) as s:
        np.testing.assert_array_equal(s.read_patch((128, 64), 200, 200), rgb[64:264, 128:328])


def test_composite_white_blends_transparent_areas_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[0, :, 3] = 255      # opaque row
    rgba[1, 0, 3] = 0        # fully transparent
    rgba[1, 1, 3] = 128      # half
    rgba[1, 2, 3] = 255
    out = composite_white(rgba)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [[10, 100, 200]] * 3)
    np.testing.assert_array_equal(out[1, 0], [255, 255, 255])
    np.testing.assert_allclose(out[1, 1], [(10 + 255) / 2, (100 + 255) / 2, (200 + 255) / 2], atol=1.0)
    np.testing.assert_array_equal(out[1, 2], [10, 100, 200])


def test_aperio_vendor_is_detected_with_its_mpp_and_thumbnail_keeps_aspect(tmp_path):
    rgb = rectangles_slide((1024, 512), [(0, 0, 500, 300)], seed=1)
    path = write_pyramid_tiff(tmp_path / "a.svs", rgb, mpp=0.25, vendor="aperio")
    with Slide(path) as s:
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.25)
        assert s.properties["openslide.objective-power"] == "40"
        thumb, ds = s.thumbnail(256)
        assert thumb.shape == (128, 256, 3) and thumb.dtype == np.uint8
        assert ds == pytest.approx(4.0)
        # tissue in the top-left, glass elsewhere
        assert thumb[:60, :100].std() > 5
        np.testing.assert_allclose(thumb[100:, 200:].reshape(-1, 3).mean(0), BACKGROUND, atol=3)


def test_thumbnail_of_a_small_slide_is_the_slide(tmp_path):
    rgb = rectangles_slide((300, 200), [(0, 0, 150, 100)], seed=2)
    path = write_pyramid_tiff(tmp_path / "small.tif", rgb, mpp=0.5, compression="deflate")
    with Slide(path) as s:
        thumb, ds = s.thumbnail(2048)
    assert ds == 1.0
    np.testing.assert_array_equal(thumb, rgb)


def test_fingerprint_changes_with_the_file(tmp_path, textured):
    path, _ = textured
    copy = shutil.copy(path, tmp_path / "copy.tif")
    with Slide(path) as a, Slide(copy) as b:
        assert a.fingerprint() == b.fingerprint()
        assert a.fingerprint()["size"] == path.stat().st_size
    with open(copy, "ab") as fh:
        fh.write(b"x")
    with Slide(copy) as b:
        assert b.fingerprint() != Slide(path).fingerprint()


# ------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError) as ei:
        Slide(path)
    assert isinstance(ei.value, FeatstoreError) and isinstance(ei.value, FileNotFoundError)
    _one_line_naming(ei.value, path)


def test_text_file_renamed_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 50)
    with pytest.raises(SlideFormatError) as ei:
        Slide(path)
    assert isinstance(ei.value, FeatstoreError) and isinstance(ei.value, ValueError)
    _one_line_naming(ei.value, path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9])
def test_truncated_tiff(tmp_path, textured, keep):
    # tifffile writes each level's IFD before its tiles, so any cut loses a level's IFD:
    # OpenSlide refuses to open it (measured: the same "unsupported format" as a text file)
    src, _ = textured
    data = src.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideFormatError) as ei:
        Slide(path)
    _one_line_naming(ei.value, path)


def test_slide_without_mpp_needs_an_override(tmp_path):
    rgb = rectangles_slide((512, 512), [(0, 0, 256, 256)], seed=0)
    path = write_pyramid_tiff(tmp_path / "nompp.tif", rgb, mpp=None)
    with Slide(path) as s:
        assert s.file_mpp() is None
        assert s.dimensions == (512, 512)     # opening works; only mpp is missing
        with pytest.raises(MissingMppError) as ei:
            _ = s.mpp
    assert isinstance(ei.value, FeatstoreError) and isinstance(ei.value, ValueError)
    _one_line_naming(ei.value, path)
    assert "--slide-mpp" in str(ei.value)
    with Slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_override_wins_over_the_file(textured):
    path, _ = textured
    with Slide(path, mpp=0.3) as s:
        assert s.mpp == pytest.approx(0.3)
        assert s.file_mpp() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_override_is_refused(textured, bad):
    path, _ = textured
    with pytest.raises(MissingMppError) as ei:
        Slide(path, mpp=bad)
    _one_line_naming(ei.value, path)


def test_corrupt_tile_raises_then_the_same_handle_still_reads(tmp_path, textured):
    src, rgb = textured
    path = shutil.copy(src, tmp_path / "corrupt.tif")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.tilewidth == 256
        offsets, counts = page.dataoffsets, page.databytecounts
    cols = -(-1024 // 256)
    bad = 1 * cols + 1                       # tile at row 1, col 1: level-0 [256, 512) x [256, 512)
    garbage = np.random.default_rng(0).integers(0, 256, counts[bad], dtype=np.uint8).tobytes()
    with open(path, "r+b") as fh:
        fh.seek(offsets[bad])
        fh.write(garbage)

    with Slide(path) as s:                   # opens fine: only the tile data is broken
        with pytest.raises(SlideReadError) as ei:
            s.read_region((300, 300), 0, (64, 64))
        assert isinstance(ei.value, FeatstoreError) and isinstance(ei.value, OSError)
        _one_line_naming(ei.value, path)
        # OpenSlide errors are sticky; the reader reopened, so other regions read correctly
        for _ in range(2):
            np.testing.assert_array_equal(s.read_region((600, 0), 0, (200, 200)), rgb[0:200, 600:800])
        np.testing.assert_array_equal(s.read_patch((0, 512), 128, 128), rgb[512:640, 0:128])
        with pytest.raises(SlideReadError):   # and the broken tile still fails, cleanly
            s.read_region((256, 256), 0, (16, 16))
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (32, 32)), rgb[:32, :32])


def test_thumbnail_of_a_level_too_big_to_read_at_once_is_built_in_blocks(tmp_path, monkeypatch):
    """A single-level scan is shrunk block by block (bounded memory) to the same picture."""
    import featstore.read.slide as slide_mod
    from featstore.synth import rectangles_slide, write_pyramid_tiff

    rgb = rectangles_slide((1200, 900), [(100, 100, 700, 500), (800, 300, 1100, 800)], seed=4)
    path = write_pyramid_tiff(tmp_path / "flat.tif", rgb, mpp=0.5, levels=1, compression="deflate")
    with slide_mod.Slide(path) as s:
        assert s.level_count == 1
        whole, ds = s.thumbnail(300)
        monkeypatch.setattr(slide_mod, "_THUMB_BLOCK", 256)  # force 5 x 4 blocks
        blocks, ds2 = s.thumbnail(300)
    assert ds == ds2 and whole.shape == blocks.shape == (225, 300, 3)
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 3
