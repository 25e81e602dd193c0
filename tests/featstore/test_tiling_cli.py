"""`featstore tiles` and `featstore demo-data` through the real typer app."""

from __future__ import annotations

import csv

import matplotlib.image as mpimg
import pytest
from typer.testing import CliRunner

from featstore.cli import featstore_app
from featstore.synth import rectangles_slide, write_pyramid_tiff


def _run(*args):
    return CliRunner().invoke(featstore_app, [str(a) for a in args])


def _outline_px(img) -> int:
    """Pixels of the QC picture's lime tissue outline."""
    rgb = img[..., :3]
    return int(((rgb[..., 1] > 0.7) & (rgb[..., 0] < 0.4) & (rgb[..., 2] < 0.4)).sum())


def _text(res) -> str:
    """stdout with rich's line wrapping undone (long tmp paths wrap at 80 columns)."""
    return " ".join(res.output.split())


@pytest.fixture()
def slide(tmp_path):
    rgb = rectangles_slide((1024, 768), [(64, 64, 320, 256), (512, 128, 768, 384)], seed=0)
    return write_pyramid_tiff(tmp_path / "case.tif", rgb, mpp=0.5)


def test_tiles_prints_the_count_and_writes_a_qc_png(slide, tmp_path):
    out = tmp_path / "qc" / "qc.png"
    res = _run("tiles", slide, "--patch-size", "64", "--out", out)
    assert res.exit_code == 0, res.output
    assert ": 28 patches" in _text(res)              # 4x3 + 4x4 grid-aligned patches
    assert out.is_file() and out.stat().st_size > 0
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert _outline_px(img) > 100                  # the tissue outline is drawn
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiles_says_which_reader_auto_would_use(slide, tmp_path):
    res = _run("tiles", slide, "--patch-size", "64")
    assert "reader (--reader auto): native (" in _text(res)          # generic JPEG-tiled TIFF
    lossless = write_pyramid_tiff(tmp_path / "z.tif", rectangles_slide((512, 512), [(0, 0, 512, 512)]), mpp=0.5,
                                  compression="deflate")
    res = _run("tiles", lossless, "--patch-size", "64")
    assert res.exit_code == 0 and "reader (--reader auto): openslide (native reader:" in _text(res)
    assert "not JPEG" in _text(res)


def test_tiles_options_reach_the_tiling(slide):
    res = _run("tiles", slide, "--patch-size", "64", "--overlap", "32", "--min-tissue", "1.0", "--mask", "gray")
    assert res.exit_code == 0, res.output
    # stride 32 inside [64,320)x[64,256) and [512,768)x[128,384): 7x5 + 7x7 fully covered patches
    assert ": 84 patches" in _text(res)


def test_tiles_without_out_writes_nothing(slide, tmp_path):
    res = _run("tiles", slide, "--patch-size", "64")
    assert res.exit_code == 0 and ": 28 patches" in _text(res)
    assert not list(tmp_path.glob("*.png"))


def test_blank_slide_says_no_tissue_and_exits_0(tmp_path):
    path = write_pyramid_tiff(tmp_path / "blank.tif", rectangles_slide((512, 512), []), mpp=0.5)
    out = tmp_path / "qc.png"
    res = _run("tiles", path, "--patch-size", "64", "--out", out)
    assert res.exit_code == 0, res.output
    assert "no tissue found" in _text(res)
    img = mpimg.imread(out)                                   # the QC picture still shows the empty slide
    assert img.ndim == 3 and _outline_px(img) == 0


def test_slide_without_mpp_needs_slide_mpp(tmp_path):
    path = write_pyramid_tiff(tmp_path / "nompp.tif", rectangles_slide((512, 512), [(0, 0, 256, 256)]), mpp=None)
    res = _run("tiles", path, "--patch-size", "64")
    assert res.exit_code == 1
    assert "--slide-mpp" in res.stderr and str(path) in res.stderr
    res = _run("tiles", path, "--patch-size", "64", "--slide-mpp", "0.25")
    assert res.exit_code == 0, res.output
    assert ": 4 patches" in _text(res)                    # 64 px @ 0.5 = 128 px @ 0.25 -> 2x2


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_unreadable_slide_is_one_red_line_and_exit_1(tmp_path, kind):
    path = tmp_path / "case.svs"
    if kind == "text":
        path.write_text("not a slide")
    res = _run("tiles", path)
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0]
    assert "Traceback" not in res.output


def test_bad_tiling_option_is_one_line(slide):
    res = _run("tiles", slide, "--mask", "hue")
    assert res.exit_code == 1
    assert "--mask 'hue' must be one of robust, saturation, gray, grandqc, hest" in res.stderr


def test_demo_data_writes_a_labelled_cohort(tmp_path):
    out = tmp_path / "demo"
    res = _run("demo-data", out, "--n-slides", "2", "--seed", "3")
    assert res.exit_code == 0, res.output
    assert "wrote 2 slides" in _text(res)
    with (out / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["demo_00", "demo_01"]
    assert sorted(r["label"] for r in rows) == ["normal", "tumor"]
    assert all((out / "slides" / f"{r['slide_id']}.tif").is_file() for r in rows)
    assert (out / "lesions.json").is_file()
    # and the command's slides tile
    res = _run("tiles", out / "slides" / "demo_00.tif")
    assert res.exit_code == 0 and " patches of 512 level-0 px" in _text(res)
