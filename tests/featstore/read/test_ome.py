"""OME-TIFF with its pyramid in SubIFDs and its mpp in the OME-XML (as Bio-Formats writes it):
OpenSlide alone sees one level and no mpp; featstore reads every level and the mpp, tiles it like
the TIFF it was made from and gives the TIFF's features (cosine >= 0.999 on every common tile)."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from featstore.cohort import discover_slides
from featstore.errors import SlideFormatError
from featstore.extract import ExtractConfig, Extractor
from featstore.read.ome import ome_mpp
from featstore.read.slide import Slide
from featstore.store import open_store
from featstore.synth import rectangles_slide, write_ome_tiff, write_pyramid_tiff
from featstore.tiling import TilingConfig


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ome")
    rgb = rectangles_slide((1024, 768), [(64, 64, 960, 704)], seed=3)
    (root / "tif").mkdir()
    (root / "ome").mkdir()
    return (write_pyramid_tiff(root / "tif" / "case.tif", rgb, mpp=0.5),
            write_ome_tiff(root / "ome" / "case.ome.tif", rgb, mpp=500.0 / 1000, unit="nm"), root)


def test_openslide_alone_misses_the_pyramid_and_the_mpp(pair):
    _, ome, _ = pair
    with openslide.OpenSlide(str(ome)) as o:          # why featstore reads OME-TIFF itself
        assert o.level_count == 1 and openslide.PROPERTY_NAME_MPP_X not in o.properties


def test_ome_tiff_has_the_tiffs_levels_mpp_and_pixels(pair):
    tif, ome, _ = pair
    with Slide(tif) as a, Slide(ome) as b:
        assert b.level_dimensions == a.level_dimensions and len(b.level_dimensions) == 3
        assert b.mpp == pytest.approx(0.5) and b.vendor == "ome-tiff"        # 500 nm in the OME-XML
        for level in range(3):
            ra = a.read_region((96, 80), level, (120, 90)).astype(int)
            rb = b.read_region((96, 80), level, (120, 90)).astype(int)
            assert np.abs(ra - rb).mean() < 1.0, level                       # the same JPEG tiles, decoded
        edge = b.read_region((1000, 740), 0, (64, 64))                      # past the image: white, as OpenSlide
        assert (edge[40:, 40:] == 255).all()
        np.testing.assert_allclose(b.thumbnail(256)[0], a.thumbnail(256)[0], atol=3)


def test_ome_tiff_gives_the_tiffs_tiles_and_features(pair, tmp_path):
    _, _, root = pair
    refs = discover_slides([root / "ome"])
    assert [r.slide_id for r in refs] == ["case"]                           # not "case.ome"
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(1,), tiling=TilingConfig(patch_size=64, mpp=1.0),
                        input_size=64, precision="fp32", batch_size=32, workers=1, device="cpu")
    for name in ("tif", "ome"):
        report = Extractor(cfg).run(discover_slides([root / name]), tmp_path / f"{name}.zarr")
        assert report.ok and report.done == ["case"], report
    a, b = open_store(str(tmp_path / "tif.zarr")), open_store(str(tmp_path / "ome.zarr"))
    np.testing.assert_array_equal(a.coords("case"), b.coords("case"))
    fa, fb = (s.features("case", "resnet18", 1).astype(np.float64) for s in (a, b))
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() >= 0.999, cos.min()


def test_the_viewer_serves_ome_tiff_deep_zoom_tiles(pair):
    from openslide.deepzoom import DeepZoomGenerator

    from featstore.read.slide import open_handle

    tif, ome, _ = pair
    za, zb = (DeepZoomGenerator(open_handle(p), tile_size=254, overlap=1) for p in (tif, ome))
    assert za.level_count == zb.level_count
    top = za.level_count - 1
    ta, tb = (np.asarray(z.get_tile(top, (1, 1)).convert("RGB"), int) for z in (za, zb))
    assert ta.shape == tb.shape and np.abs(ta - tb).mean() < 1.0


def test_ome_mpp_units_and_a_fluorescence_file_is_one_line(tmp_path):
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="0.25" '
           'PhysicalSizeY="0.26" PhysicalSizeXUnit="µm" PhysicalSizeYUnit="µm"/></Image></OME>')
    assert ome_mpp(xml) == (0.25, 0.26)
    assert ome_mpp("<OME><Image><Pixels/></Image></OME>") == (None, None)
    assert ome_mpp("not xml") == (None, None)
    path = tmp_path / "ifc.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 256, 256), np.uint16), ome=True, tile=(128, 128), metadata={"axes": "CYX"})
    with pytest.raises(SlideFormatError, match=r"ifc\.ome\.tif.*not multi-channel fluorescence"):
        Slide(path)
