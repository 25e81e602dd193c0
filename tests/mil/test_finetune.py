"""`mil finetune` end to end on real slides: pyramidal TIFFs read through OpenSlide, a real store
extracted with resnet18 (minus 2, 64 px), a real `mil train` run, then top-k fine-tuning."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featstore
from featstore.cohort import discover_slides
from featstore.errors import SlideChangedError
from featstore.extract import ExtractConfig, Extractor
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig
from featstore.read.tilesource import TileSource
from mil.errors import MilError, RunError
from mil.finetune import (FinetuneConfig, FinetuneSpec, build_model, finetune_run, load_parent, make_optimizer,
                          train_step)
from mil.topk import select_topk
from mil.train import RunSpec, TrainConfig, train_run

TILING = TilingConfig(patch_size=64, mpp=1.0)           # size0 = 128 level-0 px at 0.5 um/px
EXTRACT = dict(encoder="resnet18", weights="random", levels=(2,), tiling=TILING, input_size=64,
               precision="fp32", batch_size=16, workers=2, device="cpu")
SPLIT = ["train"] * 4 + ["val"] * 2 + ["test"] * 4
FT = dict(k=4, epochs=1, lr=1e-3, micro_batch=2, precision="fp32", workers=2, n_boot=50, eval_batch=16, threads=1)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(slide dir, store, parent run dir, fine-tune result): 10 slides of 16 tiles each."""
    root = tmp_path_factory.mktemp("ft")
    slides = root / "slides"
    slides.mkdir()
    for i in range(10):
        write_pyramid_tiff(slides / f"s{i}.tif", rectangles_slide((768, 768), [(0, 0, 512, 512)], seed=i), mpp=0.5)
    store = root / "cohort.zarr"
    report = Extractor(ExtractConfig(**EXTRACT)).run(discover_slides([slides]), store)
    assert report.ok and len(report.done) == 10
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        for i in range(10):
            w.writerow([f"s{i}", ["normal", "tumor"][i % 2], SPLIT[i]])
    run = root / "run"
    train_run(RunSpec(str(store), str(labels), str(run), "resnet18", 2, n_boot=50),
              TrainConfig(hidden=(16,), attn_dim=8, epochs=2, threads=1))
    res = finetune_run(FinetuneSpec(str(run), str(root / "run-ft"), slides=[str(slides)]), FinetuneConfig(**FT))
    return slides, store, run, res


def test_select_topk_picks_the_planted_tiles():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(50)
    planted = [7, 31, 2, 44]
    scores[planted] = [13.0, 12.0, 11.0, 10.0]
    np.testing.assert_array_equal(select_topk(scores, 4), planted)
    np.testing.assert_array_equal(select_topk([1.0, 1.0, 1.0, 0.0], 2), [0, 1])      # ties: lower row first
    np.testing.assert_array_equal(select_topk([0.5, np.nan, 2.0], 5), [2, 0, 1])     # fewer tiles than k
    with pytest.raises(MilError, match="--k 0"):
        select_topk(scores, 0)


def test_selection_is_the_frozen_runs_top_attention(parent):
    _, _, run, res = parent
    with np.load(run / "attention.npz") as z:
        test_slides = [k.split("/", 1)[1] for k in z.files]
        assert test_slides
        for s in test_slides:
            a = z[f"test/{s}"]
            rows = res.selection[s]
            assert len(rows) == 4
            rest = np.setdiff1d(np.arange(len(a)), rows)
            assert a[rows].min() > a[rest].max()
    saved = json.loads((res.path / "topk.json").read_text())
    assert saved["rows"]["s6"] == res.selection["s6"].tolist()


def test_a_step_trains_the_encoder_but_not_batchnorm_statistics(parent):
    slides, store, run, _ = parent
    par = load_parent(run)
    cfg = FinetuneConfig(**{**FT, "lr": 1e-3, "micro_batch": 4})
    model = build_model(par, cfg, torch.device("cpu"), "fp32")
    st = par.store
    with TileSource.from_store(st, ["s0"], {**model.encoder.preprocessing(), "input_size": 64},
                               slides=[str(slides)], workers=2) as reader:
        x = reader.read("s0", st.coords("s0")[:4])
    before = {k: v.clone() for k, v in model.encoder.model.state_dict().items()}
    # checkpointed micro-batches give the gradient of the whole bag
    grads = []
    for mb in (4, 1):
        model.micro_batch = mb
        model.zero_grad(set_to_none=True)
        model.train_mode()
        torch.manual_seed(0)   # same dropout mask in the head
        torch.nn.functional.cross_entropy(model(x)[0].unsqueeze(0), torch.tensor([1])).backward()
        grads.append(model.encoder.model.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    opt = torch.optim.Adam([{"params": list(model.encoder.trainable_parameters()), "lr": 1e-3},
                            {"params": list(model.head.parameters()), "lr": 1e-3}])
    train_step(model, opt, x, 1)
    after = model.encoder.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    # (timm zero-initialises each block's last BN scale, so the first step moves those and the shortcuts)
    for k in ("conv1.weight", "bn1.weight", "layer1.0.bn2.weight", "layer2.0.downsample.0.weight"):
        assert not torch.equal(before[k], after[k]), k
    untouched = [k for k in before if k.startswith(("layer3.", "layer4.", "fc."))]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


def test_frozen_and_finetuned_metrics_on_the_same_slides(parent):
    _, _, run, res = parent
    out = res.path
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds"].keys() == metrics["frozen"]["folds"].keys() == {"test"}
    for block in (metrics, metrics["frozen"]):
        m = block["folds"]["test"]
        assert m["n"] == 4 and m["auc"] is not None and len(m["auc_ci"]) == 2
    read = lambda p: list(csv.DictReader(p.open()))  # noqa: E731
    ft, frozen, parent_preds = read(out / "predictions.csv"), read(out / "predictions_frozen.csv"), \
        read(run / "predictions.csv")
    assert [r["slide_id"] for r in ft] == [r["slide_id"] for r in frozen] == ["s6", "s7", "s8", "s9"]
    # the frozen block is the run as trained: same probabilities as its own predictions
    assert {r["slide_id"]: r["probability"] for r in frozen} == {r["slide_id"]: r["probability"] for r in parent_preds}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "finetune" and cfg["k"] == 4 and cfg["parent_run"] == str(run)
    assert (cfg["encoder"], cfg["weights"], cfg["minus"]) == ("resnet18", "random-s0", 2)
    with np.load(out / "attention.npz") as z:
        assert sorted(z.files) == [f"test/s{i}" for i in range(6, 10)] and z["test/s6"].shape == (16,)
    assert json.loads((out / "history.json").read_text())["test"]["epoch"] == [1]


def report_tag(path):
    from featstore.encoders.weights import file_tag

    return file_tag(path)


def test_encoder_checkpoint_round_trips_through_the_extractor(parent, tmp_path):
    slides, store, run, res = parent
    enc_path = res.path / "encoder.pt"
    ckpt = torch.load(enc_path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "featstore-encoder/1" and ckpt["encoder"] == "resnet18" and ckpt["level"] == 2
    assert ckpt["parent_weights"] == "random-s0" and ckpt["finetune"]["k"] == 4
    from featstore.encoders import create_encoder
    frozen = create_encoder("resnet18", "random", levels=(2,)).model.state_dict()
    assert torch.equal(ckpt["state_dict"]["layer4.1.conv2.weight"], frozen["layer4.1.conv2.weight"])
    assert not torch.equal(ckpt["state_dict"]["layer2.0.downsample.0.weight"], frozen["layer2.0.downsample.0.weight"])
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    report = Extractor(ExtractConfig(**{**EXTRACT, "weights": str(enc_path)})).run(
        discover_slides([slides / "s6.tif"]), copy)
    assert report.ok, report.failed
    st = featstore.open_store(copy)
    got = st.features("s6", "resnet18", 2, report_tag(enc_path)).astype(np.float32)
    with TileSource.from_store(st, ["s6"], {**res.model.encoder.preprocessing(), "input_size": 64},
                               slides=[str(slides / "s6.tif")], workers=2) as reader, torch.no_grad():
        want = res.model.eval().embed(reader.read("s6", st.coords("s6"))).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    parent_feats = st.features("s6", "resnet18", 2, "random-s0").astype(np.float32)
    assert np.abs(parent_feats - want).max() > 1e-2   # the fine-tuned encoder really differs


def test_bad_inputs_give_one_line_errors(parent, tmp_path):
    from featstore.cli import mil_app

    slides, store, run, _ = parent
    with pytest.raises(RunError, match="does not exist") as e:
        finetune_run(FinetuneSpec(str(tmp_path / "nope"), str(tmp_path / "o")), FinetuneConfig(**FT))
    assert "\n" not in str(e.value)
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(slides / "s0.tif", few / "s0.tif")
    with pytest.raises(MilError, match=r"9 slide\(s\) of the store not found among --slides \(s1, ") as e:
        finetune_run(FinetuneSpec(str(run), str(tmp_path / "o"), slides=[str(few)]), FinetuneConfig(**FT))
    assert "\n" not in str(e.value)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(slides / "s2.tif", swapped / "s1.tif")     # another file under a store slide's id
    with pytest.raises(SlideChangedError, match="differs from the file tiled"):
        TileSource.from_store(featstore.open_store(store), ["s1"], {"input_size": 64, "mean": (0.5,) * 3,
                                                                    "std": (0.5,) * 3}, slides=[str(swapped)])
    res = CliRunner().invoke(mil_app, ["finetune", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "does not exist" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def test_a_changed_slide_file_stops_the_finetune_before_out_is_written(parent, tmp_path):
    slides, _, run, _ = parent
    swapped = tmp_path / "swapped"
    shutil.copytree(slides, swapped)
    shutil.copy(slides / "s2.tif", swapped / "s1.tif")
    with pytest.raises(MilError, match=r"s1\.tif differs from the file tiled into .* as 's1'") as e:
        finetune_run(FinetuneSpec(str(run), str(tmp_path / "o"), slides=[str(swapped)]), FinetuneConfig(**FT))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_same_seed_same_finetune_with_reselect_and_accumulation(parent, tmp_path):
    slides, _, run, _ = parent
    cfg = FinetuneConfig(**{**FT, "k": 2, "epochs": 2, "reselect": True, "accumulate": 2, "eval_tiles": "topk"})
    outs = [finetune_run(FinetuneSpec(str(run), str(tmp_path / f"ft{i}"), slides=[str(slides)]), cfg)
            for i in range(2)]
    a, b = (torch.load(r.path / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"] for r in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outs[0].path / "metrics.json").read_text() == (outs[1].path / "metrics.json").read_text()
    hist = json.loads((outs[0].path / "history.json").read_text())["test"]
    assert hist["epoch"] == [1, 2] and all(v is not None for v in hist["val_loss"])
    assert not (outs[0].path / "attention.npz").exists()   # top-k scoring: no all-tile attention


def test_train_blocks_trains_only_the_last_cnn_stages(parent):
    slides, _, run, _ = parent
    par = load_parent(run)
    default = build_model(par, FinetuneConfig(**FT), torch.device("cpu"), "fp32")
    assert [n for n, p in default.encoder.model.named_parameters() if p.requires_grad] == \
        [n for n, p in default.encoder.model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    model = build_model(par, FinetuneConfig(**{**FT, "train_blocks": 1}), torch.device("cpu"), "fp32")
    assert [n for n, _ in model.encoder.trainable_modules(1)] == ["layer2"]
    with TileSource.from_store(par.store, ["s0"], {**model.encoder.preprocessing(), "input_size": 64},
                               slides=[str(slides)], workers=2) as reader:
        x = reader.read("s0", par.store.coords("s0")[:4])
    before = {k: v.clone() for k, v in model.encoder.model.state_dict().items()}
    train_step(model, make_optimizer(model, FinetuneConfig(**{**FT, "lr": 1e-2})), x, 1)
    after = model.encoder.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layer2"}
    with pytest.raises(MilError, match=r"--train-blocks 7: .*give 0\.\.6"):
        build_model(par, FinetuneConfig(**{**FT, "train_blocks": 7}), torch.device("cpu"), "fp32")
    with pytest.raises(MilError, match="--train-blocks -1 must be >= 0"):
        FinetuneConfig(train_blocks=-1)


def test_hed_jitter_is_seeded_and_changes_the_training(parent, tmp_path):
    """Stain augmentation of the top-k tiles: the same seed gives the same encoder, and the
    jitter actually reaches the training (the weights differ from an unaugmented run)."""
    slides, _, run, _ = parent
    base = {**FT, "k": 2, "epochs": 1, "eval_tiles": "topk"}
    outs = [finetune_run(FinetuneSpec(str(run), str(tmp_path / f"j{i}"), slides=[str(slides)]),
                         FinetuneConfig(**{**base, "hed_jitter": h})) for i, h in enumerate((0.05, 0.05, 0.0))]
    a, b, plain = (torch.load(r.path / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"] for r in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_a_fold_without_validation_slides_says_why_the_last_epoch_is_kept(parent, tmp_path, caplog):
    """A parent run trained with val_fraction 0 has no validation slides: the fine-tune says so
    once, and each epoch's line reads '(no validation slides)' instead of 'val nan'."""
    slides, store, _, _ = parent
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        for i in range(10):
            w.writerow([f"s{i}", ["normal", "tumor"][i % 2], "test" if i >= 6 else "train"])
    run = tmp_path / "run"
    train_run(RunSpec(str(store), str(labels), str(run), "resnet18", 2, n_boot=50),
              TrainConfig(hidden=(16,), attn_dim=8, epochs=1, val_fraction=0.0))
    with caplog.at_level(logging.INFO, logger="mil.finetune"):
        finetune_run(FinetuneSpec(str(run), str(tmp_path / "ft"), slides=[str(slides)]), FinetuneConfig(**FT))
    assert "no validation slides, so no epoch can be chosen: the last of --epochs 1 is kept" in caplog.text
    assert "epoch 1: train" in caplog.text and "(no validation slides)" in caplog.text and "nan" not in caplog.text
