"""Patch classification metrics with bootstrap CIs.

Point estimates are scikit-learn's (``zero_division=0``): accuracy, balanced accuracy (mean
recall over the classes present in ``y``), macro precision / recall / F1 (over the classes in
``y`` or the predictions, scikit-learn's default set), per-class F1, the confusion matrix (rows
= true class, columns = predicted, every class), NLL (mean -log p of the true class, floored at 1e-15), ECE (:mod:`mil.patches.calibration`) and
macro one-vs-rest AUC (:func:`featstore.core.stats.auc`) when ``y`` holds two classes or more.

The 95 % CIs of accuracy, balanced accuracy and macro F1 are :func:`featstore.core.stats.bootstrap_ci`
percentile intervals with stratified resampling (class counts kept). Its metric receives
``(y_true, y_score)``; here ``y_score`` is the predicted class (as float), and each resample is
scored from its confusion matrix with the same definitions as scikit-learn (checked by the
tests), which is ~50x faster than calling scikit-learn a thousand times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from featstore.core.stats import auc, bootstrap_ci
from mil.patches.calibration import ece_from_proba
from mil.patches.errors import PatchError

CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _from_confusion(cm: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy and macro F1 of a confusion matrix, as scikit-learn defines them."""
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    labels = present | (predicted > 0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)
    return {"accuracy": float(tp.sum() / cm.sum()),
            "balanced_accuracy": float((tp[present] / support[present]).mean()),
            "macro_f1": float(f1[labels].mean())}


def _boot_metric(name: str, n_classes: int):
    def metric(y_true: np.ndarray, y_score: np.ndarray) -> float:
        return _from_confusion(_confusion(y_true.astype(np.int64), y_score.astype(np.int64), n_classes))[name]

    metric.__name__ = name
    return metric


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _check(y, proba, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(proba, np.float64)
    t = np.asarray(y)
    if p.ndim != 2 or p.shape[1] != len(classes) or len(classes) < 2:
        raise PatchError(f"proba has shape {p.shape} but there are {len(classes)} classes {list(classes)[:5]}; "
                         "pass (N, C) probabilities with one column per class (C >= 2)")
    if t.ndim != 1 or len(t) != len(p) or len(t) == 0:
        raise PatchError(f"y has shape {t.shape} and proba {p.shape}: pass one label per row (N >= 1)")
    if not np.all(np.isfinite(p)):
        raise PatchError("proba contains nan or inf; the model diverged or the inputs are broken")
    t = t.astype(np.int64)
    if t.min() < 0 or t.max() >= len(classes):
        raise PatchError(f"labels must be class indices 0..{len(classes) - 1}, got {int(t.min())}..{int(t.max())}")
    return t, p


def _balanced_accuracy(t: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's, without its warning when a predicted class is absent from *t* (it is left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(t, pred))


def _auc(t: np.ndarray, p: np.ndarray) -> float | None:
    if len(np.unique(t)) < 2:
        return None
    return _finite(auc(t, p[:, 1] if p.shape[1] == 2 else p))


def classification_metrics(y, proba, classes: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                           n_bins: int = 15) -> dict:
    """Metrics of predictions ``proba.argmax(1)`` against class indices *y* (module docstring).

    Returns plain data: ``accuracy``, ``balanced_accuracy``, ``macro_precision``,
    ``macro_recall``, ``macro_f1``, ``per_class_f1`` {class: value, None for a class absent from
    both y and the predictions}, ``confusion`` (list of lists, rows = true), ``n``, ``auc``
    (None with one class in y), ``nll``, ``ece`` (``n_bins`` bins) and ``<metric>_ci`` = [lo, hi]
    for accuracy, balanced accuracy and macro F1 (``n_boot=0``: no CIs). Deterministic for *seed*.
    """
    t, p = _check(y, proba, classes)
    n_cls = len(classes)
    pred = p.argmax(axis=1)
    prec, rec, f1, _ = precision_recall_fscore_support(t, pred, average="macro", zero_division=0)
    per_class = f1_score(t, pred, average=None, labels=list(range(n_cls)), zero_division=0)
    seen = set(t.tolist()) | set(pred.tolist())
    out: dict = {
        "n": int(len(t)),
        "accuracy": float(accuracy_score(t, pred)),
        "balanced_accuracy": _balanced_accuracy(t, pred),
        "macro_precision": float(prec), "macro_recall": float(rec), "macro_f1": float(f1),
        "per_class_f1": {str(c): (float(per_class[i]) if i in seen else None) for i, c in enumerate(classes)},
        "confusion": confusion_matrix(t, pred, labels=list(range(n_cls))).tolist(),
        "auc": _auc(t, p),
        "nll": float(-np.log(np.clip(p[np.arange(len(t)), t], 1e-15, None)).mean()),
        "ece": ece_from_proba(t, p, n_bins),
    }
    for name in CI_METRICS:
        if n_boot > 0:
            lo, hi = bootstrap_ci(_boot_metric(name, n_cls), t, pred.astype(np.float64), n_boot=n_boot,
                                  seed=seed, stratified=True)
            out[f"{name}_ci"] = [_finite(lo), _finite(hi)]
    return out


__all__ = ["CI_METRICS", "classification_metrics"]
