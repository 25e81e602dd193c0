"""The demo cohort: deterministic per seed, labelled, lesions in a minority of a positive slide's patches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from featstore.demo import MPP, SLIDE_SIZE, make_demo_cohort
from featstore.read.slide import Slide
from featstore.tiling import tile_slide

N = 4   # each demo slide takes ~1 s to write


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    labels = make_demo_cohort(out, n_slides=N, seed=0)
    assert labels == out / "labels.csv"
    return out


def _rows(out):
    with (out / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _touching(coords: np.ndarray, size0: int, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return (coords[:, 0] < x1) & (coords[:, 0] + size0 > x0) & (coords[:, 1] < y1) & (coords[:, 1] + size0 > y0)


def test_layout_and_labels(cohort):
    rows = _rows(cohort)
    assert list(rows[0]) == ["slide_id", "label", "patient_id"]
    assert [r["slide_id"] for r in rows] == [f"demo_{i:02d}" for i in range(N)]
    assert {r["label"] for r in rows} == {"normal", "tumor"}
    assert sum(r["label"] == "tumor" for r in rows) == N // 2
    assert all(r["patient_id"] for r in rows)
    assert sorted(p.name for p in (cohort / "slides").iterdir()) == [f"demo_{i:02d}.tif" for i in range(N)]
    lesions = json.loads((cohort / "lesions.json").read_text())
    assert set(lesions) == {r["slide_id"] for r in rows}
    for r in rows:
        assert bool(lesions[r["slide_id"]]) == (r["label"] == "tumor")


def test_slides_are_pyramidal_tiffs_with_mpp(cohort):
    with Slide(cohort / "slides" / "demo_00.tif") as s:
        assert s.dimensions == SLIDE_SIZE
        assert s.mpp == pytest.approx(MPP)
        assert s.level_count >= 3
        assert s.vendor == "generic-tiff"


def test_lesions_sit_in_a_minority_of_kept_tissue_patches(cohort):
    rows = _rows(cohort)
    lesions = json.loads((cohort / "lesions.json").read_text())
    for r in rows:
        with Slide(cohort / "slides" / f"{r['slide_id']}.tif") as s:
            tiles = tile_slide(s)                 # the defaults: 512 px at 0.5 µm/px
            assert 10 <= len(tiles) <= 40         # a small bag, about half of the 8x6 grid
            if r["label"] != "tumor":
                continue
            touch = np.zeros(len(tiles), bool)
            for box in lesions[r["slide_id"]]:
                hit = _touching(tiles.coords, tiles.size0, box)
                assert hit.any(), f"{r['slide_id']}: lesion {box} outside the kept tissue"
                touch |= hit
            assert 0 < touch.sum() < 0.5 * len(tiles)
            # the lesion looks different: violet stroma, denser nuclei -> less red than normal tissue
            x0, y0, x1, y1 = lesions[r["slide_id"]][0]
            c = ((x0 + x1) // 2 - 32, (y0 + y1) // 2 - 32)
            lesion_px = s.read_region(c, 0, (64, 64)).reshape(-1, 3).mean(0)
            normal = tiles.coords[~touch][0]
            normal_px = s.read_region(tuple(normal + tiles.size0 // 2 - 32), 0, (64, 64)).reshape(-1, 3).mean(0)
            assert lesion_px[0] < normal_px[0] - 20


def test_same_seed_same_bytes_other_seed_other_pixels(cohort, tmp_path):
    again = tmp_path / "again"
    make_demo_cohort(again, n_slides=N, seed=0)
    for i in range(N):
        name = f"slides/demo_{i:02d}.tif"
        assert (again / name).read_bytes() == (cohort / name).read_bytes()
    assert (again / "labels.csv").read_bytes() == (cohort / "labels.csv").read_bytes()
    assert (again / "lesions.json").read_bytes() == (cohort / "lesions.json").read_bytes()

    other = tmp_path / "other"
    make_demo_cohort(other, n_slides=1, seed=1)
    assert (other / "slides/demo_00.tif").read_bytes() != (cohort / "slides/demo_00.tif").read_bytes()


def test_look_alikes_have_the_lesions_colour_but_normal_nuclei():
    """The mimics (on every demo slide, normal ones too): violet stroma like a lesion, normal
    nuclei, so the colour alone does not give the label away; a lesion is darker (denser nuclei)."""
    from featstore.synth import render_he

    tissue = np.ones((256, 256), np.float32)
    half = np.zeros_like(tissue)
    half[:, 128:] = 1.0
    plain = render_he(tissue, np.random.default_rng(0)).astype(float)
    mimic = render_he(tissue, np.random.default_rng(0), mimic=half).astype(float)
    lesion = render_he(tissue, np.random.default_rng(0), lesion=half).astype(float)
    assert np.array_equal(mimic[:, :128], plain[:, :128])            # only where the map is set
    m, p, les = (x[:, 128:].reshape(-1, 3).mean(0) for x in (mimic, plain, lesion))
    assert m[0] < p[0] - 20                                          # less red: the lesion's violet stroma
    assert abs(m[0] - les[0]) < abs(p[0] - les[0])                   # closer in colour to a lesion than normal is
    assert les.sum() < m.sum() - 40                                  # but a lesion is darker: its nuclei
