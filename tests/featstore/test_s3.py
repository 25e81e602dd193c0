"""Stores on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1,
reached through s3fs; extract -> read API -> `mil train` -> CKA on an s3:// store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

import featstore  # noqa: E402
from featstore.cohort import discover_slides  # noqa: E402
from featstore.errors import StoreError  # noqa: E402
from featstore.extract import ExtractConfig, Extractor  # noqa: E402
from featstore.read.remote import is_remote, parse_storage_options, remote_options, store_location  # noqa: E402
from featstore.store import FeatureKey  # noqa: E402
from featstore.synth import rectangles_slide, write_pyramid_tiff  # noqa: E402
from featstore.tiling import TilingConfig  # noqa: E402

BUCKET = "cohorts"
CFG = ExtractConfig(encoder="resnet18", levels=(0, 1), weights="random", tiling=TilingConfig(patch_size=32, mpp=1.0),
                    input_size=32, precision="fp32", batch_size=16, workers=1)


# one worker builds the module's fixtures once (pyproject: --dist loadgroup), not each worker again
pytestmark = pytest.mark.xdist_group("s3")

@pytest.fixture(scope="module")
def s3():
    """A local S3 server for the module; AWS_* variables point every default client at it."""
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem(skip_instance_cache=True, **opts).makedirs(BUCKET, exist_ok=True)  # moto state is per process
        yield opts
    server.stop()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """6 tiny slides, two tissue patterns (labels tumor / normal), with a train/val/test split."""
    d = tmp_path_factory.mktemp("s3cohort")
    rows = []
    for i in range(6):
        tumor = i % 2 == 1
        rects = [(0, 0, 512, 256), (0, 256, 256, 512)] if tumor else [(128, 128, 512, 512)]
        write_pyramid_tiff(d / f"s{i}.tif", rectangles_slide((512, 512), rects, seed=i), mpp=0.5)
        rows.append({"slide_id": f"s{i}", "label": "tumor" if tumor else "normal",
                     "split": ["train", "train", "train", "train", "test", "test"][i]})
    with (d / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return d


@pytest.fixture(scope="module")
def stores(s3, slides, tmp_path_factory):
    """The same extraction into a local store and into s3://cohorts/c.zarr."""
    refs = [r for r in discover_slides([slides]) if r.path.suffix == ".tif"]
    local = tmp_path_factory.mktemp("local") / "c.zarr"
    ex = Extractor(CFG)
    assert ex.run(refs, local).ok
    url = f"s3://{BUCKET}/c.zarr"
    report = ex.run(refs, featstore.open_store(url, mode="a", storage_options=s3))
    assert report.ok and len(report.done) == 6
    return local, url


def test_s3_store_reads_back_exactly_what_a_local_store_holds(s3, stores):
    local, url = stores
    a, b = featstore.open_store(local), featstore.open_store(url, storage_options=s3)
    assert b.slide_ids() == a.slide_ids() == [f"s{i}" for i in range(6)]
    assert b.encoders() == a.encoders()
    for sid in a.slide_ids():
        np.testing.assert_array_equal(b.coords(sid), a.coords(sid))
        for k in a.encoders():
            np.testing.assert_array_equal(b.features(sid, k.encoder, k.minus), a.features(sid, k.encoder, k.minus))
    x, offsets = b.as_dask("resnet18", 1)
    assert x.shape[0] == sum(b.n_tiles(s) for s in b.slide_ids()) and set(offsets) == set(b.slide_ids())
    np.testing.assert_array_equal(x.compute()[slice(*offsets["s3"])], a.features("s3", "resnet18", 1))
    writer = featstore.open_store(url, mode="a", storage_options=s3)  # locks belong to the writer
    assert b.local_path is None and writer.lock("s0").acquire()  # no lock files on object storage


def test_default_client_finds_the_store_through_aws_variables(stores):
    _, url = stores  # no storage_options: endpoint and keys come from AWS_* (set by the fixture)
    assert featstore.open_store(url, storage_options={"use_listings_cache": False}).n_tiles("s0") > 0
    assert len(featstore.open_store(url).slide_ids()) == 6


def test_mil_train_and_cka_on_the_s3_store(stores, slides, tmp_path):
    from typer.testing import CliRunner

    from analysis.cka import store_linear_cka
    from featstore.cli import mil_app

    local, url = stores
    out = tmp_path / "run"
    res = CliRunner().invoke(mil_app, [
        "train", "--store", url, "--encoder", "resnet18", "--minus", "1", "--labels", str(slides / "labels.csv"),
        "--out", str(out), "--hidden", "16,8", "--attn-dim", "8", "--epochs", "3", "--threads", "1"],
        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["store"] == url and cfg["minus"] == 1
    assert json.loads((out / "metrics.json").read_text())["folds"]["test"]["n"] == 2
    remote = store_linear_cka(featstore.open_store(url), ("resnet18", 0), ("resnet18", 1))
    assert 0.0 < remote <= 1.0 + 1e-9
    assert remote == pytest.approx(store_linear_cka(featstore.open_store(local), ("resnet18", 0), ("resnet18", 1)),
                                   abs=1e-12)


def test_partial_features_stay_invisible_and_other_writers_are_seen(s3, stores):
    _, url = stores
    reader = featstore.open_store(url, storage_options=remote_options(url, s3))
    assert len(reader.slide_ids()) == 6  # the listing is now in hand
    assert reader.consolidated  # from the snapshot the extraction wrote: stale from here on
    writer = featstore.open_store(url, mode="a", storage_options={**s3, "skip_instance_cache": True})
    writer.write_tiling("late", np.zeros((3, 2), np.int32), np.ones(3, np.float32), {"source": "x"})
    w = writer.begin_features("late", FeatureKey("resnet18", "random-s0", 0), 4, {})
    w.write(np.ones((2, 4), np.float16))
    w._flush(final=True)  # rows on S3 but the array not finished: a writer that died here
    assert "late" in reader.slide_ids()  # fresh listings: another process's slide shows up
    assert not reader.has_features("late", "resnet18", 0, "random-s0")
    with pytest.raises(StoreError, match="no complete features"):
        reader.features("late", "resnet18", 0, "random-s0")
    w = writer.begin_features("late", FeatureKey("resnet18", "random-s0", 0), 4, {})  # a rerun redoes it
    w.write(np.full((3, 4), 2, np.float16))
    w.finish()
    np.testing.assert_array_equal(reader.features("late", "resnet18", 0, "random-s0"), np.full((3, 4), 2))


def test_store_locations_and_storage_options():
    assert is_remote("s3://b/c.zarr") and not is_remote("file:///tmp/c.zarr") and not is_remote("rel/c.zarr")
    assert store_location("s3://b/c.zarr") == "s3://b/c.zarr"
    assert store_location("rel/c.zarr").startswith("/") and store_location("file:///tmp/x.zarr") == "/tmp/x.zarr"
    assert remote_options("/tmp/c.zarr", {"anon": True}) is None
    assert remote_options("s3://b/c", {"anon": True}) == {"use_listings_cache": False, "anon": True}
    assert parse_storage_options('{"endpoint_url": "http://h:9000"}') == {"endpoint_url": "http://h:9000"}
    assert parse_storage_options("  ") is None
    for bad, msg in (("{nope", "not valid JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(StoreError, match=msg):
            parse_storage_options(bad)


def test_a_fresh_s3_writer_creates_slides_and_failures_up_front(s3):
    """Tasks only open these groups: two creating them at once on S3 is zarr's ContainsGroupError."""
    import zarr

    from featstore.store import open_store_writer

    url = f"s3://{BUCKET}/fresh.zarr"
    open_store_writer(url, storage_options=s3)
    root = zarr.open_group(url, mode="r", zarr_format=3, storage_options={**s3, "use_listings_cache": False})
    assert sorted(name for name, _ in root.groups()) == ["failures", "slides"]
    again = open_store_writer(url, storage_options=s3)  # a second writer (a task) only opens them
    assert again.slide_ids() == [] and again.failures() == {}
