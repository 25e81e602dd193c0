"""The native-tile reader against OpenSlide on generated SVS-like and generic JPEG TIFFs."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import featstore
from featstore.cohort import SlideRef
from featstore.errors import SlideReadError
from featstore.extract import ExtractConfig, Extractor
from featstore.read.native import NativeSlide, TileCache, dct_scale, open_slide, probe, reader_of
from featstore.read.slide import Slide
from featstore.synth import he_image, write_pyramid_tiff
from featstore.tiling import TilingConfig
from featstore.read.tilesource import TileSource

SIZE = (1537, 1203)        # odd on purpose: edge tiles on both axes at every level


def _he(size=SIZE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return he_image(np.ones((size[1] // 24, size[0] // 24), bool), size, rng)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """SVS-like (JPEGTables, RGB streams, 240² tiles) and generic (YCbCr) slides, pyramid and single level."""
    d = tmp_path_factory.mktemp("native")
    rgb = _he()
    return {
        "svs": write_pyramid_tiff(d / "a.svs", rgb, 0.25, tile=240, vendor="aperio", jpeg_tables=True),
        "svs1": write_pyramid_tiff(d / "b.svs", rgb, 0.25, tile=240, vendor="aperio", jpeg_tables=True, levels=1),
        "generic": write_pyramid_tiff(d / "c.tif", rgb, 0.25, tile=256),
        "generic1": write_pyramid_tiff(d / "d.tif", rgb, 0.25, tile=256, levels=1),
        "deflate": write_pyramid_tiff(d / "e.tif", rgb, 0.25, tile=256, compression="deflate"),
    }


# patches (x, y) chosen to hit tile corners, fractional level offsets and the slide's edge (tiling
# grids start at 0: OpenSlide's handling of negative fractional offsets is not mimicked)
XY = [(0, 0), (240, 480), (17, 33), (1200, 900), (1400, 1100), (1333, 7)]


@pytest.mark.parametrize("name", ["svs", "svs1", "generic", "generic1"])
@pytest.mark.parametrize("size0,out,interp,resize", [
    (224, 224, "bilinear", None),      # native level, pure crop
    (448, 224, "bilinear", None),      # 0.5 µm/px from 0.25: a level-1 read, or a 2x resize
    (896, 224, "bicubic", None),       # 4x: DCT scaling by 2 then a 2x resize on single-level files
    (300, 224, "bilinear", 256),       # resize to 256 then centre-crop 224 (Prov-GigaPath style)
])
def test_native_patches_match_openslide(slides, name, size0, out, interp, resize):
    with Slide(slides[name]) as ref, open_slide(slides[name], reader="native") as nat:
        assert isinstance(nat, NativeSlide) and reader_of(nat) == "native" and reader_of(ref) == "openslide"
        for xy in XY:
            a = ref.read_patch(xy, size0, out, interp, resize).astype(int)
            b = nat.read_patch(xy, size0, out, interp, resize).astype(int)
            assert b.shape == a.shape == (out, out, 3)
            assert np.abs(a - b).mean() <= 2.0, (name, xy)
            assert np.abs(a - b).max() <= 64      # no misplaced tile or wrong colour space


def test_native_level_read_is_openslide_exact_where_decoders_agree(slides):
    """Same libjpeg, same tiles: at the native level the SVS-like slide's patches are identical."""
    with Slide(slides["svs"]) as ref, open_slide(slides["svs"], reader="native") as nat:
        for xy in [(0, 0), (250, 130), (1400, 1100)]:
            assert np.array_equal(ref.read_patch(xy, 224, 224), nat.read_patch(xy, 224, 224))


def test_outside_the_slide_is_white(slides):
    with open_slide(slides["svs"], reader="native") as nat:
        p = nat.read_patch((1500, 1150), 224, 224)
        assert (p[100:, 100:] == 255).all()           # right/bottom of the 1537x1203 extent
        assert (p[:50, :30] != 255).any()


def test_dct_scale_policy():
    assert dct_scale(1.0, 2.0) == 1 and dct_scale(2.0, 2.0) == 1
    assert dct_scale(4.0, 2.0) == 2 and dct_scale(16.0, 2.0) == 8 and dct_scale(3.9, 2.0) == 1
    assert dct_scale(2.0, 1.0) == 2 and dct_scale(8.0, 1.0) == 8
    assert dct_scale(8.0, float("inf")) == 1


def test_dct_scaled_decode_is_used_and_stays_close(slides):
    """A 4x shrink on a single-level file decodes at 1/2 (cached as such) and still matches."""
    cache = TileCache()
    with Slide(slides["svs1"]) as ref, open_slide(slides["svs1"], reader="native", cache=cache) as nat:
        a = ref.read_patch((240, 240), 896, 224).astype(int)
        b = nat.read_patch((240, 240), 896, 224).astype(int)
    scales = {key[-1] for key in cache._items}
    assert scales == {2}
    assert np.abs(a - b).mean() <= 2.0


def test_each_tile_is_decoded_once_per_pass(slides):
    cache = TileCache()
    with open_slide(slides["svs1"], reader="native", cache=cache) as nat:
        lv = nat.layout.levels[0]
        for y in range(0, SIZE[1] - 224, 224):
            for x in range(0, SIZE[0] - 224, 224):
                nat.read_patch((x, y), 224, 224)
    touched = (-(-(SIZE[0] // 224 * 224) // lv.tile_w)) * (-(-(SIZE[1] // 224 * 224) // lv.tile_h))
    assert cache.decodes == touched and cache.hits > 0


def test_cache_stays_within_its_bound_and_decodes_a_contended_tile_once():
    cache = TileCache(max_bytes=10_000)
    for i in range(20):
        cache.get(i, lambda: np.zeros(3000, np.uint8))
    assert cache.nbytes <= 10_000 and len(cache._items) == 3
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return np.ones(10, np.uint8)

    threads = [threading.Thread(target=cache.get, args=("k", slow)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.get("k", slow)[0] == 1


def test_probe_accepts_jpeg_tiffs_and_declines_others_with_a_reason(slides, tmp_path):
    for name in ("svs", "generic"):
        with Slide(slides[name]) as s:
            layout, n = probe(slides[name], s.level_dimensions), s.level_count
        assert not isinstance(layout, str) and len(layout.levels) == n
    svs = probe(slides["svs"], [(SIZE[0], SIZE[1])]).levels[0]
    assert svs.rgb and svs.tables is not None and svs.tile_w == 240
    gen = probe(slides["generic"], [(SIZE[0], SIZE[1])]).levels[0]
    assert not gen.rgb
    with Slide(slides["deflate"]) as s:
        why = probe(slides["deflate"], s.level_dimensions)
    assert isinstance(why, str) and "not JPEG" in why
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a tiff at all" * 100)
    assert "not a TIFF" in probe(junk, [(10, 10)])


def test_auto_falls_back_to_openslide_once_and_native_refuses(slides, caplog):
    caplog.set_level(logging.WARNING, logger="featstore.read.native")
    cache = TileCache()
    for _ in range(3):
        with open_slide(slides["deflate"], reader="auto", cache=cache) as s:
            assert reader_of(s) == "openslide"
    said = [r for r in caplog.records if "read through OpenSlide" in r.getMessage()]
    assert len(said) == 1 and str(slides["deflate"]) in said[0].getMessage()
    with pytest.raises(SlideReadError, match=r"e\.tif.*native reader cannot read it.*not JPEG"):
        open_slide(slides["deflate"], reader="native")
    with open_slide(slides["svs"], reader="auto") as s:
        assert reader_of(s) == "native"


# ------------------------------------------------------------------ corrupt tiles

def _corrupt_tile(path: Path, index: int) -> None:
    """Cut tile *index* of level 0 off half-way (zeros after), as a truncated transfer leaves it."""
    with tifffile.TiffFile(path) as tif:
        off, n = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    with open(path, "r+b") as fh:
        fh.seek(off + n // 2)
        fh.write(b"\0" * (n - n // 2))


def test_a_cut_off_tile_names_the_file_and_tile(tmp_path):
    path = write_pyramid_tiff(tmp_path / "bad.svs", _he((960, 720)), 0.25, tile=240, vendor="aperio",
                              jpeg_tables=True)
    _corrupt_tile(path, 5)                      # column 1, row 1 of 4 columns
    with open_slide(path, reader="native") as nat:
        nat.read_patch((0, 0), 224, 224)         # tile (0, 0) is fine
        with pytest.raises(SlideReadError, match=r"bad\.svs: corrupt JPEG tile \(1, 1\) of level 0.*cut off"):
            nat.read_patch((240, 240), 224, 224)


# ------------------------------------------------------------------ end to end

def _extract(refs, store, reader: str, mpp: float = 0.5) -> Extractor:
    cfg = ExtractConfig(encoder="densenet121", weights="random", levels=(0,), precision="fp32", batch_size=16,
                        workers=2, reader=reader, tiling=TilingConfig(patch_size=224, mpp=mpp))
    ex = Extractor(cfg)
    ex.run(refs, store)
    return ex


def test_extraction_with_either_reader_gives_the_same_embeddings(slides, tmp_path):
    refs = [SlideRef("svs", slides["svs1"]), SlideRef("gen", slides["generic"])]
    _extract(refs, tmp_path / "os.zarr", "openslide")
    _extract(refs, tmp_path / "nat.zarr", "auto")
    a, b = featstore.open_store(tmp_path / "os.zarr"), featstore.open_store(tmp_path / "nat.zarr")
    for sid in ("svs", "gen"):
        fa, fb = a.features(sid, "densenet121", 0), b.features(sid, "densenet121", 0)
        assert len(fa) == len(fb) >= 6
        cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
        assert cos.min() >= 0.99
        assert a.provenance(sid, "densenet121", 0)["reader"] == "openslide"
        assert b.provenance(sid, "densenet121", 0)["reader"] == "native"


def test_a_corrupt_tile_fails_its_slide_and_the_batch_goes_on(slides, tmp_path):
    bad = write_pyramid_tiff(tmp_path / "bad.svs", _he((1200, 960), seed=3), 0.25, tile=240,
                             vendor="aperio", jpeg_tables=True)   # the tissue mask reads a lower level
    _corrupt_tile(bad, 7)
    refs = [SlideRef("bad", bad), SlideRef("good", slides["svs1"])]
    _extract(refs, tmp_path / "s.zarr", "native", mpp=0.25)       # patches from level 0
    st = featstore.open_store(tmp_path / "s.zarr")
    assert "corrupt JPEG tile" in st.failures()["bad"] and "bad.svs" in st.failures()["bad"]
    assert st.has_features("good", "densenet121", 0) and not st.has_features("bad", "densenet121", 0)


# ------------------------------------------------------------------ device path (nvJPEG on CUDA)

@pytest.mark.parametrize("size0,interp,resize", [(224, "bilinear", None), (448, "bilinear", None),
                                                 (896, "bicubic", None), (300, "bilinear", 256)])
def test_device_decode_matches_the_cpu_path(slides, size0, interp, resize):
    """The CUDA path's code, run with device "cpu": one decode_jpeg call per batch, same patches."""
    from featstore.read.devicedecode import read_patches

    coords = np.array(XY)
    for name in ("svs1", "generic"):
        with open_slide(slides[name], reader="native") as nat:
            dev = read_patches(nat, coords, size0, 224, interp, resize, "cpu")
            cpu = np.stack([nat.read_patch(tuple(xy), size0, 224, interp, resize) for xy in coords])
        assert dev.shape == (len(XY), 3, 224, 224) and dev.dtype == torch.uint8
        diff = np.abs(dev.permute(0, 2, 3, 1).numpy().astype(int) - cpu.astype(int))
        assert diff.mean(axis=(1, 2, 3)).max() <= 2.0, name


def test_tilesource_on_a_decode_device_gives_the_cpu_batches(slides):
    pre = {"input_size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}
    coords = np.array(XY[:4])
    out = {}
    for dd in (None, "cpu"):
        with TileSource(pre, workers=2, decode_device=dd) as src:
            src.add("s", slides["svs1"], 448)
            src.add("d", slides["deflate"], 448)          # OpenSlide slide: read on the CPU, then copied
            batch, errors = src.submit_batch([("s", coords), ("d", coords)]).result()
            out[dd] = (batch, src.read("s", coords))
            assert not errors
    for a, b in zip(out[None], out["cpu"]):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert (a - b).abs().mean() * 0.25 * 255 <= 2.0       # back in 0-255 units
