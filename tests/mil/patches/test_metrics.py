"""classification_metrics against scikit-learn on fixed predictions; bootstrap CIs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from mil.patches.errors import PatchError
from mil.patches.metrics import _confusion, _from_confusion, classification_metrics

CLASSES = ["tumour", "stroma", "lymph", "debris"]


def _predictions(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), y] += 1.2          # better than chance, not perfect
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def test_point_estimates_equal_sklearn():
    y, proba = _predictions()
    pred = proba.argmax(1)
    m = classification_metrics(y, proba, CLASSES, n_boot=0)
    assert m["n"] == 400
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert m["macro_recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    per = f1_score(y, pred, average=None, zero_division=0)
    assert list(m["per_class_f1"]) == CLASSES
    assert list(m["per_class_f1"].values()) == pytest.approx(per.tolist())
    assert m["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["nll"] == pytest.approx(-np.log(proba[np.arange(400), y]).mean())
    assert 0 < m["ece"] < 1 and 0.4 < m["accuracy"] < 0.9
    assert "accuracy_ci" not in m


def test_confusion_rows_are_true_classes():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 1, 0])
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = classification_metrics(y, proba, ["a", "b", "c"], n_boot=0)
    assert m["confusion"] == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]   # row 0: true a, two predicted b
    assert m["per_class_f1"]["c"] == 0.0
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_an_absent_class_has_no_f1_and_no_weight():
    y = np.array([0, 0, 1, 1, 1])
    proba = np.eye(3)[np.array([0, 1, 1, 1, 0])]
    m = classification_metrics(y, proba, ["a", "b", "c"], n_boot=0)
    assert m["per_class_f1"]["c"] is None
    assert m["macro_f1"] == pytest.approx(f1_score(y, proba.argmax(1), average="macro"))
    assert m["confusion"][2] == [0, 0, 0]


def test_binary_auc_and_single_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.7, 0.9, 0.4, 0.2])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), ["neg", "pos"], n_boot=50)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    one = classification_metrics(np.zeros(4, int), np.tile([0.9, 0.1], (4, 1)), ["neg", "pos"], n_boot=20)
    assert one["auc"] is None and one["accuracy"] == 1.0


def test_fast_resample_metrics_equal_sklearn():
    rng = np.random.default_rng(5)
    for _ in range(30):  # includes predictions of classes absent from y and the reverse
        y = rng.integers(0, 3, 25)
        pred = rng.choice([0, 1, 3], 25)
        fast = _from_confusion(_confusion(y, pred, 4))
        assert fast["accuracy"] == pytest.approx(accuracy_score(y, pred))
        with warnings.catch_warnings():  # scikit-learn warns when a predicted class is absent from y
            warnings.simplefilter("ignore", UserWarning)
            ba = balanced_accuracy_score(y, pred)
        assert fast["balanced_accuracy"] == pytest.approx(ba)
        assert fast["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_cis_contain_the_estimate_and_are_deterministic():
    y, proba = _predictions(1)
    a = classification_metrics(y, proba, CLASSES, n_boot=300, seed=7)
    b = classification_metrics(y, proba, CLASSES, n_boot=300, seed=7)
    c = classification_metrics(y, proba, CLASSES, n_boot=300, seed=8)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = a[f"{name}_ci"]
        assert lo < a[name] < hi and 0.03 < hi - lo < 0.25
        assert a[f"{name}_ci"] == b[f"{name}_ci"]
    assert a["accuracy_ci"] != c["accuracy_ci"]


def test_bad_inputs():
    y, proba = _predictions()
    with pytest.raises(PatchError, match="one column per class"):
        classification_metrics(y, proba, CLASSES[:3])
    with pytest.raises(PatchError, match="class indices"):
        classification_metrics(y + 1, proba, CLASSES)
    with pytest.raises(PatchError, match="one label per row"):
        classification_metrics(y[:-1], proba, CLASSES)
