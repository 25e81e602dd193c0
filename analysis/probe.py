"""Linear and kNN probes: how linearly separable (or locally consistent) are stored embeddings?

* Estimators are plain scikit-learn classifiers: :class:`LinearProbe` (standardised features,
  logistic regression with C chosen by inner stratified CV) and :class:`KNNProbe`.
* Slide-level inputs: tile features pooled per slide (``mean``, or ``attention`` = softmax of a
  mil run's raw attention, from its attention.npz). Tile-level inputs: a CSV
  ``slide_id,x,y,label`` matched to the store's coords.
* :func:`evaluate_probe` runs K-fold CV (grouped by patient for slides, by slide for tiles, so
  no group is on both sides), and reports out-of-fold AUC, balanced accuracy and F1 with
  stratified bootstrap CIs.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.errors import AnalysisError
from featstore.core.stats import auc, bootstrap_ci
from featstore.core.labels import NA, Row, read_labels, read_table, rows_text, sort_classes

log = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


# --------------------------------------------------------------------------- estimators
class LinearProbe(ClassifierMixin, BaseEstimator):
    """StandardScaler + logistic regression (L2), C picked by inner stratified CV on log-loss.

    newton-cholesky (default) converges in a few iterations for the D <= ~2k embeddings here and
    is ~10x faster than lbfgs on small cohorts; pass solver="lbfgs" for very wide features.
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, inner_cv: int = 3, max_iter: int = 5000,
                 class_weight: str | None = "balanced", solver: str = "newton-cholesky", seed: int = 0):
        self.Cs = Cs
        self.solver = solver
        self.inner_cv = inner_cv
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.seed = seed

    def fit(self, X, y) -> "LinearProbe":
        X, y = np.asarray(X, np.float64), np.asarray(y)
        self.classes_, counts = np.unique(y, return_counts=True)
        if len(self.classes_) < 2:
            raise AnalysisError(f"a probe needs two classes in the training data; got {self.classes_.tolist()}")
        k = int(min(self.inner_cv, counts.min()))
        pipe = make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=self.max_iter, class_weight=self.class_weight, solver=self.solver, random_state=self.seed))
        if k >= 2:  # scaler refit inside each inner fold: no leakage into the choice of C
            cv = StratifiedKFold(k, shuffle=True, random_state=self.seed)
            search = GridSearchCV(pipe, {"logisticregression__C": [float(c) for c in self.Cs]}, cv=cv,
                                  scoring="neg_log_loss").fit(X, y)
            self.pipeline_ = search.best_estimator_
            self.C_ = float(search.best_params_["logisticregression__C"])
        else:  # too few samples of a class for inner CV: middle of the grid
            self.C_ = float(np.median(self.Cs))
            self.pipeline_ = pipe.set_params(logisticregression__C=self.C_).fit(X, y)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.pipeline_.predict_proba(np.asarray(X, np.float64))

    def predict(self, X) -> np.ndarray:
        return self.pipeline_.predict(np.asarray(X, np.float64))


class KNNProbe(ClassifierMixin, BaseEstimator):
    """k nearest neighbours (cosine distance by default) on standardised features."""

    def __init__(self, n_neighbors: int = 10, metric: str = "cosine", standardize: bool = True):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.standardize = standardize

    def fit(self, X, y) -> "KNNProbe":
        X, y = np.asarray(X, np.float64), np.asarray(y)
        self.classes_ = np.unique(y)
        k = int(min(self.n_neighbors, len(X)))
        knn = KNeighborsClassifier(n_neighbors=k, metric=self.metric)
        steps = [StandardScaler(), knn] if self.standardize else [knn]
        self.pipeline_ = make_pipeline(*steps).fit(X, y)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.pipeline_.predict_proba(np.asarray(X, np.float64))

    def predict(self, X) -> np.ndarray:
        return self.pipeline_.predict(np.asarray(X, np.float64))


PROBES: dict[str, Callable[..., BaseEstimator]] = {"logreg": LinearProbe, "knn": KNNProbe}


def make_probe(name: str, seed: int = 0, **kw) -> BaseEstimator:
    if name not in PROBES:
        raise AnalysisError(f"unknown probe {name!r}; choose one of {', '.join(PROBES)}")
    if name == "logreg":
        kw.setdefault("seed", seed)
    return PROBES[name](**kw)


# --------------------------------------------------------------------------- labels
TILE_COLUMNS = ("slide_id", "x", "y", "label")


@dataclass
class SlideLabels:
    slide_ids: list[str]
    labels: list[str]
    groups: list[str]  # patient_id, or the slide id


def is_tile_labels(path: str | Path) -> bool:
    """True when the CSV has x and y columns (tile-level labels)."""
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        head = [c.strip() for c in (next(csv.reader(fh), []) or [])]
    return "x" in head and "y" in head


def read_slide_labels(path: str | Path) -> SlideLabels:
    """``slide_id,label[,patient_id][,split|fold]`` by mil's labels reader (the same rules as `mil train`)."""
    lab = read_labels(path)
    return SlideLabels(list(lab.slide_ids), [lab.classes[i] for i in lab.y], list(lab.patients))


def read_tile_labels(path: str | Path) -> list[Row]:
    """Rows of a ``slide_id,x,y,label`` CSV (BOM-safe, extra columns ignored); an empty label is an error."""
    rows = read_table(path, TILE_COLUMNS, extra="ignore", what="tile labels file")
    unlabelled = [r.line for r in rows if r["label"].lower() in NA]
    if unlabelled:
        raise AnalysisError(f"{path}: empty/NaN label on line(s) {rows_text(unlabelled)}; "
                            "fill them or drop those rows")
    if not rows:
        raise AnalysisError(f"{path}: no labelled rows; add one line per tile (slide_id,x,y,label)")
    return rows


def load_tile_labels(store, path: str | Path, encoder: str, minus: int,
                     weights: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Features of labelled tiles: (X (M, D) float32, labels (M,), slide id per row, row ids).

    Rows of the CSV are matched to the store's coords (level-0 top-left x, y) of their slide;
    unmatched rows are counted and logged, none matched is an error.
    """
    rows = read_tile_labels(path)
    by_slide: dict[str, list[Row]] = {}
    for r in rows:
        by_slide.setdefault(r["slide_id"], []).append(r)
    X, y, g, ids = [], [], [], []
    unmatched = 0
    known = set(store.slide_ids())
    for sid, rs in by_slide.items():
        if sid not in known or not store.has_features(sid, encoder, minus, weights):
            unmatched += len(rs)
            continue
        coords = store.coords(sid)
        index = {(int(x), int(yy)): i for i, (x, yy) in enumerate(coords)}
        feats = store.features(sid, encoder, minus, weights)
        for r in rs:
            try:
                i = index.get((int(float(r["x"])), int(float(r["y"]))))
            except ValueError:
                raise AnalysisError(f"{path}: line {r.line}: x/y of slide {sid!r} must be integers "
                                    f"(level-0 px), got {r['x']!r}, {r['y']!r}") from None
            if i is None:
                unmatched += 1
                continue
            X.append(feats[i])
            y.append(r["label"])
            g.append(sid)
            ids.append(f"{sid}:{r['x']}:{r['y']}")
    if not X:
        raise AnalysisError(f"{path}: no row matches a stored tile (slide_id and level-0 x,y of a tile's "
                            f"top-left corner, with {encoder} minus{minus} features)")
    if unmatched:
        log.warning("%s: %d of %d labelled tiles match no stored tile and are ignored", path, unmatched, len(rows))
    return np.stack(X).astype(np.float32), np.asarray(y), np.asarray(g), ids


# --------------------------------------------------------------------------- pooling
def load_attention(run_dir: str | Path) -> dict[str, list[np.ndarray]]:
    """Raw attention per slide from a mil run's attention.npz (``"<fold>/<slide_id>"`` keys)."""
    p = Path(run_dir) / "attention.npz"
    if not p.is_file():
        raise AnalysisError(f"{run_dir}: no attention.npz; attention pooling needs a `mil train` run "
                            "with an attention head")
    out: dict[str, list[np.ndarray]] = {}
    with np.load(p, allow_pickle=False) as z:
        for key in z.files:
            _, _, sid = key.partition("/")
            out.setdefault(sid or key, []).append(np.asarray(z[key], np.float64))
    return out


def mean_pool(feats: np.ndarray, attention: list[np.ndarray] | None = None) -> np.ndarray:
    return feats.astype(np.float64).mean(axis=0)


def attention_pool(feats: np.ndarray, attention: list[np.ndarray] | None = None) -> np.ndarray:
    """Softmax(raw attention)-weighted mean; several folds / branches are averaged."""
    if not attention:
        raise AnalysisError("attention pooling needs the run's attention for every slide")
    ws = []
    for a in attention:
        a = a.reshape(len(a), -1) if a.ndim > 1 else a[:, None]
        if len(a) != len(feats):
            raise AnalysisError(f"attention has {len(a)} rows but the slide has {len(feats)} tiles; "
                                "was the run trained on this store?")
        ws.append(softmax(np.asarray(a, np.float64), axis=0).mean(axis=1))
    w = np.mean(ws, axis=0)
    return w @ feats.astype(np.float64)


POOLS: dict[str, Callable[[np.ndarray, list[np.ndarray] | None], np.ndarray]] = {
    "mean": mean_pool, "attention": attention_pool}


def pool_slides(store, encoder: str, minus: int, weights: str | None = None, slides: Sequence[str] | None = None,
                pool: str = "mean", run_dir: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """One pooled vector per slide: (slide ids kept, X (n, D) float64).

    Slides without the features (or, for attention pooling, without attention in the run) are
    skipped and logged; an explicit ``slides`` list missing from the store is an error.
    """
    if pool not in POOLS:
        raise AnalysisError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    attn = None
    if pool == "attention":
        if run_dir is None:
            raise AnalysisError("attention pooling needs --run RUN_DIR (a `mil train` run over this store)")
        attn = load_attention(run_dir)
    ids = list(slides) if slides is not None else store.slide_ids()
    kept, rows, skipped = [], [], []
    for sid in ids:
        if not store.has_features(sid, encoder, minus, weights) or (attn is not None and sid not in attn):
            skipped.append(sid)
            continue
        f = store.features(sid, encoder, minus, weights)
        if len(f) == 0:
            skipped.append(sid)
            continue
        rows.append(POOLS[pool](f, attn.get(sid) if attn is not None else None))
        kept.append(sid)
    if skipped:
        log.warning("pooling skipped %d slide(s) without %s features%s: %s", len(skipped), encoder,
                    " or attention" if attn is not None else "", ", ".join(skipped[:5]))
    if not kept:
        raise AnalysisError(f"{store.path}: no slide has {encoder} minus{minus} features"
                            + (" and attention in the run" if attn is not None else ""))
    return kept, np.stack(rows)


# --------------------------------------------------------------------------- evaluation
@dataclass
class ProbeResult:
    probe: str
    classes: list[str]
    n: int
    folds: dict[str, dict]
    metrics: dict[str, dict]  # name -> {"value", "ci": [lo, hi]}
    ids: list[str] = field(default_factory=list)
    y: np.ndarray | None = None  # class indices
    proba: np.ndarray | None = None  # (n, C) out-of-fold probabilities
    fold_of: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("ids", "y", "proba", "fold_of"):
            d.pop(k)
        return d


def _scores(proba: np.ndarray) -> np.ndarray:
    return proba[:, 1] if proba.shape[1] == 2 else proba


def _metric_fns(n_classes: int) -> dict[str, Callable]:
    avg = "binary" if n_classes == 2 else "macro"
    pred = (lambda s: (s >= 0.5).astype(int)) if n_classes == 2 else (lambda s: s.argmax(axis=1))
    return {
        "auc": auc,
        "balanced_accuracy": lambda y, s: float(balanced_accuracy_score(y, pred(s))),
        "f1": lambda y, s: float(f1_score(y, pred(s), average=avg, zero_division=0)),
    }


def evaluate_probe(X, labels, *, probe: str | BaseEstimator = "logreg", folds: int = 5, seed: int = 0,
                   groups=None, ids: Sequence[str] | None = None, n_boot: int = 1000,
                   classes: Sequence[str] | None = None) -> ProbeResult:
    """Out-of-fold predictions by (grouped) stratified K-fold; metrics with bootstrap CIs.

    ``labels`` may be strings; the class order is ``classes`` (default: sorted, numeric when
    possible), and for two classes the second is positive.
    """
    X = np.asarray(X, np.float64)
    labels = np.asarray([str(v) for v in labels])
    classes = list(classes) if classes is not None else sort_classes(labels.tolist())
    if len(classes) < 2:
        raise AnalysisError(f"probe needs at least two classes; the labels have only {classes}")
    cls_index = {c: i for i, c in enumerate(classes)}
    y = np.array([cls_index[v] for v in labels])
    counts = np.bincount(y, minlength=len(classes))
    groups = np.asarray(groups if groups is not None else np.arange(len(y)).astype(str))
    k = int(min(folds, counts.min(), len(np.unique(groups))))
    if k < 2:
        raise AnalysisError(f"{folds}-fold CV impossible: smallest class has {counts.min()} sample(s); "
                            "label more slides/tiles")
    if k < folds:
        log.warning("using %d folds instead of %d (smallest class has %d samples)", k, folds, counts.min())
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    est = make_probe(probe, seed=seed) if isinstance(probe, str) else probe
    proba = np.full((len(y), len(classes)), np.nan)
    fold_of = [""] * len(y)
    fold_info: dict[str, dict] = {}
    fns = _metric_fns(len(classes))
    for f, (tr, te) in enumerate(splitter.split(X, y, groups)):
        model = clone(est).fit(X[tr], y[tr])
        p = np.zeros((len(te), len(classes)))
        p[:, model.classes_] = model.predict_proba(X[te])
        proba[te] = p
        name = f"fold{f}"
        for i in te:
            fold_of[i] = name
        info: dict = {"n": int(len(te))}
        try:
            info["auc"] = fns["auc"](y[te], _scores(p))
        except AnalysisError:
            info["auc"] = None  # one class in this test fold
        if hasattr(model, "C_"):
            info["C"] = model.C_
        fold_info[name] = info
    s = _scores(proba)
    metrics = {}
    for name, fn in fns.items():
        metrics[name] = {"value": float(fn(y, s)),
                         "ci": list(bootstrap_ci(fn, y, s, n_boot=n_boot, seed=seed))}
    params = est.get_params() if hasattr(est, "get_params") else {}
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    return ProbeResult(probe if isinstance(probe, str) else type(probe).__name__, classes, int(len(y)),
                       fold_info, metrics, list(ids) if ids is not None else [str(i) for i in range(len(y))],
                       y, proba, fold_of, params)


def write_predictions(result: ProbeResult, path: str | Path) -> Path:
    """probe.csv: id,label,fold, P(positive) (binary) or prob_<class> columns."""
    path = Path(path)
    binary = len(result.classes) == 2
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "fold"] + (["probability"] if binary else [f"prob_{c}" for c in result.classes]))
        for i, rid in enumerate(result.ids):
            probs = [result.proba[i, 1]] if binary else list(result.proba[i])
            w.writerow([rid, result.classes[result.y[i]], result.fold_of[i]] + [f"{p:.6f}" for p in probs])
    return path
