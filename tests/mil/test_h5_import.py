"""A run trained on features imported from CLAM/TRIDENT .h5 files equals one on the store's own."""

from __future__ import annotations

import json

import h5py
import numpy as np

from featstore.h5io import export_h5, import_h5
from featstore.store import open_store
from mil.train import RunSpec, TrainConfig, train_run


def test_run_on_h5_imported_features_matches_the_original(cohort, tmp_path):
    store, labels, bags, _ = cohort
    h5dir = tmp_path / "h5"
    paths = export_h5(open_store(store), h5dir, "resnet18", 1)
    assert len(paths) == len(bags)
    # a CLAM-style file: (1, N, D) features and patch_size/patch_level attributes
    with h5py.File(paths[0], "r+") as f:
        feats = f["features"][()]
        del f["features"]
        f["features"] = feats[None]
    imported = tmp_path / "imported.zarr"
    rep = import_h5(paths, open_store(imported, mode="a"), "resnet18", 1, weights="random")
    assert not rep.failed and len(rep.imported) == len(bags)
    cfg = TrainConfig(epochs=8, patience=0, seed=3)
    a = train_run(RunSpec(store=store, labels=labels, out=str(tmp_path / "a"), encoder="resnet18", minus=1,
                          folds=2, n_boot=50), cfg)
    train_run(RunSpec(store=str(imported), labels=labels, out=str(tmp_path / "b"), encoder="resnet18",
                      minus=1, folds=2, n_boot=50), cfg)
    assert a.metrics["mean"]["auc"] > 0.7
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma == mb
    pa = (tmp_path / "a" / "predictions.csv").read_text()
    assert pa == (tmp_path / "b" / "predictions.csv").read_text()
    assert np.array_equal(open_store(imported).coords("s000"), open_store(store).coords("s000"))
