"""Per-tile QC (featstore.tileqc, ``--qc flag|drop``) on messy slides whose fold, out-of-focus patch
and tissue are known: flags where the truth is, none on clean (or faint) tissue; stored with the
tiling, counted by `featstore ls`, dropped by --qc drop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import featstore_app
from featstore.messy import messy_slide
from featstore.read.slide import Slide
from featstore.synth import write_pyramid_tiff
from featstore.tileqc import FLAGS, QCRule, flag_tiles, qc_counts, tile_measures
from featstore.tiling import TilingConfig, tile_slide

MPP = 8.0


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    (root / "slides").mkdir()
    m = messy_slide(np.random.default_rng(0))
    return write_pyramid_tiff(root / "slides" / "messy.tif", m.rgb, mpp=MPP), m


def _cover(tiles, a: np.ndarray) -> np.ndarray:
    s0 = tiles.size0
    return np.array([a[y:y + s0, x:x + s0].mean() for x, y in tiles.coords])


def test_flags_fall_on_the_fold_the_blur_and_the_glass(messy):
    path, m = messy
    with Slide(path) as s:
        tiles = tile_slide(s, TilingConfig(patch_size=32, mpp=MPP, qc="flag", min_tissue=0.1))
    fold, blur, tissue, faint = (_cover(tiles, a) for a in (m.fold, m.blur, m.tissue, m.faint))
    f = tiles.qc_flags
    assert tiles.qc.shape == (len(tiles), 3) and f.shape == (len(tiles),)
    # measured (seeds 0, 1): recall 0.97-1.0, no flag on clean tissue
    assert ((f & FLAGS["dark"]) > 0)[fold >= 0.9].mean() >= 0.95
    assert ((f & FLAGS["blur"]) > 0)[blur >= 0.9].mean() >= 0.9
    assert ((f & FLAGS["background"]) > 0)[tissue < 0.3].mean() >= 0.9
    clean = (fold == 0) & (blur == 0) & (tissue > 0.9)
    assert (f[clean] > 0).mean() <= 0.02
    assert (f[(faint > 0.9) & clean] == 0).all()            # faint is low contrast, not out of focus


def test_drop_leaves_the_flagged_tiles_out(messy):
    path, _ = messy
    with Slide(path) as s:
        flagged = tile_slide(s, TilingConfig(patch_size=32, mpp=MPP, qc="flag"))
        dropped = tile_slide(s, TilingConfig(patch_size=32, mpp=MPP, qc="drop"))
        plain = tile_slide(s, TilingConfig(patch_size=32, mpp=MPP))
    assert plain.qc is None and len(plain) == len(flagged)
    keep = flagged.qc_flags == 0
    np.testing.assert_array_equal(dropped.coords, flagged.coords[keep])
    assert (dropped.qc_flags == 0).all() and dropped.qc_dropped == qc_counts(flagged.qc_flags)
    assert dropped.qc_dropped["blur"] > 10 and dropped.qc_dropped["dark"] > 10


def test_qc_is_off_by_default_and_out_of_old_tiling_keys():
    assert TilingConfig().qc == "off" and "qc" not in TilingConfig().to_dict()
    assert TilingConfig(qc="drop").to_dict()["qc"] == "drop"
    assert TilingConfig.from_dict(TilingConfig(qc="flag").to_dict()) == TilingConfig(qc="flag")


def test_measures_and_rule_on_constructed_tiles():
    rng = np.random.default_rng(0)
    spots = rng.random((64, 64, 1)) > 0.7                                   # nuclei on pink stroma
    sharp = np.where(spots, np.array([120, 60, 150]), np.array([220, 150, 190])).astype(np.uint8)
    from scipy import ndimage

    soft = ndimage.gaussian_filter(sharp.astype(float), (3, 3, 0)).astype(np.uint8)
    glass = np.full((64, 64, 3), 243, np.uint8)
    s_sharp, d_sharp, b_sharp = tile_measures(sharp)
    s_soft, _, _ = tile_measures(soft)
    assert s_soft < 0.2 * s_sharp and b_sharp == 0.0
    assert np.isnan(tile_measures(glass)[0]) and tile_measures(glass)[2] == 1.0
    pale = (243 - 0.5 * (243 - sharp.astype(float))).astype(np.uint8)       # the same pattern, faint
    assert tile_measures(pale)[0] == pytest.approx(s_sharp, rel=0.3)       # contrast-normalised
    measures = np.array([[1.0, 0.4, 0.0]] * 8 + [[0.1, 0.4, 0.0], [1.0, 0.9, 0.0], [np.nan, np.nan, 0.95]])
    flags = flag_tiles(measures, QCRule())
    assert flags.tolist() == [0] * 8 + [FLAGS["blur"], FLAGS["dark"], FLAGS["background"]]


def test_extract_with_qc_and_ls_counts(messy, tmp_path):
    from featstore.store import open_store

    path, _ = messy
    run = CliRunner()
    base = ["--encoder", "resnet18", "--weights", "random", "--minus", "4", "--patch-size", "32", "--mpp", str(MPP),
            "--resize", "32"]
    for mode in ("flag", "drop"):
        res = run.invoke(featstore_app, ["extract", str(path.parent), "--store", str(tmp_path / f"{mode}.zarr"),
                                         *base, "--qc", mode])
        assert res.exit_code == 0, res.output
    a, b = open_store(str(tmp_path / "flag.zarr")), open_store(str(tmp_path / "drop.zarr"))
    measures, flags = a.qc("messy")
    assert len(flags) == a.n_tiles("messy") and (flags > 0).sum() > 20 and a.tiling["qc"] == "flag"
    info = a.slide_info("messy")["qc"]
    assert info["flagged"] == qc_counts(flags) and info["dropped"] == {}
    assert b.n_tiles("messy") == a.n_tiles("messy") - int((flags > 0).sum())
    assert (b.qc("messy")[1] == 0).all() and b.slide_info("messy")["qc"]["dropped"] == qc_counts(flags)
    res = run.invoke(featstore_app, ["ls", str(tmp_path / "flag.zarr")])
    assert res.exit_code == 0 and "QC flagged" in res.output
    assert f"blur {info['flagged']['blur']}, dark {info['flagged']['dark']}" in res.output
    res = run.invoke(featstore_app, ["ls", str(tmp_path / "drop.zarr"), "--format", "json"])
    doc = json.loads(res.output)
    assert doc["slides"][0]["qc"].startswith("dropped blur") and [f.split(":")[0] for f in doc["feature_sets"]] == ["resnet18"]
