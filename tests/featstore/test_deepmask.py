"""Deep tissue segmenters with the user's weights (featstore.deepmask): GrandQC's UNet++ trained here
for a few steps on messy slides, saved as a plain state dict as GrandQC publishes it, then used by
``--mask grandqc --mask-weights FILE`` through OpenSlide, the tiling, the CLI and the extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featstore.checkpoint import file_sha256
from featstore.cli import featstore_app
from featstore.deepmask import SEGMENTERS, load_segmenter
from featstore.errors import TilingError
from featstore.messy import messy_slide
from featstore.read.slide import Slide
from featstore.synth import write_pyramid_tiff
from featstore.tiling import TilingConfig, mask_and_artifacts, tiles_from_mask

MPP = 10.0          # GrandQC's resolution: the slides are drawn at it
SIZE = (1024, 768)  # 10.2 x 7.7 mm: 2 x 2 windows of 512 px


def _train_grandqc(path, steps: int = 20, crop: int = 64) -> None:
    """A few Adam steps of GrandQC's architecture on two messy slides' truth (class 0 = tissue)."""
    torch.manual_seed(0)
    seg = SEGMENTERS["grandqc"]
    model = seg.build()
    rng = np.random.default_rng(0)
    slides = [messy_slide(np.random.default_rng(s), size=SIZE) for s in (10, 11)]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    imgs = [(torch.tensor(m.rgb).permute(2, 0, 1).float() / 255 - mean) / std for m in slides]
    truth = [torch.tensor((~m.tissue).astype(np.int64)) for m in slides]
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        xb, yb = [], []
        for _ in range(8):
            i = int(rng.integers(2))
            y, x = int(rng.integers(SIZE[1] - crop)), int(rng.integers(SIZE[0] - crop))
            xb.append(imgs[i][:, y:y + crop, x:x + crop])
            yb.append(truth[i][y:y + crop, x:x + crop])
        loss = torch.nn.functional.cross_entropy(model(torch.stack(xb)), torch.stack(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)


# one worker builds the module's fixtures once (pyproject: --dist loadgroup), not each worker again
pytestmark = pytest.mark.xdist_group("deepmask")

@pytest.fixture(scope="module")
def grandqc(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepmask")
    weights = root / "Tissue_Detection_MPP10.pth"
    _train_grandqc(weights)
    m = messy_slide(np.random.default_rng(0), size=SIZE)
    return weights, write_pyramid_tiff(root / "messy.tif", m.rgb, mpp=MPP), m


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_grandqc_with_user_weights_segments_the_slide(grandqc):
    weights, path, m = grandqc
    cfg = TilingConfig(patch_size=32, mpp=MPP, mask="grandqc", mask_weights=str(weights))
    with Slide(path) as s:
        mask, _, _, exclude = mask_and_artifacts(s, cfg)
        tiles = tiles_from_mask(s, cfg, mask, exclude)
    truth = np.asarray(Image.fromarray(m.tissue.astype(np.uint8) * 255).resize(mask.shape[::-1], Image.BOX)) >= 128
    # measured: Dice 0.94 after 20 steps (the windows are JPEG-compressed as GrandQC's training was)
    assert _dice(mask, truth) > 0.9
    assert len(tiles) > 100
    assert cfg.to_dict()["mask"] == "grandqc" and cfg.to_dict()["mask_weights"] == str(weights)


def test_grandqc_through_tiles_and_extract_records_the_weights_sha256(grandqc, tmp_path):
    from featstore.store import open_store

    weights, path, _ = grandqc
    run = CliRunner()
    res = run.invoke(featstore_app, ["tiles", str(path), "--patch-size", "128", "--mpp", str(MPP),
                                     "--tissue", "grandqc", "--mask-weights", str(weights)])
    assert res.exit_code == 0, res.output
    n = int(res.output.split(": ", 1)[1].split()[0])
    store = tmp_path / "s.zarr"
    res = run.invoke(featstore_app, ["extract", str(path), "--store", str(store), "--encoder", "resnet18",
                                     "--weights", "random", "--minus", "3", "--patch-size", "128", "--mpp", str(MPP),
                                     "--mask", "grandqc", "--mask-weights", str(weights)])
    assert res.exit_code == 0, res.output
    st = open_store(str(store))
    sid = st.slide_ids()[0]
    info = st.slide_info(sid)
    assert info["mask_weights_sha256"] == file_sha256(weights)
    assert info["tiling"]["mask"] == "grandqc" and st.tiling["mask"] == "grandqc"
    assert len(st.coords(sid)) == n


def test_missing_or_wrong_weights_are_one_line(grandqc, tmp_path):
    weights, path, _ = grandqc
    run = CliRunner()
    res = run.invoke(featstore_app, ["tiles", str(path), "--mask", "grandqc"])
    assert res.exit_code != 0 and "needs --mask-weights" in res.output and "never downloads" in res.output
    res = run.invoke(featstore_app, ["tiles", str(path), "--mask", "grandqc", "--mask-weights", str(tmp_path / "no.pth")])
    assert res.exit_code != 0 and "no such file" in res.output
    with pytest.raises(TilingError, match="not hest weights.*deeplabv3_seg_v4.ckpt"):
        load_segmenter("hest", str(weights))
    res = run.invoke(featstore_app, ["tiles", str(path), "--mask-weights", str(weights)])
    assert res.exit_code != 0 and "takes no weights" in res.output
    bad = tmp_path / "code.pth"
    torch.save({"model": TilingConfig()}, bad)           # a pickled object: refused, never unpickled
    with pytest.raises(TilingError, match="code.pth"):
        load_segmenter("grandqc", str(bad))


def test_hest_lightning_checkpoint_loads_without_its_prefix_and_aux_head(tmp_path):
    seg = SEGMENTERS["hest"]
    torch.manual_seed(0)
    model = seg.build()
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    sd["model.aux_classifier.4.weight"] = torch.zeros(2, 256, 1, 1)   # the aux head HEST trained with
    path = tmp_path / "deeplabv3_seg_v4.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded, _, sha = load_segmenter("hest", str(path))
    assert sha == file_sha256(path)
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(seg.logits(loaded.cpu(), x), seg.logits(model, x))
