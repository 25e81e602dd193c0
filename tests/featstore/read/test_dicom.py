"""DICOM WSI through OpenSlide 4: a slide converted by wsidicomizer (a folder of .dcm files, one
per level) is found as ONE slide named after its folder, tiled at the file's mpp, and gives the
TIFF's features (cosine >= 0.999 on every common tile)."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.cohort import discover_slides
from featstore.extract import ExtractConfig, Extractor
from featstore.store import open_store
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

wsidicomizer = pytest.importorskip("wsidicomizer")


def test_a_dicom_series_is_one_slide_with_the_tiffs_features(tmp_path):
    (tmp_path / "tif").mkdir()
    tif = write_pyramid_tiff(tmp_path / "tif" / "case.tif",
                             rectangles_slide((1024, 768), [(64, 64, 960, 704)], seed=3), mpp=0.5)
    series = tmp_path / "dicom" / "case"
    series.mkdir(parents=True)
    files = wsidicomizer.WsiDicomizer.convert(tif, series, tile_size=256, include_label=False,
                                              include_overview=False)
    assert len(files) >= 2                                   # one file per pyramid level
    refs = discover_slides([tmp_path / "dicom"])
    assert [r.slide_id for r in refs] == ["case"] and refs[0].path.suffix == ".dcm"
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(1,), tiling=TilingConfig(patch_size=64, mpp=1.0),
                        input_size=64, precision="fp32", batch_size=32, workers=1, device="cpu")
    for name, slides in (("tif", tmp_path / "tif"), ("dcm", tmp_path / "dicom")):
        report = Extractor(cfg).run(discover_slides([slides]), tmp_path / f"{name}.zarr")
        assert report.ok and report.done == ["case"], report
    a, b = open_store(str(tmp_path / "tif.zarr")), open_store(str(tmp_path / "dcm.zarr"))
    assert b.slide_info("case")["slide_mpp"] == pytest.approx(0.5) and b.slide_info("case")["size0"] == 128
    ca, cb = map(lambda s: {tuple(c): i for i, c in enumerate(s.coords("case"))}, (a, b))
    common = sorted(set(ca) & set(cb))
    assert len(common) >= 0.95 * max(len(ca), len(cb))
    fa = a.features("case", "resnet18", 1)[[ca[c] for c in common]].astype(np.float64)
    fb = b.features("case", "resnet18", 1)[[cb[c] for c in common]].astype(np.float64)
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    print(f"DICOM vs TIFF: {len(common)} common tiles, cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.999, cos.min()            # the DICOM tiles are re-encoded JPEG of the same pixels
