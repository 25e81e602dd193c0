"""featstore.synth.gland_image / write_gland_dataset: exact instance masks, H&E-like colours."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from featstore.synth import STAIN_STYLES, gland_image, write_gland_dataset
from mil.seg.data import discover_pairs, load_pair


def _images(seed: int, n: int, style: str = "he", size=(128, 128)):
    rng = np.random.default_rng(seed)
    return [gland_image(rng, size, style=style) for _ in range(n)]


def test_ids_are_consecutive_and_glands_do_not_touch():
    for rgb, mask in _images(0, 12, size=(128, 96)):
        assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
        assert mask.shape == (96, 128) and mask.dtype == np.uint16
        n = int(mask.max())
        assert n >= 2
        assert np.unique(mask).tolist() == list(range(n + 1))
        for gid in range(1, n + 1):
            grown = ndimage.binary_dilation(mask == gid)      # one px around the gland
            assert set(np.unique(mask[grown]).tolist()) <= {0, gid}
            _, parts = ndimage.label(mask == gid)
            assert parts == 1                                   # one connected object per id


def test_n_glands_bounds_and_unknown_style():
    for _, mask in _images(1, 6):
        assert 2 <= mask.max() <= 5
    rng = np.random.default_rng(0)
    assert gland_image(rng, n_glands=(1, 1))[1].max() == 1
    with pytest.raises(ValueError, match="he-dark"):
        gland_image(rng, style="nope")


def test_rims_are_darker_than_stroma_and_lumens_paler():
    for style in STAIN_STYLES:
        rim_margin = 12 if style == "he-faded" else 25      # the faded style is low-contrast by design
        for rgb, mask in _images(2, 4, style):
            gray = rgb.astype(np.float64).mean(axis=2)
            gland = mask > 0
            rim = gland & ~ndimage.binary_erosion(gland, iterations=2)
            lumen = ndimage.binary_erosion(gland, iterations=6)
            stroma = ~ndimage.binary_dilation(gland, iterations=2)
            assert gray[rim].mean() < gray[stroma].mean() - rim_margin, style
            if lumen.any():
                assert gray[lumen].mean() > gray[stroma].mean() + 20, style


def test_deterministic_and_fast():
    a, b = _images(5, 3), _images(5, 3)
    for (ra, ma), (rb, mb) in zip(a, b):
        assert np.array_equal(ra, rb) and np.array_equal(ma, mb)
    assert not np.array_equal(_images(6, 1)[0][1], a[0][1])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(20):
        gland_image(rng)
    assert (time.perf_counter() - t0) / 20 < 0.05     # ~5 ms; generous for a loaded CI machine


def test_styles_differ_in_mean_colour():
    he = np.mean([rgb.reshape(-1, 3).mean(0) for rgb, _ in _images(7, 4, "he")], axis=0)
    dark = np.mean([rgb.reshape(-1, 3).mean(0) for rgb, _ in _images(7, 4, "he-dark")], axis=0)
    assert np.abs(he - dark).max() > 15
    assert dark.mean() < he.mean()                     # the second site stains darker


def test_dataset_round_trips_exactly(tmp_path):
    out = write_gland_dataset(tmp_path / "glands", 4, seed=3, size=(96, 64))
    pairs = discover_pairs(out / "images")
    assert [p.name for p in pairs] == [f"gland_{i:04d}" for i in range(4)]
    expected = _images(3, 4, size=(96, 64))
    for pair, (rgb, mask) in zip(pairs, expected):
        image, labels = load_pair(pair, mask_kind="instance")
        assert labels.dtype == np.int64 and np.array_equal(labels, mask.astype(np.int64))
        assert np.array_equal(image, rgb)               # PNG is lossless
    again = write_gland_dataset(tmp_path / "again", 4, seed=3, size=(96, 64))
    assert (again / "masks" / "gland_0002.png").read_bytes() == (out / "masks" / "gland_0002.png").read_bytes()


def test_sixteen_bit_ids_survive(tmp_path):
    from PIL import Image

    from mil.seg.data import SegPair

    mask = np.zeros((8, 8), np.uint16)
    mask[:4, :4], mask[4:, 4:] = 300, 65535
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    _, labels = load_pair(SegPair(tmp_path / "i.png", tmp_path / "m.png", "x"), mask_kind="instance")
    assert np.array_equal(labels, mask.astype(np.int64))
