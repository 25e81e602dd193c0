"""`mil seg train --slides`: annotated slides (QuPath GeoJSON, label TIFFs) cut at a target mpp,
split by slide (a slide's patches never on both sides), trained and scored in and out of domain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.synth import write_gland_slides, write_pyramid_tiff
from mil.seg.errors import SegError
from mil.seg.run import WsiSource, load_wsi
from mil.seg.train import SegConfig, split_images


def test_patches_of_a_slide_stay_on_one_side_of_the_split():
    groups = [f"s{i // 5}" for i in range(40)]            # 8 slides x 5 patches
    cfg = SegConfig(encoder="resnet18", test=0.25, val=0.25, fraction=0.5)
    split = split_images(40, cfg, groups)
    sides = {k: {groups[i] for i in v} for k, v in split.items()}
    assert len(sides["test"]) == 2 and len(sides["val"]) == 2
    assert not (sides["test"] & sides["val"]) and not (sides["train"] & (sides["test"] | sides["val"]))
    full = split_images(40, SegConfig(encoder="resnet18", test=0.25, val=0.25), groups)
    assert set(split["train"]) < set(full["train"]) and list(split["test"]) == list(full["test"])
    with pytest.raises(SegError, match="at least 3 slides"):
        split_images(10, SegConfig(encoder="resnet18"), [f"s{i // 5}" for i in range(10)])


def test_train_on_slides_and_score_another_site(tmp_path):
    from featstore.cli import mil_app

    slides, labels = write_gland_slides(tmp_path / "site-a", 4, seed=0)
    other, _ = write_gland_slides(tmp_path / "site-b", 1, seed=1, style="he-faded")
    (other.parent / "labels" / "case0.tif").rename(other / "case0.tif")   # a label TIFF beside its slide
    args = ["seg", "train", "--slides", str(slides), "--annotations", str(labels), "--mpp", "1.0", "--patch", "96",
            "--mask-kind", "multiclass", "--encoder", "resnet18", "--epochs", "1", "--crop", "96",
            "--test", "0.25", "--val", "0.25", "--n-boot", "0", "--out", str(tmp_path / "run"),
            "--test-slides", str(other)]
    r = CliRunner().invoke(mil_app, args)
    assert r.exit_code == 1 and "hold 3 classes" in r.output and "--classes 3" in r.output
    r = CliRunner().invoke(mil_app, args + ["--classes", "3"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["class_ids"] == {"1": 1, "2": 2} and cfg["mpp"] == 1.0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test"]["n"] == 4 and m["ood:site-b"]["n"] == 4    # 384 px at 0.5 mpp = 2 x 2 patches of 96 at 1.0
    assert {"dice_c1", "dice_c2"} <= set(m["test"])


def test_load_wsi_reads_geojson_classes_by_name(tmp_path):
    folder = tmp_path / "geo"
    folder.mkdir()
    rgb = np.full((256, 256, 3), 230, np.uint8)
    write_pyramid_tiff(folder / "a.tif", rgb, 0.5, tile=128, compression="deflate")
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x, 0], [x + 64, 0], [x + 64, 64],
                                                                                  [x, 64], [x, 0]]]},
              "properties": {"objectType": "annotation", "classification": {"name": name}}}
             for x, name in ((0, "Tumor"), (128, "Stroma"))]
    (folder / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cfg = SegConfig(encoder="resnet18", mask_kind="multiclass", classes=3)
    ds = load_wsi(WsiSource(slides=str(folder), mpp=0.5, patch=128, class_names="Tumor,Stroma"), cfg)
    assert ds.data.classes == {"Tumor": 1, "Stroma": 2} and ds.groups == [str(folder / "a.tif")] * 2
    assert ds.data.names == ["a_x0_y0", "a_x128_y0"]          # only the annotations' bounding box is cut
    tumour, stroma = ds.truths
    assert (tumour[:64, :64] == 1).all() and tumour.sum() == 64 * 64
    assert (stroma[:64, :64] == 2).all() and stroma.sum() == 2 * 64 * 64
