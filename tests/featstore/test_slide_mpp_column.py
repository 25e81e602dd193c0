"""A slide list's ``mpp`` column: a slide whose file records no resolution (or a wrong one) gets
its microns per pixel from the CSV, others keep their file's; a bad cell is one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from featstore.cli import featstore_app
from featstore.cohort import discover_slides
from featstore.errors import FeatstoreError
from featstore.store import open_store
from featstore.synth import rectangles_slide, write_pyramid_tiff

FAST = ["--encoder", "resnet18", "--weights", "random", "--minus", "2", "--resize", "32", "--precision", "fp32",
        "--patch-size", "64", "--mpp", "1.0", "--workers", "1"]


def test_the_csv_mpp_tiles_a_slide_without_resolution(tmp_path):
    rgb = rectangles_slide((768, 512), [(0, 0, 768, 512)], seed=0)
    write_pyramid_tiff(tmp_path / "none.tif", rgb, mpp=None)       # no resolution in the file
    write_pyramid_tiff(tmp_path / "own.tif", rgb, mpp=0.25)
    (tmp_path / "slides.csv").write_text("slide_id,path,mpp\nnone,none.tif,0.5\nown,own.tif,\n")
    refs = discover_slides([tmp_path / "slides.csv"])
    assert [(r.slide_id, r.mpp) for r in refs] == [("none", 0.5), ("own", None)]
    res = CliRunner().invoke(featstore_app, ["extract", str(tmp_path / "slides.csv"), "--store",
                                             str(tmp_path / "s.zarr"), *FAST])
    assert res.exit_code == 0, res.output
    st = open_store(str(tmp_path / "s.zarr"))
    info = {s: st.slide_info(s) for s in ("none", "own")}
    assert info["none"]["slide_mpp"] == 0.5 and info["none"]["size0"] == 128       # 64 px @ 1 µm = 128 px @ 0.5
    assert info["own"]["slide_mpp"] == 0.25 and info["own"]["size0"] == 256       # the file's own mpp
    # without the column, the slide without resolution is recorded as a failure, the other extracted
    (tmp_path / "plain.csv").write_text("slide_id,path\nnone,none.tif\nown,own.tif\n")
    res = CliRunner().invoke(featstore_app, ["extract", str(tmp_path / "plain.csv"), "--store",
                                             str(tmp_path / "p.zarr"), *FAST])
    assert "none" in open_store(str(tmp_path / "p.zarr")).failures()


@pytest.mark.parametrize("cell", ["abc", "0", "-1", "500"])
def test_a_bad_mpp_cell_is_one_line_naming_file_and_line(tmp_path, cell):
    write_pyramid_tiff(tmp_path / "a.tif", rectangles_slide((256, 256), [(0, 0, 256, 256)]), mpp=0.5)
    (tmp_path / "s.csv").write_text(f"slide_id,path,mpp\na,a.tif,{cell}\n")
    with pytest.raises(FeatstoreError, match=rf"s.csv:2: mpp '{cell}' is not a plausible microns per pixel"):
        discover_slides([tmp_path / "s.csv"])
