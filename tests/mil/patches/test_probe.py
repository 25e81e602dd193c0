"""Probes on real data: scikit-learn's digits (features = the 64 pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.probe import DEFAULT_CS
from mil.patches.calibration import fit_temperature
from mil.patches.errors import PatchError
from mil.patches.probe import DEFAULT_KS, fit_probe
from mil.patches.splits import split_indices


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    s = split_indices(y, seed=0)
    return {k: (X[v], y[v]) for k, v in s.items()}


def _fit(digits, method, **kw):
    (Xt, yt), (Xv, yv) = digits["train"], digits["val"]
    return fit_probe(method, Xt, yt, Xv, yv, n_classes=10, seed=0, **kw)


def test_logreg_probe(digits):
    fit = _fit(digits, "logreg")
    Xs, ys = digits["test"]
    assert (fit.predict(Xs) == ys).mean() >= 0.9
    assert fit.param == "C" and fit.value in DEFAULT_CS and len(fit.sweep) == len(DEFAULT_CS)
    best = max(s["balanced_accuracy"] for s in fit.sweep)
    assert next(s for s in fit.sweep if s["C"] == fit.value)["balanced_accuracy"] == best
    assert fit.sweep[0]["balanced_accuracy"] < best       # the grid matters: C=1e-4 underfits
    proba = fit.predict_proba(Xs)
    assert proba.shape == (len(Xs), 10) and np.allclose(proba.sum(1), 1)
    assert np.allclose(softmax(fit.logits(Xs), axis=1), proba, atol=1e-8)
    assert fit.to_dict()["value"] == fit.value


def test_log_loss_selection_can_differ(digits):
    fit = _fit(digits, "logreg", select="log_loss")
    assert fit.value == min(fit.sweep, key=lambda s: s["log_loss"])["C"]


def test_knn_probe(digits):
    fit = _fit(digits, "knn")
    (Xt, yt), (Xv, yv), (Xs, ys) = digits["train"], digits["val"], digits["test"]
    assert (fit.predict(Xs) == ys).mean() >= 0.9
    assert fit.param == "k" and int(fit.value) in DEFAULT_KS
    k = int(fit.value)   # the one-pass vote sweep scores k as a fresh scikit-learn kNN does
    ref = make_pipeline(StandardScaler(), KNeighborsClassifier(k, metric="cosine")).fit(Xt, yt)
    entry = next(s for s in fit.sweep if s["k"] == k)
    assert entry["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yv, ref.predict(Xv)))
    z = fit.logits(Xv)
    assert np.isfinite(z).all() and fit_temperature(z, yv) > 0


def test_binary_logits_reproduce_probabilities(digits):
    (Xt, yt), (Xv, yv) = digits["train"], digits["val"]
    fit = fit_probe("logreg", Xt, (yt >= 5).astype(int), Xv, (yv >= 5).astype(int), n_classes=2)
    z = fit.logits(Xv)
    assert z.shape == (len(Xv), 2)
    assert np.allclose(softmax(z, axis=1), fit.predict_proba(Xv), atol=1e-8)


def test_refusals(digits):
    (Xt, yt), (Xv, yv) = digits["train"], digits["val"]
    with pytest.raises(PatchError, match="unknown probe"):
        fit_probe("svm", Xt, yt, Xv, yv, n_classes=10)
    keep = yt != 9
    with pytest.raises(PatchError, match=r"missing \[9\]"):
        fit_probe("logreg", Xt[keep], yt[keep], Xv, yv, n_classes=10)
    with pytest.raises(PatchError, match="validation split is empty"):
        fit_probe("knn", Xt, yt, Xv[:0], yv[:0], n_classes=10)
    with pytest.raises(PatchError, match="same D"):
        fit_probe("knn", Xt, yt, Xv[:, :10], yv, n_classes=10)


def test_linear_head_on_raw_features_reproduces_the_probe(digits):
    """LP-FT starts a fine-tune's head from the probe: W x + b on raw features = the probe's logits."""
    fit = _fit(digits, "logreg")
    Xs, _ = digits["test"]
    W, b = fit.linear_head()
    assert W.shape == (10, Xs.shape[1]) and np.allclose(Xs @ W.T + b, fit.logits(Xs), atol=1e-8)
    (Xt, yt), (Xv, yv) = digits["train"], digits["val"]
    two = (yt < 2), (yv < 2)
    bfit = fit_probe("logreg", Xt[two[0]], yt[two[0]], Xv[two[1]], yv[two[1]], n_classes=2, seed=0)
    W2, b2 = bfit.linear_head()
    assert W2.shape[0] == 2 and np.allclose(softmax(Xs @ W2.T + b2, axis=1), bfit.predict_proba(Xs), atol=1e-8)
    with pytest.raises(PatchError, match="no linear head"):
        _fit(digits, "knn").linear_head()
