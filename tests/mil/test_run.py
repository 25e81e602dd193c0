"""End to end on a real Zarr store: `mil train` writes the run directory, `mil predict` reads it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.store import FeatureKey, open_store
from mil.errors import MilError, RunError
from mil.predict import predict
from mil.run import load_run
from mil.train import RunSpec, TrainConfig, train_run

from .conftest import planted_bags, write_labels, write_store

SMALL = ["--hidden", "32,16", "--attn-dim", "8", "--lr", "3e-3", "--dropout", "0", "--epochs", "12", "--threads", "1"]


def _train_cli(tmp_path, store, labels, out, *extra):
    args = ["train", "--store", store, "--encoder", "resnet18", "--minus", "1", "--labels", labels,
            "--out", str(out), *SMALL, *extra]
    return CliRunner().invoke(mil_app, args, catch_exceptions=False)


def test_train_writes_every_promised_file_and_predict_reads_it(tmp_path, cohort):
    store, labels, bags, y = cohort
    out = tmp_path / "runs" / "r1"
    res = _train_cli(tmp_path, store, labels, out, "--folds", "2")
    assert res.exit_code == 0, res.output
    assert "fold1 (2/2)" in res.output and "mean ± std" in res.output
    for name in ("config.json", "model.pt", "metrics.json", "predictions.csv", "attention.npz",
                 "history.json", "roc.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "train" and cfg["encoder"] == "resnet18" and cfg["weights"] == "random"
    assert cfg["minus"] == 1 and cfg["classes"] == ["normal", "tumor"] and cfg["fold_names"] == ["fold0", "fold1"]
    assert cfg["provenance"]["dim"] == 16 and cfg["store"] == store
    metrics = json.loads((out / "metrics.json").read_text())
    for fold in ("fold0", "fold1"):
        m = metrics["folds"][fold]
        assert set(m) == {"auc", "balanced_accuracy", "f1", "auc_ci", "n"}
        assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
    assert set(metrics["mean"]) == set(metrics["std"]) == {"auc", "balanced_accuracy", "f1"}
    assert metrics["mean"]["auc"] > 0.8
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(bags)       # every slide tested once
    assert list(rows[0]) == ["slide_id", "label", "probability", "fold"]
    # attention aligned with the store coords
    st = open_store(store)
    with np.load(out / "attention.npz") as z:
        for r in rows[:5]:
            assert z[f"{r['fold']}/{r['slide_id']}"].shape == (len(st.coords(r["slide_id"])),)
    # model.pt loads with weights_only and holds one head per fold
    payload = torch.load(out / "model.pt", weights_only=True)
    assert set(payload["state_dict"]) == {"fold0", "fold1"} and payload["classes"] == ["normal", "tumor"]
    run = load_run(out)
    assert run.model("fold1").config["in_dim"] == 16
    # predict: the fold heads averaged; a test slide's score is close to its fold's own
    res = CliRunner().invoke(mil_app, ["predict", "--run", str(out), "--store", store, "--slides",
                                       "s000,s001", "--out", str(tmp_path / "p.csv")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with (tmp_path / "p.csv").open() as fh:
        pred = list(csv.DictReader(fh))
    assert [p["slide_id"] for p in pred] == ["s000", "s001"]
    p_all = predict(out, store)
    assert len(p_all.slide_ids) == 40 and p_all.probs.shape == (40, 2)
    np.testing.assert_allclose(p_all.probs.sum(1), 1, rtol=1e-6)


def test_same_seed_gives_identical_metrics(tmp_path, cohort):
    store, labels, _, _ = cohort
    outs = [tmp_path / f"r{i}" for i in range(2)]
    cfg = TrainConfig(hidden=(16,), attn_dim=8, epochs=3, lr=3e-3, seed=5, threads=1)
    for o in outs:
        train_run(RunSpec(store, labels, str(o), "resnet18", 1, n_boot=50), cfg)
    a, b = ((o / "metrics.json").read_text() for o in outs)
    assert a == b
    assert (outs[0] / "predictions.csv").read_text() == (outs[1] / "predictions.csv").read_text()
    assert json.loads(a)["folds"].keys() == {"test"}


def test_cli_errors_are_one_red_line(tmp_path, cohort):
    store, labels, bags, y = cohort
    bad = write_labels(tmp_path / "bad.csv", [{"slide_id": "s000", "label": "a"}, {"slide_id": "zz", "label": "b"}])
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--encoder", "resnet18", "--minus", "1",
                                       "--labels", bad, "--out", str(tmp_path / "x")])
    assert res.exit_code == 1
    assert "1 slide(s) of" in res.output and "zz" in res.output and "--allow-missing" in res.output
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--encoder", "densenet121", "--minus", "1",
                                       "--labels", labels, "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no features for densenet121 minus1" in res.output
    res = CliRunner().invoke(mil_app, ["predict", "--run", str(tmp_path / "nope"), "--store", store])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_predict_refuses_a_store_with_other_features(tmp_path, cohort):
    store, labels, bags, y = cohort
    out = tmp_path / "run"
    train_run(RunSpec(store, labels, str(out), "resnet18", 1, n_boot=20),
              TrainConfig(hidden=(8,), attn_dim=4, epochs=1, threads=1))
    other = write_store(tmp_path / "other.zarr", dict(list(bags.items())[:3]), key=FeatureKey("resnet18", "imagenet", 1))
    with pytest.raises(MilError, match="has no features resnet18:random:minus1"):
        predict(out, other)
    wide, _ = planted_bags(3, dim=24, seed=0)
    wide_store = write_store(tmp_path / "wide.zarr", wide)
    with pytest.raises(MilError, match=r"dim: run 16 vs store 24"):
        predict(out, wide_store)
    with pytest.raises(MilError, match="already holds a run"):
        train_run(RunSpec(store, labels, str(out), "resnet18", 1), TrainConfig(epochs=1))
    (out / "model.pt").unlink()
    with pytest.raises(RunError, match="has no model.pt"):
        load_run(out)
