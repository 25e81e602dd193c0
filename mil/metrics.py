"""Slide-level metrics of a run: AUC with a bootstrap CI, balanced accuracy, F1, fold summary.

AUC and its CI come from ``featstore.core.stats`` so every part of the toolkit reports them alike.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

from featstore.core.stats import auc, bootstrap_ci

KEYS = ("auc", "balanced_accuracy", "f1")


def _score_for_auc(probs: np.ndarray) -> np.ndarray:
    return probs[:, 1] if probs.shape[1] == 2 else probs


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def fold_metrics(y: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of one fold's test slides: probs (n, C), y class indices.

    Binary F1 is for the positive class (``classes[1]``); multiclass F1 is macro. AUC is macro
    one-vs-rest for multiclass. Undefined values (a test set with one class) are ``None``.
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    n_cls = probs.shape[1]
    out: dict = {"n": int(len(y))}
    if len(np.unique(y)) >= 2:
        score = _score_for_auc(probs)
        out["auc"] = _finite(auc(y, score))
        lo, hi = bootstrap_ci(auc, y, score, n_boot=n_boot, seed=seed)
        out["auc_ci"] = [_finite(lo), _finite(hi)]
    else:
        out["auc"], out["auc_ci"] = None, [None, None]
    out["balanced_accuracy"] = _finite(balanced_accuracy_score(y, pred)) if len(y) else None
    avg = "binary" if n_cls == 2 else "macro"
    out["f1"] = _finite(f1_score(y, pred, average=avg, labels=list(range(n_cls)) if avg == "macro" else None,
                                 zero_division=0)) if len(y) else None
    return out


def summarize(folds: Mapping[str, dict], keys: tuple[str, ...] = KEYS) -> dict:
    """``{"folds", "mean", "std"}`` of *keys* (a task's metrics, classification's by default); std
    is the sample std (ddof=1) over folds, 0 for one fold."""
    mean, std = {}, {}
    for k in keys:
        vals = np.array([f[k] for f in folds.values() if f.get(k) is not None], dtype=np.float64)
        mean[k] = float(vals.mean()) if len(vals) else None
        std[k] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
    return {"folds": dict(folds), "mean": mean, "std": std}
