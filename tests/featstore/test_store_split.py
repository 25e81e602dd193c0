"""The store's two sides: open_store(path) is the read API only; the writer is open_store(path, "a")."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import featstore
from featstore.errors import StoreError, StoreKeyError
from featstore.store import (FeatureKey, Store, StoreReader, StoreReadOnlyError, StoreWriter, open_store,
                             open_store_writer)

WRITER_METHODS = ("set_tiling", "write_tiling", "begin_features", "write_features", "delete_features",
                  "record_failure", "clear_failure", "lock")


def _written(tmp_path, weights=("random-s0",)):
    path = tmp_path / "s.zarr"
    w = open_store_writer(path)
    w.set_tiling({"patch_size": 64, "mpp": 1.0})
    w.write_tiling("a", np.zeros((3, 2)), np.ones(3), {"source": "a.tif"})
    for i, tag in enumerate(weights):
        w.write_features("a", FeatureKey("resnet18", tag, 1), np.full((3, 4), i), {"tag": tag})
    return path


def test_reader_has_no_writer_methods(tmp_path):
    r = open_store(_written(tmp_path))
    assert isinstance(r, StoreReader) and not isinstance(r, StoreWriter) and r.mode == "r"
    for name in WRITER_METHODS:
        assert not hasattr(r, name), name
        assert name not in dir(r)
    with pytest.raises(StoreReadOnlyError, match="read-only; open_store\\(path, mode='a'\\)"):
        r.begin_features("a", FeatureKey("resnet18", "x", 1), 4, {})
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        r.no_such_thing  # noqa: B018 -- other missing names stay plain AttributeErrors
    assert not isinstance(StoreReadOnlyError("x"), StoreKeyError)


def test_mode_a_and_open_store_writer_give_the_writer(tmp_path):
    path = _written(tmp_path)
    for w in (open_store(path, mode="a"), open_store_writer(path), featstore.open_store(path, mode="a")):
        assert isinstance(w, StoreWriter) and isinstance(w, Store) and w.mode == "a"
        assert all(callable(getattr(w, name)) for name in WRITER_METHODS)
    assert isinstance(open_store(path), Store)  # Store names the read API: both sides are stores
    with pytest.raises(StoreError, match="mode must be 'r' or 'a'"):
        open_store(path, mode="w")


def test_writer_creates_the_shared_groups_before_any_slide(tmp_path):
    path = tmp_path / "fresh.zarr"
    open_store_writer(path)  # what extract_distributed does before submitting tasks
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    assert sorted(name for name, _ in root.groups()) == ["failures", "slides"]
    assert open_store(path).slide_ids() == [] and open_store(path).failures() == {}


def test_random_finds_its_one_seeded_tag(tmp_path):
    r = open_store(_written(tmp_path))
    assert r.resolve_key("resnet18", 1, "random") == FeatureKey("resnet18", "random-s0", 1)
    assert r.has_features("a", "resnet18", 1, "random")
    assert r.provenance("a", "resnet18", 1, "random") == {"tag": "random-s0"}
    assert not r.has_features("a", "resnet18", 1, "random-s1")  # another seed is other weights
    assert not r.has_features("a", "resnet18", 1, "rand")       # no prefix matching


def test_random_with_two_seeds_is_not_guessed(tmp_path):
    r = open_store(_written(tmp_path, weights=("random-s0", "random-s1", "file-enc-1a2b3c4d")))
    assert r.resolve_key("resnet18", 1, "random") == FeatureKey("resnet18", "random", 1)
    with pytest.raises(StoreKeyError, match="no complete features"):
        r.features("a", "resnet18", 1, "random")
    assert r.features("a", "resnet18", 1, "random-s1").max() == 1
    assert not r.has_features("a", "resnet18", 1, "file")  # a file tag is matched whole
    assert r.has_features("a", "resnet18", 1, "file-enc-1a2b3c4d")


def test_reader_sees_what_a_writer_adds_after_refresh(tmp_path):
    path = _written(tmp_path)
    r = open_store(path)
    assert r.encoders() == [FeatureKey("resnet18", "random-s0", 1)]
    open_store_writer(path).write_features("a", FeatureKey("resnet18", "imagenet", 1), np.ones((3, 4)), {})
    r.refresh()
    assert r.resolve_key("resnet18", 1, "imagenet") == FeatureKey("resnet18", "imagenet", 1)
    with pytest.raises(StoreError, match="several weights"):
        r.resolve_key("resnet18", 1)
