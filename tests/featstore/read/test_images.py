"""Image-folder cohorts end to end: real image files (PIL), the real Extractor and TileSource,
the store's image shards, image_table, failures, resume and the `featstore extract --images` CLI."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

import featstore
from featstore.cli import featstore_app
from featstore.encoders import create_encoder
from featstore.errors import FeatstoreError, SlideChangedError
from featstore.extract import ExtractConfig, Extractor
from featstore.read.images import (ImageRow, ImageShard, discover_images, fit_image, image_table, is_image_store,
                              load_rgb, to_rgb)
from featstore.read.slide import resize_filter
from featstore.read.tilesource import TileSource

ENC = dict(encoder="resnet18", weights="random", input_size=64, precision="fp32", batch_size=4, workers=1,
           levels=(0, 1))
CLI = ["--encoder", "resnet18", "--resize", "64", "--precision", "fp32", "--batch-size", "4", "--workers", "1",
       "--minus", "0,1"]


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root: Path) -> Path:
    """tumor/: PNG, same PNG copied, JPEG, 16-bit TIFF; normal/: RGBA, grayscale, odd-size TIFF, BMP."""
    (root / "tumor" / "deep").mkdir(parents=True)
    (root / "normal").mkdir()
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    Image.fromarray(_rgb(1, 48, 80)).save(root / "tumor" / "a.png")
    shutil.copy(root / "tumor" / "a.png", root / "tumor" / "deep" / "a_copy.png")
    Image.fromarray(_rgb(2, 70, 70)).save(root / "tumor" / "b.JPG", quality=95)
    tifffile.imwrite(root / "tumor" / "c16.tif", (np.arange(60 * 50).reshape(60, 50) * 21).astype(np.uint16))
    rgba = np.concatenate([_rgb(3, 41, 37), np.full((41, 37, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "normal" / "d_rgba.png")
    Image.fromarray(_rgb(4, 33, 65)[..., 0], "L").save(root / "normal" / "e_gray.png")
    tifffile.imwrite(root / "normal" / "f.tiff", _rgb(5, 65, 31), photometric="rgb")
    Image.fromarray(_rgb(6, 64, 64)).save(root / "normal" / "g.bmp")
    (root / "normal" / "notes.txt").write_text("not an image")
    Image.fromarray(_rgb(7, 20, 20)).save(root / "normal" / ".hidden.png")
    Image.fromarray(_rgb(8, 20, 20)).save(root / ".hidden" / "x.png")
    return root


TUMOR = ["tumor/a.png", "tumor/b.JPG", "tumor/c16.tif", "tumor/deep/a_copy.png"]
NORMAL = ["normal/d_rgba.png", "normal/e_gray.png", "normal/f.tiff", "normal/g.bmp"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """One folder extracted with shards of 3 images; the encoder kept for direct forwards."""
    root = _folder(tmp_path_factory.mktemp("imgs") / "cohort")
    store = root.parent / "img.zarr"
    ex = Extractor(ExtractConfig(**ENC))
    report = ex.run(discover_images(root, shard_size=3), store)
    return root, store, report, ex


# ---------------------------------------------------------------------------- discovery
def test_folder_discovery_sorts_shards_and_ignores_hidden_and_other_files(tmp_path, caplog):
    root = _folder(tmp_path / "c")
    with caplog.at_level(logging.WARNING):
        refs = discover_images(root, shard_size=3)
    assert [r.slide_id for r in refs] == ["images-all-00000", "images-all-00001", "images-all-00002"]
    rows = [row for r in refs for row in r.images]
    assert [r.path for r in rows] == NORMAL + TUMOR   # label, then path
    assert [r.label for r in rows] == ["normal"] * 4 + ["tumor"] * 4
    assert all(r.path == root.resolve() for r in refs)
    assert "empty" in caplog.text and "holds no image" in caplog.text
    assert [len(r.images) for r in discover_images(root, shard_size=1024)] == [8]
    (tmp_path / "none" / "cls").mkdir(parents=True)
    with pytest.raises(FeatstoreError, match="no class folder holds images"):
        discover_images(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        discover_images(tmp_path / "missing")


def test_csv_errors_name_file_and_line(tmp_path):
    Image.fromarray(_rgb(1, 8, 8)).save(tmp_path / "x.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(FeatstoreError, match=r"bad.csv: an image list CSV needs columns path,label"):
        discover_images(bad)
    bad.write_text("path,label\nx.png,a\nx.png,\n")
    with pytest.raises(FeatstoreError, match=r"bad.csv:3: empty label"):
        discover_images(bad)
    bad.write_text("path,label\nnope.png,a\n")
    with pytest.raises(FeatstoreError, match="none of its 1 image files exists"):
        discover_images(bad)


# ---------------------------------------------------------------------------- decoding
def test_modes_become_8bit_rgb(tmp_path):
    g16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    got = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert got.shape == (20, 30, 3)
    np.testing.assert_array_equal(got[..., 0], ((g16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255                      # top half opaque red, bottom transparent
    got = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (got[:2] == [200, 0, 0]).all() and (got[2:] == 255).all()
    pal = Image.fromarray(_rgb(1, 6, 6)).convert("P")
    assert np.asarray(to_rgb(pal)).shape == (6, 6, 3)
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)


def test_read_patch_resizes_shorter_side_and_centre_crops_like_pil(tmp_path):
    rgb = _rgb(9, 37, 91)                       # odd, non-square: landscape
    Image.fromarray(rgb).save(tmp_path / "w.png")
    shard = ImageShard(tmp_path, [ImageRow("w.png", "a")])
    for resize_size, interpolation in ((None, "bilinear"), (40, "bicubic")):
        got = shard.read_patch((0, 0), 0, 32, interpolation, resize_size)
        short = resize_size or 32
        new_w = int(short * 91 / 37)            # torchvision Resize(int): long side truncated
        ref = Image.fromarray(rgb).resize((new_w, short), resize_filter(interpolation))
        left, top = int(round((new_w - 32) / 2)), int(round((short - 32) / 2))
        np.testing.assert_array_equal(got, np.asarray(ref.crop((left, top, left + 32, top + 32))))
    sq = Image.fromarray(_rgb(10, 50, 50))
    np.testing.assert_array_equal(fit_image(sq, 32), np.asarray(sq.resize((32, 32), Image.BILINEAR)))


# ---------------------------------------------------------------------------- extraction
def test_extract_writes_one_row_per_image_aligned_with_image_table(extracted):
    root, store, report, _ = extracted
    assert report.ok and report.done == ["images-all-00000", "images-all-00001", "images-all-00002"]
    st = featstore.open_store(store)
    assert is_image_store(st) and st.tiling == {"kind": "images", "shard_size": 3}
    info = st.slide_info("images-all-00000")
    assert info["kind"] == "images" and info["root"] == str(root.resolve())
    assert [d["path"] for d in info["images"]] == NORMAL[:3]
    np.testing.assert_array_equal(st.coords("images-all-00000"), [[0, 0], [1, 0], [2, 0]])
    np.testing.assert_array_equal(st.tissue("images-all-00000"), [1, 1, 1])
    t = featstore.image_table(st)
    assert t.paths.tolist() == NORMAL + TUMOR and t.classes == ["normal", "tumor"]
    assert t.y.tolist() == [0] * 4 + [1] * 4 and t.rows.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert set(t.splits.tolist()) == {""} and set(t.groups.tolist()) == {""}
    X = t.features(st, "resnet18", 1)
    assert X.shape == (8, 256) and X.dtype == np.float32
    a, copy = t.paths.tolist().index("tumor/a.png"), t.paths.tolist().index("tumor/deep/a_copy.png")
    assert t.slide_ids[a] != t.slide_ids[copy]           # different shards, same pixels
    np.testing.assert_array_equal(X[a], X[copy])
    assert not np.allclose(X[a], X[t.paths.tolist().index("tumor/b.JPG")])
    prov = st.provenance("images-all-00001", "resnet18", 0)
    assert prov["tiling"] == {"kind": "images", "shard_size": 3, "root": str(root.resolve())}
    assert prov["images"]["root"] == str(root.resolve()) and prov["reader"] == "images"
    assert prov["preprocessing"]["input_size"] == 64 and "slide" not in prov
    assert {"weights_sha256", "precision", "featstore_version", "minus"} <= set(prov)


def test_tilesource_from_store_reads_the_pixels_the_extractor_saw(extracted):
    _, store, _, ex = extracted
    st = featstore.open_store(store)
    enc = create_encoder("resnet18", "random", levels=(0, 1)).eval()
    ids = st.slide_ids()
    with TileSource.from_store(st, ids, {**enc.preprocessing(), "input_size": 64}) as src:
        for sid in ids:
            idx = np.arange(st.n_tiles(sid))
            x = src.read(sid, st.coords(sid)[idx])
            with torch.no_grad():
                out = enc(x)
            for lv in (0, 1):
                np.testing.assert_allclose(out[lv].numpy(), st.features(sid, "resnet18", lv).astype(np.float32),
                                           rtol=2e-2, atol=2e-2)


def test_bad_image_is_logged_recorded_skipped_and_resume_redoes_nothing(tmp_path, caplog):
    root = tmp_path / "c"
    (root / "x").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_rgb(i, 30, 40 + i)).save(root / "x" / f"ok{i}.png")
    good = (root / "x" / "ok0.png").read_bytes()
    (root / "x" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "x" / "zero.jpg").write_bytes(b"")
    ex = Extractor(ExtractConfig(**ENC))
    with caplog.at_level(logging.ERROR):
        report = ex.run(discover_images(root), tmp_path / "s.zarr")
    assert report.done == ["images-all-00000"]
    assert set(report.failed) == {"image_x_trunc.png", "image_x_zero.jpg"}
    assert "trunc.png" in caplog.text and "zero.jpg: empty file" in caplog.text
    st = featstore.open_store(tmp_path / "s.zarr")
    assert set(st.failures()) == set(report.failed)
    assert image_table(st).paths.tolist() == ["x/ok0.png", "x/ok1.png", "x/ok2.png"]
    assert st.features("images-all-00000", "resnet18", 0).shape == (3, 512)
    again = ex.run(discover_images(root), tmp_path / "s.zarr")
    assert again.skipped == ["images-all-00000"] and again.done == [] and again.tiles == 0
    assert set(again.failed) == set(report.failed)     # the store still lacks them
    Image.fromarray(_rgb(9, 30, 30)).save(root / "x" / "new.png")   # a changed folder
    changed = ex.run(discover_images(root), tmp_path / "s.zarr")
    assert "images-all-00000" in changed.failed and changed.tiles == 0
    assert "differs from the file tiled" in changed.failed["images-all-00000"]
    Image.fromarray(_rgb(9, 31, 30)).save(root / "x" / "ok1.png")   # a stored image rewritten
    with pytest.raises(SlideChangedError):
        TileSource.from_store(st, ["images-all-00000"], {"input_size": 8, "mean": [0] * 3, "std": [1] * 3})


def test_csv_split_group_in_image_table_and_a_missing_file_is_a_failure(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(_rgb(i, 24, 24 + 3 * i)).save(tmp_path / "img" / f"{i}.png")
    lst = tmp_path / "list.csv"
    lst.write_text("path,label,split,group\nimg/0.png,b,train,p1\nimg/1.png,a,train,p2\n"
                   "img/2.png,a,test,p3\nimg/3.png,b,test,p3\nimg/gone.png,a,test,p4\n")
    report = Extractor(ExtractConfig(**ENC)).run(discover_images(lst), tmp_path / "s.zarr")
    assert sorted(report.done) == ["images-test-00000", "images-train-00000"]
    assert list(report.failed) == ["image_img_gone.png"]
    st = featstore.open_store(tmp_path / "s.zarr")
    t = image_table(st)
    assert t.paths.tolist() == ["img/2.png", "img/3.png", "img/1.png", "img/0.png"]
    assert t.splits.tolist() == ["test", "test", "train", "train"]
    assert t.groups.tolist() == ["p3", "p3", "p2", "p1"] and t.labels.tolist() == ["a", "b", "a", "b"]
    assert image_table(st, ["images-train-00000"]).paths.tolist() == ["img/1.png", "img/0.png"]
    assert st.slide_info("images-test-00000")["root"] == str(tmp_path.resolve())


# ---------------------------------------------------------------------------- CLI
def test_cli_exits_1_on_a_bad_image_and_refuses_mixing(tmp_path):
    root = tmp_path / "c"
    (root / "k").mkdir(parents=True)
    Image.fromarray(_rgb(1, 30, 30)).save(root / "k" / "ok.png")
    (root / "k" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(featstore_app, ["extract", "--images", str(root), "--store", str(store), *CLI])
    assert res.exit_code == 1, res.output
    assert "bad.png" in res.output and "failed 1" in res.output
    st = featstore.open_store(store)
    assert st.has_features("images-all-00000", "resnet18", 1) and list(st.failures()) == ["image_k_bad.png"]
    res = CliRunner().invoke(featstore_app, ["extract", str(root), "--images", str(root), "--store", str(store), *CLI])
    assert res.exit_code == 1 and "need separate stores" in res.stderr
    slide = tmp_path / "s1.tif"
    slide.write_bytes(b"x")
    res = CliRunner().invoke(featstore_app, ["extract", str(slide), "--store", str(store), *CLI])
    assert res.exit_code == 1 and "holds image shards" in res.stderr
    res = CliRunner().invoke(featstore_app, ["extract", "--store", str(store), *CLI])
    assert res.exit_code == 1 and "--images" in res.stderr
