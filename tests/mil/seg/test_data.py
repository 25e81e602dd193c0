"""mil.seg.data: pairing by stem, exact mask reading, validation, bad pairs logged and skipped."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from mil.seg.data import SegPair, discover_pairs, load_dataset, load_pair, semantic
from mil.seg.errors import SegError


def _rgb(h=16, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(root, name, image, mask, image_ext="png", mask_ext="png"):
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    if image is not None:
        Image.fromarray(image).save(root / "images" / f"{name}.{image_ext}")
    if mask is not None:
        Image.fromarray(mask).save(root / "masks" / f"{name}.{mask_ext}")


def _classes(h=16, w=20):
    m = np.zeros((h, w), np.uint8)
    m[:, 5:10], m[:, 10:] = 1, 2
    return m


@pytest.fixture
def cohort(tmp_path):
    """Two good multiclass pairs and one of each kind of bad pair."""
    _write(tmp_path, "good_a", _rgb(), _classes())
    _write(tmp_path, "good_b", _rgb(seed=1), _classes()[::-1].copy(), mask_ext="tif")
    _write(tmp_path, "size", _rgb(), _classes(12, 20))
    _write(tmp_path, "range", _rgb(), _classes() * 2)                         # value 4 >= 3
    colour = np.stack([_classes(), _classes(), np.zeros((16, 20), np.uint8)], axis=-1)
    _write(tmp_path, "colour", _rgb(), colour)
    _write(tmp_path, "corrupt", _rgb(), None)
    (tmp_path / "masks" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _write(tmp_path, "lonely", _rgb(), None)
    return tmp_path


def test_bad_pairs_are_logged_by_name_and_skipped(cohort, caplog):
    caplog.set_level(logging.WARNING, logger="mil.seg.data")
    pairs = discover_pairs(cohort / "images")
    assert "lonely.png" in caplog.text and "without a mask" in caplog.text
    assert [p.name for p in pairs] == ["colour", "corrupt", "good_a", "good_b", "range", "size"]
    data = load_dataset(pairs, mask_kind="multiclass", n_classes=3)
    assert data.names == ["good_a", "good_b"] and len(data) == 2
    assert set(data.skipped) == {"colour", "corrupt", "range", "size"}
    assert "differ" in data.skipped["colour"]
    assert "unreadable" in data.skipped["corrupt"]
    assert ">= n_classes=3" in data.skipped["range"] and "[4]" in data.skipped["range"]
    assert "20x12" in data.skipped["size"] and "20x16" in data.skipped["size"]
    for name in data.skipped:
        assert f"{name}.png" in data.skipped[name] and "\n" not in data.skipped[name]
        assert f"{name}.png" in caplog.text
    assert np.array_equal(data.masks[0], _classes()) and data.masks[0].dtype == np.int64
    assert np.array_equal(data.masks[1], _classes()[::-1])                  # the TIFF mask
    assert data.images[0].shape == (16, 20, 3) and data.images[0].dtype == np.uint8
    assert data.images[0].flags.writeable                                   # torch.from_numpy-safe


def test_mask_without_image_and_missing_folders(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mil.seg.data")
    _write(tmp_path, "a", _rgb(), _classes())
    _write(tmp_path, "orphan", None, _classes())
    assert [p.name for p in discover_pairs(tmp_path / "images", tmp_path / "masks")] == ["a"]
    assert "orphan.png" in caplog.text and "without an image" in caplog.text
    with pytest.raises(SegError, match="no such masks folder"):
        discover_pairs(tmp_path / "images", tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(SegError, match="no image/mask pair"):
        discover_pairs(tmp_path / "other", tmp_path / "masks")


def test_binary_255_maps_to_01_and_grey_rgb_mask_is_accepted(tmp_path):
    m = np.zeros((16, 20), np.uint8)
    m[3:9, 4:12] = 255
    _write(tmp_path, "b255", _rgb(), m)
    _write(tmp_path, "grey", _rgb(), np.stack([m, m, m], axis=-1))
    for pair in discover_pairs(tmp_path / "images"):
        _, mask = load_pair(pair)
        assert set(np.unique(mask).tolist()) == {0, 1}
        assert np.array_equal(mask, (m > 0).astype(np.int64))


def test_kind_validation(tmp_path):
    _write(tmp_path, "x", _rgb(), _classes())
    pair = SegPair(tmp_path / "images" / "x.png", tmp_path / "masks" / "x.png", "x")
    with pytest.raises(SegError, match=r"x\.png: binary mask has values \[0, 1, 2\]"):
        load_pair(pair, mask_kind="binary")
    with pytest.raises(SegError, match="n_classes"):
        load_pair(pair, mask_kind="multiclass")
    with pytest.raises(SegError, match="mask_kind"):
        load_pair(pair, mask_kind="panoptic")
    _, inst = load_pair(pair, mask_kind="instance")
    assert np.array_equal(semantic(inst, "instance"), (_classes() > 0).astype(np.int64))
    assert semantic(inst, "multiclass") is inst


def test_nothing_loadable_is_one_error(tmp_path):
    _write(tmp_path, "size", _rgb(), _classes(12, 20))
    with pytest.raises(SegError, match="no loadable image/mask pair out of 1 .*size.png"):
        load_dataset(discover_pairs(tmp_path / "images"), mask_kind="instance")
    with pytest.raises(SegError, match="out of 0"):
        load_dataset([])
