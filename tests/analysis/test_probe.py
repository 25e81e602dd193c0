"""Probes: scikit-learn estimators, pooling from a real store, tile labels, CV evaluation, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.base import clone
from typer.testing import CliRunner

from analysis.errors import AnalysisError
from analysis.probe import (DEFAULT_CS, KNNProbe, LinearProbe, evaluate_probe, is_tile_labels, load_tile_labels,
                            pool_slides, read_slide_labels)
from featstore.core.errors import CoreError
from featstore import open_store
from featstore.store import FeatureKey
from tests.analysis.conftest import write_store

KEY = FeatureKey("resnet18", "imagenet", 0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """20 slides (10 per class), 10 tiles each, one encoder; and a labels CSV with patients."""
    root = tmp_path_factory.mktemp("probe")
    slides = {f"s{i:02d}": (10, i % 2) for i in range(20)}
    write_store(root / "c.zarr", slides=slides, keys={KEY: 16}, seed=2)
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "patient_id"])
        for sid, (_, lab) in slides.items():
            w.writerow([sid, "tumor" if lab else "normal", f"p{int(sid[1:]) // 2}"])
    return open_store(root / "c.zarr"), labels, slides


def _blobs(n=120, d=10, sep=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d))
    X[:, 0] += sep * y
    return X, y


@pytest.mark.parametrize("cls", [LinearProbe, KNNProbe])
def test_estimators_follow_sklearn_and_separate(cls):
    X, y = _blobs()
    est = cls()
    assert clone(est).get_params() == est.get_params()
    est.fit(X[:80], y[:80])
    p = est.predict_proba(X[80:])
    assert p.shape == (40, 2) and np.allclose(p.sum(1), 1)
    assert (est.predict(X[80:]) == y[80:]).mean() > 0.7
    if cls is LinearProbe:
        assert est.C_ in DEFAULT_CS


def test_evaluate_probe_signal_vs_noise_and_determinism():
    X, y = _blobs(sep=2.5)
    good = evaluate_probe(X, y, folds=4, n_boot=200)
    assert good.metrics["auc"]["value"] > 0.85
    lo, hi = good.metrics["auc"]["ci"]
    assert lo < good.metrics["auc"]["value"] < hi
    assert set(good.folds) == {"fold0", "fold1", "fold2", "fold3"} and all("C" in f for f in good.folds.values())
    rng = np.random.default_rng(9)
    noise = evaluate_probe(rng.normal(size=X.shape), y, folds=4, n_boot=200)
    assert noise.metrics["auc"]["value"] < 0.7
    again = evaluate_probe(X, y, folds=4, n_boot=200)
    np.testing.assert_array_equal(again.proba, good.proba)


def test_evaluate_multiclass_and_groups():
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b", "c"], 30)
    X = rng.normal(size=(90, 6)) + 3 * np.eye(6)[np.searchsorted(["a", "b", "c"], y)]
    groups = np.repeat(np.arange(45), 2)  # pairs of samples share a group
    res = evaluate_probe(X, y, probe="knn", folds=3, groups=groups, n_boot=100)
    assert res.classes == ["a", "b", "c"] and res.proba.shape == (90, 3)
    assert res.metrics["auc"]["value"] > 0.9
    fold_of = np.array(res.fold_of)
    for g in np.unique(groups):  # no group split across folds
        assert len(set(fold_of[groups == g])) == 1


def test_evaluate_too_few_samples():
    with pytest.raises(AnalysisError, match="smallest class"):
        evaluate_probe(np.zeros((3, 2)), ["a", "a", "b"])


def test_mean_and_attention_pooling(cohort, tmp_path):
    store, _, slides = cohort
    ids, X = pool_slides(store, "resnet18", 0)
    assert ids == sorted(slides)
    np.testing.assert_allclose(X[3], store.features(ids[3], "resnet18", 0).astype(np.float64).mean(0))
    run = tmp_path / "run"
    run.mkdir()
    att = {f"test/{s}": np.zeros(10, np.float32) for s in ids[:5]}
    att[f"test/{ids[0]}"] = np.r_[50.0, np.zeros(9)].astype(np.float32)  # all weight on tile 0
    np.savez(run / "attention.npz", **att)
    aid, A = pool_slides(store, "resnet18", 0, pool="attention", run_dir=run)
    assert aid == ids[:5]  # slides without attention are skipped
    np.testing.assert_allclose(A[0], store.features(ids[0], "resnet18", 0)[0], atol=1e-6)
    np.testing.assert_allclose(A[1], X[1])  # uniform attention = mean
    with pytest.raises(AnalysisError, match="no attention.npz"):
        pool_slides(store, "resnet18", 0, pool="attention", run_dir=tmp_path)


def test_tile_labels_match_store_coords(cohort, tmp_path):
    store, _, _ = cohort
    coords = store.coords("s01")
    path = tmp_path / "tiles.csv"
    path.write_text("slide_id,x,y,label\n"
                    f"s01,{coords[2][0]},{coords[2][1]},tumor\n"
                    f"s01,{coords[5][0]},{coords[5][1]},stroma\n"
                    "s01,7,7,tumor\n"          # no such tile
                    "nope,0,0,tumor\n")        # no such slide
    X, y, g, ids = load_tile_labels(store, path, "resnet18", 0)
    feats = store.features("s01", "resnet18", 0)
    np.testing.assert_array_equal(X, feats[[2, 5]].astype(np.float32))
    assert y.tolist() == ["tumor", "stroma"] and g.tolist() == ["s01", "s01"]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,x,y,label\ns01,7,7,tumor\n")
    with pytest.raises(AnalysisError, match="no row matches"):
        load_tile_labels(store, bad, "resnet18", 0)


def test_cli_slide_and_tile_level(cohort, tmp_path):
    from featstore.cli import mil_app

    store, labels, _ = cohort
    out = tmp_path / "p"
    r = CliRunner().invoke(mil_app, ["probe", "--store", store.path, "--encoder", "resnet18", "--minus", "0",
                                     "--labels", str(labels), "--folds", "5", "--n-boot", "100", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "probe.json").read_text())
    assert rep["n"] == 20 and rep["classes"] == ["normal", "tumor"] and rep["weights"] == "imagenet"
    assert rep["metrics"]["auc"]["value"] > 0.8  # label-1 slides are shifted in latent space
    rows = list(csv.DictReader((out / "probe.csv").open()))
    assert len(rows) == 20 and {"id", "label", "fold", "probability"} <= set(rows[0])
    # tile level: every tile of 8 slides labelled with its slide's class
    tiles = tmp_path / "tiles.csv"
    with tiles.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "x", "y", "label"])
        for i in range(8):
            sid = f"s{i:02d}"
            for x, y in store.coords(sid):
                w.writerow([sid, x, y, i % 2])
    r = CliRunner().invoke(mil_app, ["probe", "--store", store.path, "--encoder", "resnet18", "--minus", "0",
                                     "--labels", str(tiles), "--probe", "knn", "--folds", "4",
                                     "--n-boot", "50", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "probe.json").read_text())
    assert rep["level"] == "tile" and rep["n"] == 80 and rep["probe"] == "knn"


def test_a_bom_labels_csv_works_in_the_probe(cohort, tmp_path):
    from featstore.cli import mil_app

    store, labels, _ = cohort
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # Excel's "CSV UTF-8"
    lab = read_slide_labels(bom)
    assert len(lab.slide_ids) == 20 and lab.slide_ids[0] == "s00" and set(lab.labels) == {"normal", "tumor"}
    out = tmp_path / "p"
    r = CliRunner().invoke(mil_app, ["probe", "--store", store.path, "--encoder", "resnet18", "--minus", "0",
                                     "--labels", str(bom), "--folds", "3", "--n-boot", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "probe.json").read_text())["n"] == 20
    tiles = tmp_path / "tiles.csv"
    x, y = store.coords("s01")[0]
    tiles.write_bytes(b"\xef\xbb\xbfslide_id,x,y,label\n" + f"s01,{x},{y},tumor\n".encode())
    assert is_tile_labels(tiles) and load_tile_labels(store, tiles, "resnet18", 0)[1].tolist() == ["tumor"]


def test_an_unlabelled_row_is_an_error_naming_its_line(cohort, tmp_path):
    from featstore.cli import mil_app

    store, _, _ = cohort
    slides = tmp_path / "labels.csv"
    slides.write_text("slide_id,label\ns00,normal\ns01,\ns02,tumor\n")
    with pytest.raises(CoreError, match=r"empty/NaN label on line\(s\) 3"):
        read_slide_labels(slides)
    r = CliRunner().invoke(mil_app, ["probe", "--store", store.path, "--encoder", "resnet18", "--minus", "0",
                                     "--labels", str(slides), "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "line(s) 3" in r.output and not (tmp_path / "p").exists()
    x, y = store.coords("s01")[0]
    tiles = tmp_path / "tiles.csv"
    tiles.write_text(f"slide_id,x,y,label\ns01,{x},{y},tumor\ns01,{x},{y},NaN\n")
    with pytest.raises(AnalysisError, match=r"tiles.csv: empty/NaN label on line\(s\) 3"):
        load_tile_labels(store, tiles, "resnet18", 0)
