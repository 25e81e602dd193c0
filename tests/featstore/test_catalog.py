"""The consolidated listing (featstore/store/catalog.py): fast, and never wrong when stale."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import featstore
from featstore.cli import featstore_app
from featstore.store import FeatureKey
from featstore.store.catalog import CHANGES, Markers

KEY = FeatureKey("resnet18", "random-s0", 0)
KEY1 = FeatureKey("resnet18", "random-s0", 1)


def _write_slide(st, sid: str, n: int = 5, keys=(KEY,), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    st.write_tiling(sid, np.stack([np.arange(n) * 32, np.zeros(n)], 1), np.ones(n), {"source": f"{sid}.tif"})
    for k in keys:
        st.write_features(sid, k, rng.standard_normal((n, 4)), {"dim": 4})


@pytest.fixture
def store(tmp_path):
    st = featstore.open_store(tmp_path / "s.zarr", mode="a")
    st.set_tiling({"patch_size": 32, "mpp": 1.0})
    for i in range(4):
        _write_slide(st, f"s{i}", n=3 + i, keys=(KEY, KEY1) if i % 2 else (KEY,), seed=i)
    return st


def test_consolidated_listing_equals_the_walk_and_zarr_reads_it(store):
    before = (store.slide_ids(), store.encoders(), store.coverage())
    assert not featstore.open_store(store.path).consolidated
    n, cleared = store.consolidate()
    assert n == 4 and cleared == 4 * 1 + 6  # one tiling + one marker per features array, all folded in
    st = featstore.open_store(store.path)
    assert st.consolidated
    assert (st.slide_ids(), st.encoders(), st.coverage()) == before
    assert st.coverage()["s3"] == (6, [KEY, KEY1])
    assert not list(Markers(zarr.open_group(store.path).store).list())
    # zarr itself sees the same hierarchy through the consolidated slides group
    slides = zarr.open_group(store.path, mode="r")["slides"]
    assert slides.metadata.consolidated_metadata is not None
    assert sorted(name for name, _ in slides.groups()) == ["s0", "s1", "s2", "s3"]


def test_listing_comes_from_the_snapshot(store):
    """After consolidation a slide is listed from the one snapshot: its own group file is not read."""
    store.consolidate()
    (store.local_path / "slides" / "s2" / "zarr.json").unlink()
    st = featstore.open_store(store.path)
    assert "s2" in st.slide_ids() and KEY in st.coverage()["s2"][1]


def test_a_stale_snapshot_never_hides_a_finished_slide(store):
    store.consolidate()
    reader = featstore.open_store(store.path)
    assert reader.slide_ids() == ["s0", "s1", "s2", "s3"]
    _write_slide(store, "s9", keys=(KEY, KEY1))
    for st in (reader, featstore.open_store(store.path)):  # a reader opened before, and one opened after
        assert "s9" in st.slide_ids() and st.coverage()["s9"] == (5, [KEY, KEY1])
        assert st.features("s9", "resnet18", 1).shape == (5, 4)


def test_a_stale_snapshot_never_shows_a_half_written_slide(store):
    """The snapshot says s1's level-0 features and s2's tiling are complete; both are being redone."""
    store.consolidate()
    w = store.begin_features("s1", KEY, 4, {"dim": 4})  # re-extraction: the complete array is replaced
    w.write(np.zeros((2, 4)))                              # ... and the writer dies here
    token = Markers(store._root.store).open("s2")           # a re-tiling begins (marker first) ...
    del zarr.open_group(store.path)["slides/s2"].attrs["tiling_complete"]  # ... and has cleared the flag
    st = featstore.open_store(store.path)
    assert st.coverage()["s1"][1] == [KEY1] and not st.has_features("s1", "resnet18", 0)
    assert "s2" not in st.slide_ids()
    # a consolidation now keeps the open markers (their changes are unfinished) and lists the truth
    store.consolidate()
    names = [m.key for m in Markers(store._root.store).list()]
    assert len(names) == 2 and all(n.endswith(".open") for n in names) and f"s2~{token}.open" in names[1] + names[0]
    st = featstore.open_store(store.path)
    assert "s2" not in st.slide_ids() and st.coverage()["s1"][1] == [KEY1]
    w2 = store.begin_features("s1", KEY, 4, {"dim": 4})   # the rerun finishes
    w2.write(np.ones((4, 4)))
    w2.finish()
    assert st.coverage()["s1"][1] == [KEY, KEY1] and (st.features("s1", "resnet18", 0) == 1).all()


def test_listing_stays_right_while_writers_and_consolidations_run(tmp_path):
    """A writer thread adds slides while another consolidates over and over; a reader only ever sees
    complete slides, never loses one it saw, and ends with all of them without a final consolidation."""
    path = tmp_path / "c.zarr"
    st = featstore.open_store(path, mode="a")
    n_slides, errors, seen_sets = 30, [], []
    stop = threading.Event()

    def write():
        for i in range(n_slides):
            _write_slide(st, f"x{i:02d}", n=2 + i % 3, keys=(KEY, KEY1), seed=i)

    def consolidate():
        w = featstore.open_store(path, mode="a")
        while not stop.is_set():
            w.consolidate()

    def read():
        r = featstore.open_store(path)
        while not stop.is_set():
            try:
                cov = r.coverage()
                for sid, (n, keys) in cov.items():
                    for k in keys:  # listed as complete: must read back whole
                        assert r.features(sid, k.encoder, k.minus, k.weights).shape == (n, 4)
                seen_sets.append(set(cov))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=f) for f in (consolidate, read)]
    for t in threads:
        t.start()
    write()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen_sets) > 3
    assert all(a <= b for a, b in zip(seen_sets, seen_sets[1:])), "a listed slide disappeared"
    final = featstore.open_store(path)
    assert final.slide_ids() == [f"x{i:02d}" for i in range(n_slides)]
    assert all(keys == [KEY, KEY1] for _, keys in final.coverage().values())


def test_cli_consolidate_and_ls_of_a_big_listing(store, tmp_path):
    for i in range(60):
        _write_slide(store, f"z{i:03d}", n=2)
    res = CliRunner().invoke(featstore_app, ["consolidate", store.path], terminal_width=200)
    assert res.exit_code == 0 and "consolidated 64 slides" in res.stdout, res.output
    res = CliRunner().invoke(featstore_app, ["ls", store.path], terminal_width=200, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "64 slides, 2 feature sets" in res.stdout and "14 more (--all)" in res.stdout
    assert "64/64" in res.stdout and "2/64" in res.stdout and "z059" not in res.stdout
    res = CliRunner().invoke(featstore_app, ["ls", store.path, "--all"], terminal_width=200, env={"COLUMNS": "200"})
    assert "z059" in res.stdout and "more (--all)" not in res.stdout
    assert not (store.local_path / CHANGES).exists() or not any((store.local_path / CHANGES).iterdir())


def test_writers_never_parse_nor_clobber_the_listing(store):
    """zarr reads every ancestor's zarr.json when it creates a node; a writer sees slides/zarr.json
    as the plain group document (a slide write costs the same at 30k slides), and the listing
    in the file stays as consolidated after further writes."""
    import json

    from featstore.store.catalog import BLOB, PLAIN_GROUP, _sync

    store.consolidate()
    from zarr.core.buffer import default_buffer_prototype

    seen = _sync(store._root.store.get(BLOB, prototype=default_buffer_prototype())).to_bytes()
    assert seen == PLAIN_GROUP
    _write_slide(store, "s7", keys=(KEY, KEY1))
    doc = json.loads((store.local_path / BLOB).read_text())
    assert set(doc["consolidated_metadata"]["metadata"]) >= {"s0", "s3/features/" + KEY1.path}
    assert "s7" not in doc["consolidated_metadata"]["metadata"]  # not yet consolidated ...
    assert featstore.open_store(store.path).coverage()["s7"] == (5, [KEY, KEY1])  # ... but listed


def test_cli_consolidate_of_a_missing_store_is_one_line_and_creates_nothing(tmp_path):
    res = CliRunner().invoke(featstore_app, ["consolidate", str(tmp_path / "typo.zarr")])
    assert res.exit_code == 1 and "no such store" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "typo.zarr").exists()
