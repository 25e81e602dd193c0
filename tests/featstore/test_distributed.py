"""Extraction on a real dask.distributed LocalCluster (2 worker processes, shared by the module):
same store as the single-process run, resume, the --cluster command, a worker killed mid-slide."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import featstore
from featstore.cohort import discover_slides
from featstore.distributed import ClusterError, ClusterSpec, connect, extract_distributed, task_key
from featstore.extract import ExtractConfig, Extractor
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

pytest.importorskip("distributed")

try:  # the local S3 server fixture (moto's server mode), shared with test_s3.py
    from tests.featstore.test_s3 import BUCKET, s3  # noqa: F401
except pytest.skip.Exception:
    s3 = None

TILING = TilingConfig(patch_size=32, mpp=1.0)  # 64 level-0 px per patch on these 0.5 um/px slides
CFG = ExtractConfig(encoder="resnet18", levels=(0, 2), weights="random", tiling=TILING, input_size=32,
                    precision="fp32", batch_size=16, workers=1)
RECTS = {"a": [(0, 0, 1024, 768)], "b": [(256, 256, 1280, 1024)], "c": [(512, 0, 1536, 512)],
         "d": [(0, 512, 1536, 1024)]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    for i, (name, rects) in enumerate(RECTS.items()):
        write_pyramid_tiff(d / f"{name}.tif", rectangles_slide((1536, 1024), rects, seed=i), mpp=0.5)
    return d


@pytest.fixture(scope="module")
def client():
    with connect(ClusterSpec(n_workers=2, threads_per_worker=1)) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> dict[str, np.ndarray]:
    """The single-process run's store, as arrays."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    report = Extractor(CFG).run(discover_slides([cohort]), path)
    assert report.ok and sorted(report.done) == sorted(RECTS)
    return _arrays(path)


def _arrays(path) -> dict[str, np.ndarray]:
    st = featstore.open_store(path)
    out = {}
    for sid in st.slide_ids():
        out[f"{sid}/coords"] = st.coords(sid)
        out[f"{sid}/tissue"] = st.tissue(sid)
        for k in st.encoders():
            out[f"{sid}/{k}"] = st.features(sid, k.encoder, k.minus, k.weights)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cluster_spec_parsing():
    assert ClusterSpec.parse("local:3") == ClusterSpec(None, 3, 1)
    assert ClusterSpec.parse("local:2:4") == ClusterSpec(None, 2, 4)
    assert ClusterSpec.parse("10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert ClusterSpec.parse("tls://sched:8786").address == "tls://sched:8786"
    for bad in ("local:0", "local:x", "local:1:2:3", " "):
        with pytest.raises(ClusterError, match="--cluster"):
            ClusterSpec.parse(bad)


def test_two_workers_write_the_single_process_store(cohort, client, reference, tmp_path):
    report = extract_distributed(discover_slides([cohort]), tmp_path / "d.zarr", CFG, client)
    assert report.ok and sorted(report.done) == sorted(RECTS)
    assert report.tiles == sum(len(v) for k, v in reference.items() if k.endswith("/coords"))
    _assert_same(_arrays(tmp_path / "d.zarr"), reference)
    # the features carry the same provenance as the single-process path
    prov = featstore.open_store(tmp_path / "d.zarr").provenance("a", "resnet18", 2)
    assert prov["precision"] == "fp32" and prov["preprocessing"]["input_size"] == 32
    # resume: everything is complete, every task skips
    again = extract_distributed(discover_slides([cohort]), tmp_path / "d.zarr", CFG, client)
    assert again.ok and sorted(again.skipped) == sorted(RECTS) and again.tiles == 0 and not again.done


def test_store_with_other_tiling_is_refused_before_any_task(cohort, client, tmp_path):
    Extractor(CFG).run(discover_slides([cohort / "a.tif"]), tmp_path / "t.zarr")
    other = ExtractConfig(**{**CFG.__dict__, "tiling": TilingConfig(patch_size=64, mpp=1.0)})
    with pytest.raises(featstore.FeatstoreError, match="was tiled with"):
        extract_distributed(discover_slides([cohort]), tmp_path / "t.zarr", other, client)


def test_cluster_command_against_a_running_scheduler(cohort, client, reference, tmp_path):
    from typer.testing import CliRunner

    from featstore.cli import featstore_app

    store = tmp_path / "cli.zarr"
    res = CliRunner().invoke(featstore_app, [
        "extract", str(cohort / "a.tif"), str(cohort / "c.tif"), "--store", str(store), "--encoder", "resnet18",
        "--minus", "0,2", "--patch-size", "32", "--mpp", "1.0", "--resize", "32", "--precision", "fp32",
        "--workers", "1", "--cluster", client.scheduler.address])
    assert res.exit_code == 0, res.output
    assert "done 2," in res.output
    got = _arrays(store)
    _assert_same(got, {k: v for k, v in reference.items() if k.split("/")[0] in ("a", "c")})


@pytest.mark.skipif(s3 is None, reason="needs s3fs and moto[server]")
def test_two_workers_write_an_s3_store(cohort, client, reference, s3):
    url = f"s3://{BUCKET}/distributed.zarr"
    refs = discover_slides([cohort / "b.tif", cohort / "d.tif"])
    # the workers get endpoint and keys as storage_options (their environment predates the server)
    report = extract_distributed(refs, url, CFG, client, storage_options=s3)
    assert report.ok and sorted(report.done) == ["b", "d"]
    st = featstore.open_store(url, storage_options=s3)
    assert st.slide_ids() == ["b", "d"]
    got = {}
    for sid in st.slide_ids():
        got[f"{sid}/coords"], got[f"{sid}/tissue"] = st.coords(sid), st.tissue(sid)
        for k in st.encoders():
            got[f"{sid}/{k}"] = st.features(sid, k.encoder, k.minus, k.weights)
    _assert_same(got, {k: v for k, v in reference.items() if k.split("/")[0] in ("b", "d")})


def test_a_task_error_that_is_not_the_slides_stops_the_run_in_one_line(cohort, client, tmp_path):
    bad = ExtractConfig(**{**CFG.__dict__, "encoder": "no_such_encoder"})
    with pytest.raises(ClusterError, match=r"task failed on the cluster \(.*no_such_encoder") as info:
        extract_distributed(discover_slides([cohort]), tmp_path / "e.zarr", bad, client)
    assert "\n" not in str(info.value)
    assert featstore.open_store(tmp_path / "e.zarr").slide_ids() == []


def test_unreachable_scheduler_is_one_clear_error():
    with pytest.raises(ClusterError, match="cannot reach the dask scheduler"):
        with connect("tcp://127.0.0.1:9", timeout=2):
            pass


def _partial_slide(store: Path) -> str | None:
    """A slide with a features array that exists but is not complete (a write in progress)."""
    for meta in store.glob("slides/*/features/*/zarr.json"):
        attrs = json.loads(meta.read_text()).get("attributes", {})
        if attrs.get("complete") is False:
            return meta.parents[2].name
    return None


def test_worker_killed_mid_slide_run_completes(cohort, client, reference, tmp_path):
    store = tmp_path / "k.zarr"
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(report=extract_distributed(discover_slides([cohort]), store, CFG, client)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        sid = _partial_slide(store)
        if sid is not None:
            for addr, keys in client.processing().items():
                if any(str(k).startswith(task_key(sid)) for k in keys):
                    pid = client.run(os.getpid, workers=[addr])[addr]
                    os.kill(pid, signal.SIGKILL)
                    killed = sid
                    break
        time.sleep(0.01)
    runner.join(timeout=120)
    assert killed is not None, "no slide was caught mid-write; the test did not kill a worker"
    report = result["report"]
    assert report.ok and sorted(report.done) == sorted(RECTS), report
    st = featstore.open_store(store)
    assert st.slide_ids() == sorted(RECTS) and not st.failures()
    assert {str(k) for k in st.encoders()} == {"resnet18:random-s0:minus0", "resnet18:random-s0:minus2"}
    _assert_same(_arrays(store), reference)  # the redone slide is exactly the single-process one
    assert not list((store / ".locks").glob("*.lock"))  # the dead worker's claim was taken over and released
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def test_image_shards_run_one_task_each_and_equal_the_single_process_store(client, tmp_path):
    """`--images` with `--cluster`: each shard is one task; the store equals one process's, and
    `featstore.image_table` lines rows up with the same files and labels."""
    from featstore.read.images import discover_images
    from tests.featstore.read.test_images import ENC, _folder

    root = _folder(tmp_path / "cohort")
    cfg = ExtractConfig(**ENC)
    one = Extractor(cfg).run(discover_images(root, shard_size=3), tmp_path / "one.zarr")
    refs = discover_images(root, shard_size=3)
    report = extract_distributed(refs, tmp_path / "dist.zarr", cfg, client)
    assert report.ok and sorted(report.done) == sorted(one.done) and len(report.done) == len(refs) >= 3
    _assert_same(_arrays(tmp_path / "dist.zarr"), _arrays(tmp_path / "one.zarr"))
    assert featstore.open_store(tmp_path / "dist.zarr").tiling == featstore.open_store(tmp_path / "one.zarr").tiling
    a, b = (featstore.image_table(featstore.open_store(tmp_path / n)) for n in ("one.zarr", "dist.zarr"))
    assert len(a) == 8 and a.classes == b.classes
    for field in ("slide_ids", "paths", "y"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
