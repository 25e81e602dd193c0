"""Probes on patch embeddings, their hyper-parameter chosen on the validation split.

* ``logreg``: StandardScaler + L2 logistic regression (scikit-learn, lbfgs, multinomial) for
  each C of a grid (:data:`analysis.probe.DEFAULT_CS`, 1e-4 .. 1e2), warm-started from the
  previous C. ``analysis.probe.LinearProbe`` chooses C by inner cross-validation on the training
  data; patch studies have a validation split instead, so C is chosen on it here.
* ``knn``: ``analysis.probe.KNNProbe`` (standardised features, cosine distance, uniform votes)
  for each k of a grid; the neighbours of the validation patches are found once for the largest
  k and every k is scored from them.

The chosen value maximises validation balanced accuracy, ties broken by the lower validation
log-loss, then the stronger regularisation (smaller C, larger k); ``select="log_loss"`` ranks by
log-loss first. The returned model is the one fitted on the training patches at that value
(validation patches stay unseen, for temperature scaling and model selection downstream).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from analysis.probe import DEFAULT_CS, KNNProbe
from mil.patches.errors import PatchError

log = logging.getLogger(__name__)

METHODS = ("logreg", "knn")
SELECT = ("balanced_accuracy", "log_loss")
DEFAULT_KS = (1, 3, 5, 10, 20, 50)
KNN_FLOOR = 1e-4   # kNN log-probabilities are floored here, so temperature scaling stays finite


@dataclass
class ProbeFit:
    """A fitted probe: the chosen hyper-parameter, the validation sweep, and the model."""

    method: str
    param: str                    # "C" (logreg) or "k" (knn)
    value: float
    n_classes: int
    sweep: list[dict] = field(default_factory=list)   # [{param: v, "balanced_accuracy", "log_loss"}]
    model: object = field(default=None, repr=False)

    def predict_proba(self, X) -> np.ndarray:
        """(N, n_classes) class probabilities."""
        return np.asarray(self.model.predict_proba(np.asarray(X, np.float64)), np.float64)

    def logits(self, X) -> np.ndarray:
        """(N, n_classes) logits: logreg's decision function (binary: [0, d], so softmax = its
        probabilities); kNN's log-probabilities floored at :data:`KNN_FLOOR`."""
        X = np.asarray(X, np.float64)
        if self.method == "knn":
            return np.log(np.maximum(self.predict_proba(X), KNN_FLOOR))
        d = np.asarray(self.model.decision_function(X), np.float64)
        return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def linear_head(self) -> tuple[np.ndarray, np.ndarray]:
        """logreg only: (W (n_classes, D), b (n_classes,)) with ``X @ W.T + b == logits(X)`` on raw
        features (the standardisation folded in), to start a fine-tune's head from the probe."""
        if self.method != "logreg":
            raise PatchError(f"a {self.method} probe has no linear head; start the head from a logreg probe")
        scaler, lr = self.model.named_steps["standardscaler"], self.model.named_steps["logisticregression"]
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        coef = lr.coef_ / scale
        bias = lr.intercept_ - coef @ scaler.mean_
        if coef.shape[0] == 1:                       # binary: logits [0, d]
            coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
        return coef, bias

    def to_dict(self) -> dict:
        return {"method": self.method, "param": self.param, "value": self.value, "sweep": self.sweep}


def _check(X_train, y_train, X_val, y_val, n_classes: int):
    Xt, Xv = np.asarray(X_train, np.float64), np.asarray(X_val, np.float64)
    yt, yv = np.asarray(y_train).astype(np.int64), np.asarray(y_val).astype(np.int64)
    if Xt.ndim != 2 or Xv.ndim != 2 or Xt.shape[1] != Xv.shape[1] or len(Xt) != len(yt) or len(Xv) != len(yv):
        raise PatchError(f"X_train {Xt.shape}, y_train {yt.shape}, X_val {Xv.shape}, y_val {yv.shape}: pass "
                         "(N, D) features with one label per row, the same D for train and val")
    if len(Xv) == 0:
        raise PatchError("the validation split is empty; a probe's C / k is chosen on it (give val > 0)")
    if not (np.isfinite(Xt).all() and np.isfinite(Xv).all()):
        raise PatchError("features contain nan or inf; re-extract them or drop the broken patches")
    missing = sorted(set(range(n_classes)) - set(yt.tolist()))
    if missing or yt.max() >= n_classes or min(yt.min(), yv.min()) < 0 or yv.max() >= n_classes:
        raise PatchError(f"training labels must cover every class 0..{n_classes - 1} (missing {missing}) and "
                         "all labels must be class indices below n_classes")
    return Xt, yt, Xv, yv


def _score(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    p = np.clip(proba[np.arange(len(y)), y], 1e-15, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a predicted class absent from val
        ba = float(balanced_accuracy_score(y, proba.argmax(axis=1)))
    return {"balanced_accuracy": ba, "log_loss": float(-np.log(p).mean())}


def _best(sweep: list[dict], param: str, select: str, strong_first: bool) -> int:
    """Index of the chosen sweep entry (see the module docstring)."""
    def key(i: int):
        s = sweep[i]
        reg = s[param] if strong_first else -s[param]   # smaller C / larger k = stronger
        if select == "log_loss":
            return (s["log_loss"], -s["balanced_accuracy"], reg)
        return (-s["balanced_accuracy"], s["log_loss"], reg)

    return min(range(len(sweep)), key=key)


def _fit_logreg(Xt, yt, Xv, yv, *, seed: int, Cs: Sequence[float], select: str, max_iter: int,
                class_weight) -> tuple[list[dict], Pipeline, float]:
    scaler = StandardScaler().fit(Xt)
    St, Sv = scaler.transform(Xt), scaler.transform(Xv)
    lr = LogisticRegression(max_iter=max_iter, class_weight=class_weight, warm_start=True, random_state=seed)
    sweep, models = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for c in sorted(float(c) for c in Cs):
            lr.set_params(C=c).fit(St, yt)
            sweep.append({"C": c, **_score(yv, lr.predict_proba(Sv))})
            models.append(copy.deepcopy(lr))
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("logistic regression did not converge within max_iter=%d for some C; the "
                    "largest Cs may be under-fitted", max_iter)
    best = _best(sweep, "C", select, strong_first=True)
    model = Pipeline([("standardscaler", scaler), ("logisticregression", models[best])])
    return sweep, model, sweep[best]["C"]


def _fit_knn(Xt, yt, Xv, yv, *, n_classes: int, ks: Sequence[int], select: str) -> tuple[list[dict], object, int]:
    ks = sorted({int(min(k, len(Xt))) for k in ks if int(k) >= 1})
    if not ks:
        raise PatchError(f"ks={list(ks)}: give neighbour counts >= 1")
    scaler = StandardScaler().fit(Xt)
    nn = NearestNeighbors(n_neighbors=ks[-1], metric="cosine").fit(scaler.transform(Xt))
    _, nbr = nn.kneighbors(scaler.transform(Xv))
    onehot = np.eye(n_classes)[yt[nbr]]            # (n_val, k_max, C)
    votes = np.cumsum(onehot, axis=1)               # votes among the first j + 1 neighbours
    sweep = [{"k": k, **_score(yv, votes[:, k - 1] / k)} for k in ks]
    best = _best(sweep, "k", select, strong_first=False)
    k = int(sweep[best]["k"])
    return sweep, KNNProbe(n_neighbors=k, metric="cosine").fit(Xt, yt), k


def fit_probe(method: str, X_train, y_train, X_val, y_val, *, n_classes: int, seed: int = 0,
              select: str = "balanced_accuracy", Cs: Sequence[float] = DEFAULT_CS,
              ks: Sequence[int] = DEFAULT_KS, max_iter: int = 1000, class_weight: str | None = None) -> ProbeFit:
    """Fit a ``logreg`` (C sweep) or ``knn`` (k sweep) probe on train, chosen on val (module docstring).

    Labels are class indices 0..n_classes-1 and every class must occur in ``y_train``.
    ``class_weight="balanced"`` reweights logistic regression by inverse class frequency (the
    default None keeps probabilities calibrated to the training prevalence).
    """
    if method not in METHODS:
        raise PatchError(f"unknown probe {method!r}; choose one of {', '.join(METHODS)}")
    if select not in SELECT:
        raise PatchError(f"select={select!r}: choose one of {', '.join(SELECT)}")
    Xt, yt, Xv, yv = _check(X_train, y_train, X_val, y_val, int(n_classes))
    if method == "logreg":
        sweep, model, value = _fit_logreg(Xt, yt, Xv, yv, seed=seed, Cs=Cs, select=select,
                                          max_iter=max_iter, class_weight=class_weight)
        return ProbeFit("logreg", "C", float(value), int(n_classes), sweep, model)
    sweep, model, k = _fit_knn(Xt, yt, Xv, yv, n_classes=int(n_classes), ks=ks, select=select)
    return ProbeFit("knn", "k", float(k), int(n_classes), sweep, model)


__all__ = ["DEFAULT_KS", "KNN_FLOOR", "METHODS", "ProbeFit", "fit_probe"]
