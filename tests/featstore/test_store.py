"""The store's write protocol and read API on real Zarr v3 stores in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest

import featstore
from featstore.errors import StoreError, StoreKeyError
from featstore.h5io import export_h5, import_h5
from featstore.store import FeatureKey, open_store, rows_per_chunk, safe_slide_id

KEY = FeatureKey("resnet18", "random", 1)


def _store_with_slide(tmp_path, n=1000, dim=256):
    st = open_store(tmp_path / "s.zarr", mode="a")
    st.set_tiling({"patch_size": 512, "mpp": 0.5})
    coords = np.stack([np.arange(n) * 7, np.arange(n) * 3], 1).astype(np.int32)
    st.write_tiling("slide_a", coords, np.linspace(0.5, 1, n), {"source": "a.tif", "size0": 512, "slide_mpp": 0.5})
    return st, coords


def test_partial_features_are_invisible_until_finished(tmp_path):
    st, _ = _store_with_slide(tmp_path)
    rows = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float16)
    w = st.begin_features("slide_a", KEY, 256, {"encoder": "resnet18"})
    w.write(rows[:700])
    reader = featstore.open_store(tmp_path / "s.zarr")
    assert reader.encoders() == []
    assert not reader.has_features("slide_a", "resnet18", 1)
    with pytest.raises(StoreKeyError):
        reader.features("slide_a", "resnet18", 1)
    w.write(rows[700:])
    w.finish()
    np.testing.assert_array_equal(reader.features("slide_a", "resnet18", 1), rows)
    assert reader.encoders() == [KEY]
    assert reader.provenance("slide_a", "resnet18", 1) == {"encoder": "resnet18"}


def test_writer_refuses_to_mark_short_array_complete(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=10)
    w = st.begin_features("slide_a", KEY, 8, {})
    w.write(np.zeros((9, 8)))
    with pytest.raises(StoreError, match="9 rows written, expected 10"):
        w.finish()
    assert not st.has_features("slide_a", "resnet18", 1)


def test_feature_chunks_are_about_one_mib(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=5000, dim=1024)
    w = st.begin_features("slide_a", FeatureKey("densenet121", "random", 0), 1024, {})
    assert w.array.chunks == (rows_per_chunk(1024), 1024)
    assert w.array.chunks[0] * 1024 * 2 == 1 << 20


def test_ambiguous_weights_need_a_tag(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=4)
    st.write_features("slide_a", FeatureKey("resnet18", "random", 0), np.ones((4, 3)), {})
    st.write_features("slide_a", FeatureKey("resnet18", "imagenet", 0), np.zeros((4, 3)), {})
    with pytest.raises(StoreError, match="several weights"):
        st.features("slide_a", "resnet18", 0)
    assert st.features("slide_a", "resnet18", 0, weights="imagenet").sum() == 0


def test_tiling_mismatch_and_unknown_slide(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=4)
    with pytest.raises(StoreError, match="was tiled with"):
        st.set_tiling({"patch_size": 256, "mpp": 0.5})
    with pytest.raises(KeyError, match="no slide 'nope'"):
        st.coords("nope")
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(StoreError, match="read-only"):
        open_store(tmp_path / "s.zarr").record_failure("x", "y")


def test_failure_log_and_dask_view(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=6)
    st.write_tiling("slide_b", np.zeros((3, 2)), np.ones(3), {"source": "b.tif"})
    st.write_features("slide_a", KEY, np.full((6, 4), 1.0), {})
    st.write_features("slide_b", KEY, np.full((3, 4), 2.0), {})
    st.record_failure("slide_c", "corrupt tile at (0, 0)", "c.svs")
    assert st.failures() == {"slide_c": "corrupt tile at (0, 0)"}
    arr, offsets = st.as_dask("resnet18", 1)
    assert arr.shape == (9, 4)
    assert offsets == {"slide_a": (0, 6), "slide_b": (6, 9)}
    assert float(arr[6:].sum().compute()) == 2.0 * 12
    st.clear_failure("slide_c")
    assert st.failures() == {}


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    st, _ = _store_with_slide(tmp_path, n=2)
    a = st.lock("slide_a")
    assert a.acquire()
    assert not st.lock("slide_a").acquire()
    a.release()
    # a lock left by a dead process on this host is stale at once
    b = st.lock("slide_a")
    b.path.parent.mkdir(parents=True, exist_ok=True)
    import socket

    b.path.write_text(f"{socket.gethostname()} 999999999 then\n")
    assert b.acquire()
    b.release()


def test_safe_slide_ids():
    assert safe_slide_id("../../etc/passwd") == "etc_passwd"
    assert safe_slide_id("TCGA-AB 12/x:y") == "TCGA-AB_12_x_y"
    with pytest.raises(StoreError):
        safe_slide_id("...")


def test_h5_round_trip_is_exact(tmp_path):
    st, coords = _store_with_slide(tmp_path, n=50)
    rows = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float16)
    st.write_features("slide_a", KEY, rows, {"encoder": "resnet18"})
    paths = export_h5(st, tmp_path / "h5", "resnet18", 1)
    assert [p.name for p in paths] == ["slide_a.h5"]
    other = open_store(tmp_path / "other.zarr", mode="a")
    rep = import_h5(paths, other, "resnet18", 1, weights="random")
    assert rep.imported == ["slide_a"] and not rep.failed
    np.testing.assert_array_equal(other.features("slide_a", "resnet18", 1), rows)
    np.testing.assert_array_equal(other.coords("slide_a"), coords)
    assert other.slide_info("slide_a")["size0"] == 512
    assert other.provenance("slide_a", "resnet18", 1)["original"] == {"encoder": "resnet18"}


def test_h5_import_accepts_clam_3d_features_and_rejects_bad_files(tmp_path):
    import h5py

    good = tmp_path / "clam_slide.h5"
    with h5py.File(good, "w") as f:
        f["features"] = np.ones((1, 5, 8), np.float32)
        c = f.create_dataset("coords", data=np.arange(10).reshape(5, 2))
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 0
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    st = open_store(tmp_path / "s.zarr", mode="a")
    rep = import_h5([good, bad], st, "uni", 0)
    assert rep.imported == ["clam_slide"]
    assert "not a readable HDF5 file" in rep.failed["bad"]
    assert st.features("clam_slide", "uni", 0).shape == (5, 8)
    assert st.slide_info("clam_slide")["size0"] == 256
    assert "bad" in st.failures()
