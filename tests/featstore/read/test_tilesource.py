"""TileSource on real pyramidal TIFFs and a real store: reads, resize filter, threads, files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import featstore
from featstore.core.errors import ConfigError
from featstore.cohort import discover_slides
from featstore.encoders import create_encoder
from featstore.errors import SlideChangedError, SlideNotFoundError
from featstore.extract import ExtractConfig, Extractor
from featstore.read.slide import Slide
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig
from featstore.read.tilesource import TileSource

PRE = {"input_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
COORDS = np.array([[0, 0], [300, 200], [700, 500], [128, 64], [512, 256]])


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("ts")
    for i, w in enumerate((1024, 896, 768)):
        rgb = rectangles_slide((w, 768), [(0, 0, w, 768)], seed=i)
        write_pyramid_tiff(d / f"s{i}.tif", rgb, mpp=0.5, compression="deflate")
    return d


def _unnormalise(x: torch.Tensor, pre: dict) -> np.ndarray:
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1) * 255
    return (x * std + mean).permute(0, 2, 3, 1).numpy()


def test_read_is_read_patch_normalised(slides):
    with TileSource(PRE, workers=2) as src, Slide(slides / "s0.tif") as s:
        src.add("s0", slides / "s0.tif", 256)
        x = src.read("s0", COORDS)
        rgb = np.stack([s.read_patch(tuple(c), 256, 32) for c in COORDS])
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    want = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    want = (want - torch.tensor(PRE["mean"]).view(1, 3, 1, 1)) / torch.tensor(PRE["std"]).view(1, 3, 1, 1)
    np.testing.assert_allclose(x.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_efficientnet_patches_are_resized_bicubic_as_torchvision_v2(slides):
    pre = create_encoder("efficientnet_b0", "random").preprocessing()
    assert pre["interpolation"] == "bicubic" and pre["input_size"] == 224
    xy, size0 = (300, 200), 256                      # 256 -> 224: read from level 0, then resized
    with TileSource(pre) as src, Slide(slides / "s0.tif") as s:
        src.add("s0", slides / "s0.tif", size0)
        got = _unnormalise(src.read("s0", np.array([xy])), pre)[0]
        region = torch.from_numpy(s.read_region(xy, 0, (size0, size0))).permute(2, 0, 1)
        bilinear = s.read_patch(xy, size0, 224, "bilinear").astype(np.float64)
    ref = TF.resize(region, [224, 224], InterpolationMode.BICUBIC, antialias=True)
    ref = ref.permute(1, 2, 0).numpy().astype(np.float64)
    err = np.abs(got - ref).mean()
    assert err <= 0.1, err                           # the same filter (PIL rounding only)
    assert np.abs(bilinear - ref).mean() > 5 * max(err, 0.05)   # bilinear is clearly another resize


def test_unknown_interpolation_fails_at_construction():
    with pytest.raises(ConfigError, match="interpolation 'cubic'"):
        TileSource({**PRE, "interpolation": "cubic"})


def test_submit_and_stream_split_over_threads_keep_the_order(slides):
    with TileSource(PRE, workers=1) as one, TileSource(PRE, workers=3) as three:
        for src in (one, three):
            for i in range(3):
                src.add(f"s{i}", slides / f"s{i}.tif", 128)
        items = [(f"s{i}", COORDS[: 2 + i]) for i in range(3)] + [("s0", COORDS[:0])]
        want = [one.read(sid, c) for sid, c in items]
        got = list(three.stream(items))
        assert [sid for sid, _ in got] == [sid for sid, _ in items]
        for (_, x), w in zip(got, want):
            assert torch.equal(x, w)
        assert got[-1][1].shape == (0, 3, 32, 32)


def test_a_bad_slide_in_a_cross_slide_batch_is_zero_filled_and_reported(slides, tmp_path):
    path = shutil.copy(slides / "s1.tif", tmp_path / "corrupt.tif")
    with tifffile.TiffFile(path) as tf:
        offsets, counts = tf.pages[0].dataoffsets, tf.pages[0].databytecounts
    with open(path, "r+b") as fh:                    # break every level-0 tile
        for off, n in zip(offsets, counts):
            fh.seek(off)
            fh.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    with TileSource(PRE, workers=2) as src:
        src.add("good", slides / "s0.tif", 32)       # native size: read from level 0
        src.add("bad", path, 32)
        src.add("later", slides / "s2.tif", 32)
        c = COORDS[:2]
        x, errors = src.submit_batch([("good", c), ("bad", c), ("later", c)]).result()
        assert set(errors) == {1} and "corrupt.tif" in errors[1]
        assert torch.equal(x[:2], src.read("good", c)) and torch.equal(x[4:], src.read("later", c))
        zero = src.normalise(np.zeros((2, 32, 32, 3), np.uint8))
        assert torch.equal(x[2:4], zero)
        y, errs = src.submit_batch([("good", c), ("later", c)], skip=lambda i: i == 1).result()
        assert errs == {} and torch.equal(y[2:], zero) and torch.equal(y[:2], x[:2])


@pytest.fixture(scope="module")
def store(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "c.zarr"
    cfg = ExtractConfig(encoder="resnet18", levels=(3,), input_size=32, precision="fp32", batch_size=16,
                        tiling=TilingConfig(patch_size=128, mpp=1.0))
    report = Extractor(cfg).run(discover_slides([slides]), out)
    assert report.ok, report.failed
    return out


def test_from_store_reads_the_stored_coords_from_the_recorded_files(store, slides):
    st = featstore.open_store(store)
    ids = st.slide_ids()
    with TileSource.from_store(st, ids, PRE, workers=2) as src:
        assert src.paths == {s: slides / f"{s}.tif" for s in ids}
        x = src.read("s1", st.coords("s1")[:3])
    with TileSource(PRE) as manual:
        manual.add("s1", slides / "s1.tif", st.slide_info("s1")["size0"])
        assert torch.equal(x, manual.read("s1", st.coords("s1")[:3]))


def test_from_store_names_missing_and_swapped_files(store, slides, tmp_path):
    st = featstore.open_store(store)
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(slides / "s0.tif", few / "s0.tif")
    with pytest.raises(SlideNotFoundError, match=r"2 slide\(s\) of the store not found among --slides \(s1, s2\)"):
        TileSource.from_store(st, st.slide_ids(), PRE, slides=[str(few)])
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(slides / "s2.tif", swapped / "s1.tif")
    with pytest.raises(SlideChangedError, match="differs from the file tiled into .* as 's1'") as e:
        TileSource.from_store(st, ["s1"], PRE, slides=[str(swapped)])
    assert "\n" not in str(e.value)
    TileSource.from_store(st, ["s1"], PRE, slides=[str(swapped)], check_fingerprint=False).close()
