"""`mil evaluate` on real Zarr stores: a tiny run trained on cohort A, scored on cohort B."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.core.stats import auc, bootstrap_ci
from featstore.store import FeatureKey, open_store
from mil.errors import MilError
from mil.evaluate import evaluate_external
from mil.predict import predict
from mil.run import load_run
from mil.scoring import score_bags
from mil.data import load_bags
from mil.train import RunSpec, TrainConfig, train_run

from .conftest import KEY, planted_bags, write_labels

TILING = {"patch_size": 64, "mpp": 0.5, "overlap": 0, "min_tissue": 0.5, "mask": "saturation"}
PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 64}


def extracted_store(path: Path, bags: dict[str, np.ndarray], *, key: FeatureKey = KEY, tiling: dict = TILING,
                    reader: str = "openslide", preprocessing: dict = PRE) -> str:
    """A real store whose features carry the provenance `featstore extract` writes (tiling, reader, ...)."""
    st = open_store(path, mode="a")
    st.set_tiling(tiling)
    for sid, x in bags.items():
        n = len(x)
        cols = max(1, int(np.ceil(np.sqrt(n))))
        coords = np.stack([np.arange(n) % cols, np.arange(n) // cols], 1) * tiling["patch_size"]
        st.write_tiling(sid, coords, np.ones(n), {"source": f"{sid}.tif", "size0": tiling["patch_size"],
                                                  "slide_mpp": tiling["mpp"]})
        st.write_features(sid, key, x.astype(np.float16), {
            "encoder": key.encoder, "weights": key.weights, "minus": key.minus, "dim": int(x.shape[1]),
            "weights_sha256": None, "preprocessing": preprocessing, "reader": reader, "tiling": tiling})
    return str(path)


def labels_csv(path: Path, bags: dict, y: np.ndarray, prefix: str = "p", names=("normal", "tumor")) -> str:
    rows = [{"slide_id": s, "label": names[int(c)], "patient_id": f"{prefix}{(i // 4) * 2 + i % 2:02d}"}
            for i, (s, c) in enumerate(zip(bags, y))]
    return write_labels(path, rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(run dir, external store, external labels, external bags, y): 2-fold run on A, B from another seed."""
    tmp = tmp_path_factory.mktemp("evaluate")
    bags_a, y_a = planted_bags(32, dim=16, n_inst=(20, 40), k=4, shift=6.0, seed=1)
    store_a = extracted_store(tmp / "siteA.zarr", bags_a)
    run = tmp / "run"
    train_run(RunSpec(store_a, labels_csv(tmp / "a.csv", bags_a, y_a), str(run), "resnet18", 1, folds=2,
                      n_boot=200),
              TrainConfig(hidden=(16,), attn_dim=8, dropout=0.0, lr=3e-3, epochs=6, threads=1))
    bags_b, y_b = planted_bags(24, dim=16, n_inst=(20, 40), k=4, shift=3.0, seed=7)
    bags_b = {f"b{s}": x for s, x in bags_b.items()}
    store_b = extracted_store(tmp / "siteB.zarr", bags_b, reader="native")   # another reader is fine
    labels_b = labels_csv(tmp / "b.csv", bags_b, y_b, prefix="q")
    return run, store_b, labels_b, bags_b, y_b, tmp


def test_metrics_match_sklearn_and_each_fold_model_alone(setup):
    run_dir, store_b, labels_b, bags_b, y_b, tmp = setup
    res = evaluate_external(run_dir, store_b, labels_b, n_boot=200)
    m = res.metrics
    assert m["name"] == "siteB" and m["n_slides"] == 24 and m["n_patients"] == 12
    ens = m["external"]["ensemble"]
    # ensemble = mean of fold probabilities = `mil predict`
    np.testing.assert_allclose(res.probs, predict(run_dir, store_b, res.slide_ids).probs, rtol=1e-12)
    assert ens["auc"] == pytest.approx(roc_auc_score(y_b, res.probs[:, 1]), abs=1e-12)
    assert ens["auc"] == pytest.approx(auc(y_b, res.probs[:, 1]), abs=1e-12)
    seed = load_run(run_dir).config["seed"]
    assert ens["auc_ci"] == pytest.approx(list(bootstrap_ci(auc, y_b, res.probs[:, 1], n_boot=200, seed=seed)))
    assert ens["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_b, res.probs.argmax(1)))
    # per fold: that fold's model alone
    run = load_run(run_dir)
    st = open_store(store_b)
    bags = load_bags(st, res.slide_ids, KEY)
    assert set(m["external"]["folds"]) == {"fold0", "fold1"}
    for fold in run.folds:
        p, _ = score_bags(run.model(fold), bags, res.slide_ids, "cpu")
        assert m["external"]["folds"][fold]["auc"] == pytest.approx(roc_auc_score(y_b, p[:, 1]), abs=1e-12)
    # internal numbers = what the run recorded
    rec = json.loads((run_dir / "metrics.json").read_text())
    assert m["internal"]["mean"]["auc"] == rec["mean"]["auc"] and m["internal"]["std"]["auc"] == rec["std"]["auc"]
    for fold, f in rec["folds"].items():
        assert m["internal"]["folds"][fold]["auc"] == f["auc"] and m["internal"]["folds"][fold]["auc_ci"] == f["auc_ci"]
    assert m["internal"]["pooled"]["n"] == 32
    # written files: predictions carry ensemble and per-fold columns, equal to the metrics
    out = res.write()
    assert out == run_dir / "external" / "siteB"
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "patient_id", "label", "prob_normal", "prob_tumor", "predicted",
                             "fold0_prob_normal", "fold0_prob_tumor", "fold1_prob_normal", "fold1_prob_tumor"]
    saved = np.array([float(r["prob_tumor"]) for r in rows])
    y_saved = np.array([r["label"] == "tumor" for r in rows])
    assert roc_auc_score(y_saved, saved) == pytest.approx(ens["auc"], abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["external"]["ensemble"]["auc"] == ens["auc"]
    assert "| external ensemble |" in (out / "summary.md").read_text()
    assert not list(out.glob("*.tmp"))


def test_other_tiling_or_level_is_refused(setup):
    run_dir, _, labels_b, bags_b, _, tmp = setup
    big = extracted_store(tmp / "big.zarr", bags_b, tiling={**TILING, "patch_size": 128})
    with pytest.raises(MilError, match=r"tiling\.patch_size: run 64 vs store 128"):
        evaluate_external(run_dir, big, labels_b)
    fine = extracted_store(tmp / "fine.zarr", bags_b, tiling={**TILING, "mpp": 0.25})
    with pytest.raises(MilError, match=r"tiling\.mpp: run 0\.5 vs store 0\.25"):
        evaluate_external(run_dir, fine, labels_b)
    pre = extracted_store(tmp / "pre.zarr", bags_b, preprocessing={**PRE, "input_size": 224})
    with pytest.raises(MilError, match=r"preprocessing: run .*64.* vs store .*224"):
        evaluate_external(run_dir, pre, labels_b)
    lvl = extracted_store(tmp / "lvl.zarr", bags_b, key=FeatureKey("resnet18", "random", 2))
    with pytest.raises(MilError, match=r"minus1"):
        evaluate_external(run_dir, lvl, labels_b)


def test_labels_are_checked_like_mil_train(setup):
    run_dir, store_b, labels_b, bags_b, y_b, tmp = setup
    odd = labels_csv(tmp / "odd.csv", bags_b, y_b, names=("normal", "necrosis"))
    with pytest.raises(MilError, match=r"'necrosis' not among the run's classes"):
        evaluate_external(run_dir, store_b, odd)
    rows = list(csv.DictReader(open(labels_b))) + [{"slide_id": "ghost", "label": "tumor", "patient_id": "g"}]
    extra = write_labels(tmp / "extra.csv", rows)
    with pytest.raises(MilError, match=r"1 slide\(s\) of .* ghost.*--allow-missing"):
        evaluate_external(run_dir, store_b, extra)
    res = evaluate_external(run_dir, store_b, extra, allow_missing=True, name="skip", n_boot=50)
    assert res.metrics["n_slides"] == 24 and "ghost" not in res.slide_ids


def test_cli_writes_three_files_and_fails_in_one_line(setup):
    run_dir, store_b, labels_b, bags_b, y_b, tmp = setup
    out = tmp / "ext"
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(run_dir), "--store", store_b, "--labels", labels_b,
                                       "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "external ensemble" in res.output and "internal mean ± sd" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.csv", "summary.md"]
    bad = write_labels(tmp / "one.csv", [{"slide_id": "bs000", "label": "x"}, {"slide_id": "bs001", "label": "y"}])
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(run_dir), "--store", store_b, "--labels", bad])
    assert res.exit_code == 1 and "'x', 'y' not among the run's classes" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_multiclass_uses_macro_one_vs_rest_and_allows_a_subset_of_classes(tmp_path):
    names = ("a", "b", "c")
    bags, y = planted_bags(30, dim=8, n_inst=(15, 25), k=4, shift=6.0, seed=2, n_classes=3)
    store = extracted_store(tmp_path / "A.zarr", bags)
    run = tmp_path / "run3"
    train_run(RunSpec(store, labels_csv(tmp_path / "a.csv", bags, y, names=names), str(run), "resnet18", 1,
                      n_boot=50), TrainConfig(hidden=(8,), attn_dim=4, epochs=3, threads=1))
    bb, yb = planted_bags(18, dim=8, n_inst=(15, 25), k=4, shift=4.0, seed=3, n_classes=3)
    keep = {s: x for (s, x), c in zip(bb.items(), yb) if c != 1}      # cohort B lacks class "b"
    yk = yb[yb != 1]
    store_b = extracted_store(tmp_path / "B.zarr", keep)
    res = evaluate_external(run, store_b, labels_csv(tmp_path / "b.csv", keep, yk, names=names), n_boot=50)
    p = res.probs
    assert p.shape == (12, 3)
    want = np.mean([roc_auc_score(yk == c, p[:, c]) for c in (0, 2)])
    assert res.metrics["external"]["ensemble"]["auc"] == pytest.approx(want, abs=1e-12)
    pc = res.metrics["external"]["per_class"]
    assert pc["b"] == {"n": 0, "recall": None, "auc_ovr": None} and pc["a"]["n"] == 6
