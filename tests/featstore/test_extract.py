"""The extractor end to end on real generated slides: counts, exact features, crash safety,
concurrency, failures. Slides are tiny pyramidal TIFFs read through OpenSlide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import featstore
from featstore.cohort import SlideRef, discover_slides
from featstore.encoders import create_encoder
from featstore.errors import FeatstoreError
from featstore.extract import ExtractConfig, Extractor
from featstore.read.slide import Slide
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig, tile_slide

TILING = TilingConfig(patch_size=128, mpp=1.0)
ENC = dict(encoder="resnet18", weights="random", input_size=32, precision="fp32", batch_size=8, workers=2)


def _slide(dirpath: Path, name: str, rects, size=(1536, 1024), seed=0) -> Path:
    rgb = rectangles_slide(size, rects, seed=seed)
    path = dirpath / f"{name}.tif"
    write_pyramid_tiff(path, rgb, mpp=0.5)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    _slide(d, "s1", [(0, 0, 1024, 768)], seed=1)
    _slide(d, "s2", [(256, 256, 1280, 1024)], seed=2)
    _slide(d, "s3", [(512, 0, 1536, 512)], seed=3)
    return d


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{**ENC, "levels": (0, 2), "tiling": TILING, **kw})


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    st = featstore.open_store(path)
    out = {}
    for sid in st.slide_ids():
        out[f"{sid}/coords"] = st.coords(sid)
        for k in st.encoders():
            if st.has_features(sid, k.encoder, k.minus, k.weights):
                out[f"{sid}/{k}"] = st.features(sid, k.encoder, k.minus, k.weights)
    return out


def test_end_to_end_matches_tiling_and_a_direct_forward(cohort, tmp_path):
    refs = discover_slides([cohort])
    assert [r.slide_id for r in refs] == ["s1", "s2", "s3"]
    report = Extractor(_cfg()).run(refs, tmp_path / "c.zarr")
    assert report.ok and sorted(report.done) == ["s1", "s2", "s3"]
    st = featstore.open_store(tmp_path / "c.zarr")
    assert {(k.encoder, k.weights, k.minus) for k in st.encoders()} == {("resnet18", "random-s0", 0), ("resnet18", "random-s0", 2)}
    enc = create_encoder("resnet18", "random", levels=(0, 2)).eval()
    for ref in refs:
        with Slide(ref.path) as slide:
            tiles = tile_slide(slide, TILING)
            np.testing.assert_array_equal(st.coords(ref.slide_id), tiles.coords)
            np.testing.assert_array_equal(st.tissue(ref.slide_id), tiles.tissue)
            idx = [0, len(tiles.coords) - 1]
            batch = np.stack([slide.read_patch(tuple(tiles.coords[i]), tiles.size0, 32) for i in idx])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
        with torch.no_grad():
            want = enc(x)
        for lv in (0, 2):
            got = st.features(ref.slide_id, "resnet18", lv)[idx].astype(np.float32)
            np.testing.assert_allclose(got, want[lv].numpy().astype(np.float16).astype(np.float32), rtol=0, atol=2e-3)
    prov = st.provenance("s1", "resnet18", 2)
    assert prov["encoder"] == "resnet18" and prov["minus"] == 2 and prov["dim"] == 128
    assert prov["tiling"] == TILING.to_dict() and prov["preprocessing"]["input_size"] == 32
    assert prov["slide"]["fingerprint"]["size"] == (cohort / "s1.tif").stat().st_size
    assert "featstore_version" in prov and "created" in prov


def test_rerun_skips_and_new_level_reuses_tiling(cohort, tmp_path):
    refs = discover_slides([cohort])
    store = tmp_path / "c.zarr"
    Extractor(_cfg(levels=(0,))).run(refs, store)
    before = zarr.open_group(store, mode="r")["slides/s1/coords"].metadata
    seen = []

    class Recorder:
        def slide_started(self, slide_id, n_tiles):
            seen.append(("start", slide_id))

        def tiles_done(self, n):
            seen.append(("tiles", n))

        def slide_finished(self, slide_id, status):
            seen.append((status, slide_id))

    again = Extractor(_cfg(levels=(0,))).run(refs, store, Recorder())
    assert again.skipped == ["s1", "s2", "s3"] and again.tiles == 0
    assert seen == [("skipped", "s1"), ("skipped", "s2"), ("skipped", "s3")]  # the slides bar completes
    more = Extractor(_cfg(levels=(0, 1))).run(refs, store)
    assert sorted(more.done) == ["s1", "s2", "s3"]
    st = featstore.open_store(store)
    assert st.has_features("s2", "resnet18", 1)
    # the coords array was not rewritten when a level was added
    assert zarr.open_group(store, mode="r")["slides/s1/coords"].metadata == before
    with pytest.raises(FeatstoreError, match="was tiled with"):
        Extractor(_cfg(tiling=TilingConfig(patch_size=64, mpp=1.0))).run(refs, store)


def test_bad_slides_are_logged_and_the_batch_goes_on(cohort, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.svs").write_text("this is not a slide")
    good = _slide(bad, "good", [(0, 0, 768, 768)])
    trunc = bad / "trunc.tif"
    trunc.write_bytes(good.read_bytes()[:5000])
    _slide(bad, "blank", [])
    refs = discover_slides([bad]) + [SlideRef("missing", bad / "missing.svs")]
    report = Extractor(_cfg(levels=(0,))).run(refs, tmp_path / "c.zarr")
    assert report.done == ["good"]
    assert set(report.failed) == {"text", "trunc", "blank", "missing"}
    assert "no tissue" in report.failed["blank"]
    st = featstore.open_store(tmp_path / "c.zarr")
    assert st.slide_ids() == ["good"]
    assert set(st.failures()) == {"text", "trunc", "blank", "missing"}
    assert all("\n" not in r for r in st.failures().values())


def test_features_are_computed_with_the_resize_the_provenance_records(cohort, tmp_path):
    from featstore.read.tilesource import TileSource

    refs = discover_slides([cohort])[:1]
    report = Extractor(_cfg(encoder="efficientnet_b0", levels=(3,), input_size=48)).run(refs, tmp_path / "e.zarr")
    assert report.ok, report.failed
    st = featstore.open_store(tmp_path / "e.zarr")
    pre = st.provenance("s1", "efficientnet_b0", 3)["preprocessing"]
    assert pre["interpolation"] == "bicubic" and pre["input_size"] == 48
    assert pre["resize"] == "Slide.read_patch: best pyramid level, then PIL antialiased resize, bicubic filter"
    enc = create_encoder("efficientnet_b0", "random", levels=(3,)).eval()
    coords = st.coords("s1")[:4]
    x = {}
    for interp in ("bicubic", "bilinear"):
        with TileSource({**pre, "interpolation": interp}) as src:
            src.add("s1", refs[0].path, st.slide_info("s1")["size0"])
            x[interp] = src.read("s1", coords)
    with torch.no_grad():
        bicubic, bilinear = (enc(x[k])[3].numpy() for k in ("bicubic", "bilinear"))
    got = st.features("s1", "efficientnet_b0", 3)[:4].astype(np.float32)
    np.testing.assert_allclose(got, bicubic.astype(np.float16).astype(np.float32), rtol=0, atol=2e-3)
    assert np.abs(got - bilinear).max() > 10 * np.abs(got - bicubic).max()
    resnet = Extractor(_cfg(levels=(0,))).run(refs, tmp_path / "r.zarr")
    assert resnet.ok
    prov = featstore.open_store(tmp_path / "r.zarr").provenance("s1", "resnet18", 0)["preprocessing"]
    # bilinear features keep the exact record of stores written before (mil predict compares it)
    assert prov["resize"] == "Slide.read_patch: best pyramid level, then PIL antialiased resize"


def test_duplicate_slide_ids_are_refused_before_work(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _slide(a, "x", [(0, 0, 256, 256)])
    _slide(b, "x", [(0, 0, 256, 256)])
    with pytest.raises(FeatstoreError, match="slide id 'x' is used by both"):
        discover_slides([a, b])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from featstore.cli import featstore_app; featstore_app()", *args]


CLI_ARGS = ["--encoder", "resnet18", "--minus", "0,1", "--resize", "32", "--precision", "fp32",
            "--batch-size", "4", "--workers", "1", "--patch-size", "128", "--mpp", "1.0"]


def _partial_visible(store: Path) -> bool:
    """True once some features array exists on disk without its completion flag."""
    slides = store / "slides"
    if not slides.exists():
        return False
    for meta in slides.glob("*/features/*/zarr.json"):
        try:
            if not json.loads(meta.read_text())["attributes"].get("complete", False):
                return True
        except (ValueError, KeyError, OSError):
            continue
    return False


def test_sigkill_mid_slide_then_rerun_equals_uninterrupted(cohort, tmp_path):
    ref_store = tmp_path / "ref.zarr"
    subprocess.run(_cli("extract", str(cohort), "--store", str(ref_store), *CLI_ARGS), check=True,
                   capture_output=True, cwd=Path(__file__).parents[2])
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_cli("extract", str(cohort), "--store", str(store), *CLI_ARGS),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    deadline = time.time() + 120
    while not _partial_visible(store) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "extractor finished before it could be killed mid-slide"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _partial_visible(store)
    st = featstore.open_store(store)
    for sid in st.slide_ids():  # whatever the read API shows is complete and correct
        for k in st.encoders():
            if st.has_features(sid, k.encoder, k.minus, k.weights):
                assert len(st.features(sid, k.encoder, k.minus, k.weights)) == st.n_tiles(sid)
    subprocess.run(_cli("extract", str(cohort), "--store", str(store), *CLI_ARGS), check=True,
                   capture_output=True, cwd=Path(__file__).parents[2])
    want, got = _store_arrays(ref_store), _store_arrays(store)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_two_concurrent_extractors_do_each_slide_once(cohort, tmp_path):
    store = tmp_path / "shared.zarr"
    featstore.open_store(store, mode="a").set_tiling(TilingConfig(patch_size=128, mpp=1.0).to_dict())
    procs = [subprocess.Popen(_cli("extract", str(cohort), "--store", str(store), *CLI_ARGS),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=Path(__file__).parents[2]) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    done = [int(o.split("done ")[1].split(",")[0]) for o in outs]
    assert sum(done) == 3, outs
    st = featstore.open_store(store)
    assert st.slide_ids() == ["s1", "s2", "s3"]
    assert all(st.has_features(s, "resnet18", 1) for s in st.slide_ids())
    assert not list((store / ".locks").glob("*.lock"))


def test_a_symlink_and_a_copy_of_one_slide_are_named_not_extracted_silently(tmp_path, caplog):
    import logging
    import shutil

    d = tmp_path / "slides"
    d.mkdir()
    src = _slide(d, "a", [(0, 0, 768, 768)])
    shutil.copy(src, d / "a_copy.tif")
    (d / "a_link.tif").symlink_to(src)
    with caplog.at_level(logging.WARNING, logger="featstore"):
        refs = discover_slides([d])
        assert "slides a, a_link are one file" in caplog.text and caplog.text.count("are one file") == 1
        report = Extractor(_cfg(levels=(0,))).run(refs, tmp_path / "s.zarr")
    assert sorted(report.done) == ["a", "a_copy", "a_link"]
    assert "slide a_copy" in caplog.text and "is a copy of slide a" in caplog.text
