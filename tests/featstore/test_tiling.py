"""featstore.tiling: tissue geometry known by construction, physical patch size, config round trip."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.errors import FeatstoreError
from featstore.messy import ihc_view
from featstore.read.slide import Slide
from featstore.synth import add_grain, rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig, TilingError, Tiles, coverage, otsu_threshold, tile_slide, tissue_mask

P = 64                                       # patch side (px at 0.5 µm/px) used throughout: tiny and fast
# the geometry tests need a mask whose edges split mixed pixels exactly at half: Otsu's on saturation
# (the default robust mask's edges are within a few % of a patch: test_robust_edges_are_close_to_exact)
CFG = TilingConfig(patch_size=P, mpp=0.5, mask="saturation")
SIZE = (1024, 768)                           # 16 x 12 patch grid at 0.5 µm/px


def _slide(tmp_path, name, rects, size=SIZE, mpp=0.5, seed=0, **kw):
    return Slide(write_pyramid_tiff(tmp_path / name, rectangles_slide(size, rects, seed=seed), mpp=mpp, **kw))


def _grid_cells(rects, p=P):
    """Row-major (x, y) of grid cells fully inside the grid-aligned rectangles."""
    cells = {(x, y) for x0, y0, x1, y1 in rects for y in range(y0, y1, p) for x in range(x0, x1, p)}
    return sorted(cells, key=lambda c: (c[1], c[0]))


# Grid-aligned tissue: two rectangles and a single-patch square.
ALIGNED = [(64, 64, 320, 256), (512, 128, 768, 384), (896, 640, 960, 704)]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> Slide:
    s = _slide(tmp_path_factory.mktemp("tiles"), "aligned.tif", ALIGNED)
    yield s
    s.close()


def test_patches_of_aligned_rectangles_match_exactly(aligned):
    tiles = tile_slide(aligned, CFG)
    assert isinstance(tiles, Tiles)
    assert tiles.size0 == P and tiles.slide_mpp == pytest.approx(0.5) and tiles.config == CFG
    expected = _grid_cells(ALIGNED)
    assert len(expected) == 4 * 3 + 4 * 4 + 1
    assert len(tiles) == len(expected)
    assert [tuple(c) for c in tiles.coords.tolist()] == expected      # same positions, row-major order
    assert tiles.coords.dtype == np.int32 and tiles.coords.shape == (len(expected), 2)
    assert tiles.tissue.dtype == np.float32 and tiles.tissue.shape == (len(expected),)
    assert tiles.tissue.min() > 0.95 and tiles.tissue.max() <= 1.0


def test_order_is_row_major_and_deterministic(aligned):
    a, b = tile_slide(aligned, CFG), tile_slide(aligned, CFG)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    keys = a.coords[:, 1].astype(np.int64) * 10**6 + a.coords[:, 0]
    assert (np.diff(keys) > 0).all()


def test_min_tissue_one_and_zero(aligned):
    assert len(tile_slide(aligned, TilingConfig(patch_size=P, mask="saturation", min_tissue=1.0))) >= 25  # interior patches
    everything = tile_slide(aligned, TilingConfig(patch_size=P, mask="saturation", min_tissue=0.0))
    assert len(everything) == (SIZE[0] // P) * (SIZE[1] // P)


def test_non_aligned_edges_keep_60_percent_and_drop_40_percent(tmp_path):
    # Column 3 of rect A is covered over 38/64 px (59 %), column 3 of rect B over 26/64 (41 %);
    # rows likewise: rect C's last row is covered 39/64, rect D's last row 25/64.
    rects = [(0, 0, 3 * P + 38, 2 * P),                  # A: keeps columns 0..3
             (0, 4 * P, 3 * P + 26, 6 * P),              # B: keeps columns 0..2
             (8 * P, 0, 10 * P, 2 * P + 39),             # C: keeps rows 0..2
             (12 * P, 0, 14 * P, 2 * P + 25)]            # D: keeps rows 0..1
    tiles = tile_slide(_slide(tmp_path, "edges.tif", rects), CFG)
    got = {tuple(c) for c in tiles.coords.tolist()}
    expected = ({(x * P, y * P) for x in range(4) for y in range(2)}
                | {(x * P, y * P) for x in range(3) for y in range(4, 6)}
                | {(x * P, y * P) for x in range(8, 10) for y in range(3)}
                | {(x * P, y * P) for x in range(12, 14) for y in range(2)})
    assert got == expected
    frac = dict(zip(map(tuple, tiles.coords.tolist()), tiles.tissue.tolist()))
    assert frac[(3 * P, 0)] == pytest.approx(38 / 64, abs=0.07)
    assert frac[(8 * P, 2 * P)] == pytest.approx(39 / 64, abs=0.07)


def test_patches_straddling_two_cells_use_area_weighting(tmp_path):
    # a rectangle offset by half a patch: the grid cuts each of its patches in halves
    rects = [(P // 2, P // 2, P // 2 + 4 * P, P // 2 + 2 * P)]
    tiles = tile_slide(_slide(tmp_path, "half.tif", rects), TilingConfig(patch_size=P, mask="saturation", min_tissue=0.2))
    frac = dict(zip(map(tuple, tiles.coords.tolist()), tiles.tissue.tolist()))
    assert frac[(P, P)] == pytest.approx(1.0, abs=0.05)         # interior
    assert frac[(0, P)] == pytest.approx(0.5, abs=0.07)         # left half in
    assert frac[(0, 0)] == pytest.approx(0.25, abs=0.07)        # corner quarter


def test_overlap_gives_the_expected_stride(tmp_path):
    rects = [(0, 0, 512, 256)]
    cfg = TilingConfig(patch_size=P, overlap=P // 2, mask="saturation")
    tiles = tile_slide(_slide(tmp_path, "overlap.tif", rects, size=(768, 512)), cfg)
    xs, ys = np.unique(tiles.coords[:, 0]), np.unique(tiles.coords[:, 1])
    assert (np.diff(xs) == P // 2).all() and (np.diff(ys) == P // 2).all()
    # full patches inside [0, 512) x [0, 256) at stride 32: x in 0..448, y in 0..192
    expected = [(x, y) for y in range(0, 256 - P + 1, P // 2) for x in range(0, 512 - P + 1, P // 2)]
    got = [tuple(c) for c in tiles.coords.tolist()]
    assert set(expected) <= set(got)
    assert got == sorted(got, key=lambda c: (c[1], c[0]))
    # patches past the rectangle's edge by half a patch (50 % tissue) are kept, farther ones are not
    assert all(x <= 512 - P // 2 and y <= 256 - P // 2 for x, y in got)


def test_same_tissue_at_two_mpps_gives_the_same_physical_patches(tmp_path):
    rects = [(64, 64, 320, 256), (512, 128, 768 - 26, 384)]
    lo = tile_slide(_slide(tmp_path, "mpp05.tif", rects, mpp=0.5), CFG)
    rects2 = [tuple(2 * v for v in r) for r in rects]
    hi = tile_slide(_slide(tmp_path, "mpp025.tif", rects2, size=(2 * SIZE[0], 2 * SIZE[1]), mpp=0.25), CFG)
    assert lo.size0 == P and hi.size0 == 2 * P                     # same 32 µm patch side
    assert lo.size0 * lo.slide_mpp == pytest.approx(hi.size0 * hi.slide_mpp)
    assert len(lo) == len(hi) > 0
    np.testing.assert_array_equal(hi.coords, 2 * lo.coords)        # same physical positions
    np.testing.assert_allclose(hi.tissue, lo.tissue, atol=0.05)


def test_size0_rounds_for_a_non_integer_ratio(tmp_path):
    # 0.4 µm/px slide, 64 px at 0.5 µm/px -> 80 level-0 px; at 0.3 µm/px -> round(106.67) = 107
    s4 = _slide(tmp_path, "mpp04.tif", [(0, 0, 800, 400)], size=(1024, 512), mpp=0.4)
    assert tile_slide(s4, CFG).size0 == 80
    s3 = _slide(tmp_path, "mpp03.tif", [(0, 0, 1024, 512)], size=(1024, 512), mpp=0.3)
    t3 = tile_slide(s3, CFG)
    assert t3.size0 == 107
    assert len(t3) == (1024 // 107) * (512 // 107)
    assert set(np.unique(t3.coords[:, 0]).tolist()) == {107 * i for i in range(1024 // 107)}


def test_mpp_override_makes_a_slide_without_mpp_tileable(tmp_path):
    rgb = rectangles_slide((512, 512), [(0, 0, 256, 256)], seed=0)
    path = write_pyramid_tiff(tmp_path / "nompp.tif", rgb, mpp=None)
    with Slide(path, mpp=0.25) as s:
        tiles = tile_slide(s, CFG)                # 64 px @ 0.5 -> 128 level-0 px
    assert tiles.size0 == 128 and len(tiles) == 4
    assert sorted(map(tuple, tiles.coords.tolist())) == [(0, 0), (0, 128), (128, 0), (128, 128)]


@pytest.mark.parametrize("grain", [False, True])
def test_blank_slide_gives_zero_patches(tmp_path, grain):
    rgb = rectangles_slide(SIZE, [])
    if grain:                                     # glass with sensor noise: Otsu must not split it
        rgb = add_grain(rgb, np.random.default_rng(0))
    with Slide(write_pyramid_tiff(tmp_path / "blank.tif", rgb, mpp=0.5)) as s:
        for mask in ("saturation", "gray", "robust"):
            tiles = tile_slide(s, TilingConfig(patch_size=P, mask=mask))
            assert len(tiles) == 0
            assert tiles.coords.shape == (0, 2) and tiles.coords.dtype == np.int32
            assert tiles.tissue.shape == (0,)


@pytest.mark.parametrize("mask", ["saturation", "gray", "robust"])
def test_slide_fully_covered_by_tissue_keeps_every_patch(tmp_path, mask):
    # no glass in view: Otsu alone would split stroma from nuclei and lose most of the tissue
    with _slide(tmp_path, "full.tif", [(0, 0, 512, 384)], size=(512, 384)) as s:
        tiles = tile_slide(s, TilingConfig(patch_size=P, mask=mask))
    assert len(tiles) == 8 * 6 and tiles.tissue.min() > 0.95


def test_slide_smaller_than_a_patch_gives_zero_patches(tmp_path):
    with _slide(tmp_path, "tiny.tif", [(0, 0, 48, 48)], size=(48, 48)) as s:
        assert len(tile_slide(s, CFG)) == 0


def test_gray_mask_finds_the_same_rectangles(aligned):
    tiles = tile_slide(aligned, TilingConfig(patch_size=P, mask="gray"))
    assert [tuple(c) for c in tiles.coords.tolist()] == _grid_cells(ALIGNED)


# ------------------------------------------------------------------ mask building blocks

def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.4, 0.03, 2000)])
    thr = otsu_threshold(values)
    assert (values[:5000] > thr).mean() < 0.001 and (values[5000:] > thr).all()   # thr is a bin centre
    assert otsu_threshold(np.full(10, 7.0)) == 7.0


def test_tissue_mask_removes_specks_and_fills_small_holes():
    rgb = np.full((100, 100, 3), 240, np.uint8)
    rgb[20:80, 20:80] = (230, 150, 190)        # tissue block
    rgb[45:48, 45:48] = 240                    # 9-px hole inside it
    rgb[5:9, 90:94] = (230, 150, 190)          # 16-px speck
    raw = tissue_mask(rgb)
    assert raw[21:79, 21:79].sum() < 58 * 58 and raw[5:9, 90:94].any()
    clean = tissue_mask(rgb, min_object_px=30, max_hole_px=20)
    assert clean[20:80, 20:80].all()           # hole filled
    assert not clean[:15, 85:].any()           # speck removed
    assert clean.sum() == 60 * 60


def test_coverage_is_area_weighted_at_fractional_boxes():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True
    f = coverage(mask, np.array([0.0, 1.5, 1.0]), np.zeros(3), np.array([2.0, 2.5, 3.0]), np.full(3, 4.0))
    np.testing.assert_allclose(f, [1.0, 0.5, 0.5], atol=1e-6)


# ------------------------------------------------------------------ config

def test_config_round_trips_through_a_dict():
    cfg = TilingConfig(patch_size=224, mpp=1.0, overlap=32, min_tissue=0.25, mask="gray")
    d = cfg.to_dict()
    assert d["patch_size"] == 224 and d["mask"] == "gray"
    assert TilingConfig.from_dict(d) == cfg
    assert TilingConfig.from_dict({}) == TilingConfig()
    assert TilingConfig().to_dict()["patch_size"] == 512 and TilingConfig().mpp == 0.5


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TilingConfig().patch_size = 10  # type: ignore[misc]


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(TilingError, match="patch_sise"):
        TilingConfig.from_dict({"patch_sise": 256})


@pytest.mark.parametrize("kw", [dict(patch_size=0), dict(patch_size=-5), dict(patch_size=10.5),
                                dict(mpp=0), dict(mpp=float("nan")), dict(overlap=-1),
                                dict(patch_size=64, overlap=64), dict(min_tissue=1.5),
                                dict(min_tissue=-0.1), dict(mask="hue"), dict(thumb_mpp=0)])
def test_invalid_config_is_refused(kw):
    with pytest.raises(TilingError) as ei:
        TilingConfig(**kw)
    assert isinstance(ei.value, FeatstoreError) and isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)


# ---------------------------------------------------------------- the default mask: robust

def test_robust_is_the_default_and_its_edges_are_close_to_exact(tmp_path):
    # the same non-aligned edges as above: 38/64 and 26/64 of a patch column covered, 39/64 and 25/64 of a row
    assert TilingConfig().mask == "robust"
    rects = [(0, 0, 3 * P + 38, 2 * P), (0, 4 * P, 3 * P + 26, 6 * P), (8 * P, 0, 10 * P, 2 * P + 39),
             (12 * P, 0, 14 * P, 2 * P + 25)]
    tiles = tile_slide(_slide(tmp_path, "edges.tif", rects), TilingConfig(patch_size=P))
    frac = dict(zip(map(tuple, tiles.coords.tolist()), tiles.tissue.tolist()))
    # measured: within 0.05 of the covered share, a JPEG-compressed slide's chroma bleeding into the glass included
    for cell, share in (((3 * P, 0), 38 / 64), ((8 * P, 2 * P), 39 / 64)):
        assert frac[cell] == pytest.approx(share, abs=0.08)
    assert (3 * P, 4 * P) not in frac and (12 * P, 2 * P) not in frac          # 41 % and 39 % covered: dropped


@pytest.mark.parametrize("od_scale,dab", [(0.15, 0.0), (0.3, 0.8), (1.0, 0.0), (2.0, 0.8)])
def test_robust_keeps_haematoxylin_and_dab_which_are_not_ink(od_scale, dab):
    # haematoxylin is blue-violet (hue ~245°) and dense DAB is dark: neither may be taken for pen ink or debris;
    # measured Dice 0.91-1.0 (robust) vs 0.51-1.0 (Otsu), lowest for faint haematoxylin with DAB
    rgb, truth = ihc_view(np.random.default_rng(0), od_scale, dab)
    mask = tissue_mask(rgb, "robust", 16, 64)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.9, dice


def test_robust_on_a_fully_covered_view_keeps_everything():
    from featstore.synth import he_image

    full = he_image(np.ones((50, 75), np.float32), (300, 200), np.random.default_rng(0))
    assert tissue_mask(full, "robust", 16, 64).mean() > 0.99
    assert not tissue_mask(np.full((200, 300, 3), 243, np.uint8), "robust", 16, 64).any()    # blank glass
