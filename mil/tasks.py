"""What a MIL head predicts, how it learns it and how it is scored: one :class:`Task` per endpoint.

The trainer (:mod:`mil.train`) is the same for every endpoint: bags in a seeded order, one
optimiser step per ``bags_per_step`` bags, early stopping on the validation loss. A task supplies
the rest, fitted on each fold's training slides (:func:`make_task`):

* ``classification``: softmax over the classes, cross-entropy (one bag per step, as always).
* ``survival``: ``cox`` (partial likelihood, Breslow ties, over a batch of bags: a risk set needs
  several slides) or ``nll`` (discrete-time hazards over ``time_bins`` quantile bins of the
  training event times, Zadeh & Schmid 2021). The prediction is a risk score (higher: earlier event).
* ``regression``: one output, mean squared error on the target standardised by the training slides.

Metrics come from the libraries that define them (scikit-survival for Harrell's and Uno's
C-index, the time-dependent AUC, the integrated Brier score, Kaplan-Meier and the log-rank test;
scipy/scikit-learn for correlations, R² and MAE); bootstrap CIs as for the AUC
(:func:`featstore.core.stats.bootstrap_ci`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from featstore.core.labels import Labels
from featstore.core.stats import bootstrap_ci
from mil.errors import LabelsError, MilError

log = logging.getLogger(__name__)

SURVIVAL_LOSSES = ("cox", "nll")


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


@dataclass
class Task:
    """An endpoint fitted on one fold's training rows; see the module docstring."""

    labels: Labels
    train: np.ndarray
    name: str = "task"
    keys: tuple[str, ...] = ()        # the metrics summarised over folds
    bags_per_step: int = 1
    #: (column title, metric key) of the per-fold table `mil train` prints; "_ci" keys are intervals
    columns: tuple[tuple[str, str], ...] = ()

    def n_outputs(self) -> int:
        raise NotImplementedError

    def loss(self, out: Tensor, rows: np.ndarray) -> Tensor:
        """Mean loss of head outputs (B, O) for label rows *rows* (B,)."""
        raise NotImplementedError

    def predict(self, out: np.ndarray) -> np.ndarray:
        """Head outputs (n, O) -> a risk or a value per slide (classification is scored by
        :func:`mil.scoring.score_bags`, the softmax every other caller uses)."""
        raise NotImplementedError

    def fold_metrics(self, test: np.ndarray, pred: np.ndarray, *, n_boot: int, seed: int) -> dict:
        raise NotImplementedError

    def row(self, i: int, pred) -> dict:
        """predictions.csv cells of label row *i* with its prediction *pred* (besides slide_id, fold)."""
        raise NotImplementedError

    def config(self) -> dict:
        """What a reader of the run needs besides the head (bin edges, target scaling)."""
        return {}

    def val_defined(self, rows: np.ndarray) -> bool:
        """Whether the loss can score these validation rows (a Cox loss needs an event)."""
        return len(rows) > 0

    def val_loss(self, out: Tensor, rows: np.ndarray) -> float:
        """The loss on the validation rows (NaN where it is undefined)."""
        with torch.no_grad():
            return float(self.loss(out, rows)) if self.val_defined(rows) else float("nan")


# ------------------------------------------------------------------------------ classification
@dataclass
class Classification(Task):
    name: str = "classification"
    keys: tuple[str, ...] = ("auc", "balanced_accuracy", "f1")
    columns: tuple[tuple[str, str], ...] = (("AUC", "auc"), ("95% CI", "auc_ci"), ("bal. acc.", "balanced_accuracy"),
                                            ("F1", "f1"))

    def __post_init__(self) -> None:
        self._y = torch.as_tensor(self.labels.y, dtype=torch.long)

    def n_outputs(self) -> int:
        return len(self.labels.classes)

    def loss(self, out: Tensor, rows: np.ndarray) -> Tensor:
        return nn.functional.cross_entropy(out, self._y[torch.as_tensor(rows)].to(out.device))

    def fold_metrics(self, test: np.ndarray, pred: np.ndarray, *, n_boot: int, seed: int) -> dict:
        from mil.metrics import fold_metrics

        return fold_metrics(self.labels.y[test], pred, n_boot=n_boot, seed=seed)

    def row(self, i: int, pred) -> dict:
        return {"label": self.labels.classes[self.labels.y[i]], "probs": pred}


# ------------------------------------------------------------------------------ regression
@dataclass
class Regression(Task):
    name: str = "regression"
    keys: tuple[str, ...] = ("pearson", "spearman", "r2", "mae")
    columns: tuple[tuple[str, str], ...] = (("Pearson r", "pearson"), ("95% CI", "pearson_ci"),
                                            ("Spearman", "spearman"), ("R²", "r2"), ("MAE", "mae"))

    def __post_init__(self) -> None:
        v = self.labels.target[self.train]
        self.mean, self.sd = float(v.mean()), float(v.std()) or 1.0
        self._z = torch.as_tensor((self.labels.target - self.mean) / self.sd, dtype=torch.float32)

    def n_outputs(self) -> int:
        return 1

    def loss(self, out: Tensor, rows: np.ndarray) -> Tensor:
        return nn.functional.mse_loss(out[:, 0], self._z[torch.as_tensor(rows)].to(out.device))

    def predict(self, out: np.ndarray) -> np.ndarray:
        return predictions_of("regression", self.config(), out)

    def fold_metrics(self, test: np.ndarray, pred: np.ndarray, *, n_boot: int, seed: int) -> dict:
        return regression_metrics(self.labels.target[test], pred, n_boot=n_boot, seed=seed)

    def row(self, i: int, pred) -> dict:
        return {"target": float(self.labels.target[i]), "prediction": float(pred)}

    def config(self) -> dict:
        return {"target_mean": self.mean, "target_sd": self.sd}


def regression_metrics(y: np.ndarray, pred: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pearson r (with a bootstrap CI), Spearman rho, R² and MAE of predictions against targets."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    out: dict = {"n": int(len(y)), "pearson": None, "pearson_ci": [None, None], "spearman": None}
    if len(y) >= 3 and np.ptp(y) > 0 and np.ptp(pred) > 0:
        out["pearson"] = _finite(pearsonr(y, pred)[0])
        out["spearman"] = _finite(spearmanr(y, pred)[0])
        r = lambda a, b: pearsonr(a, b)[0] if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")  # noqa: E731
        lo, hi = bootstrap_ci(lambda yy, idx: r(yy, pred[idx.astype(int)]), y, np.arange(len(y), dtype=np.float64),
                              n_boot=n_boot, seed=seed, stratified=False)
        out["pearson_ci"] = [_finite(lo), _finite(hi)]
    out["r2"] = _finite(r2_score(y, pred)) if len(y) >= 2 else None
    out["mae"] = _finite(mean_absolute_error(y, pred)) if len(y) else None
    return out


def calibration(y: np.ndarray, pred: np.ndarray) -> dict:
    """Calibration of predictions: the least-squares line true = intercept + slope x predicted
    (slope 1 and intercept 0 when the predictions are calibrated; a slope below 1 means they
    spread too far, the usual sign of overfitting) and the mean error (calibration-in-the-large)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    if len(y) < 3 or np.ptp(pred) == 0:
        return {"slope": None, "intercept": None, "mean_error": _finite(np.mean(pred - y)) if len(y) else None}
    slope, intercept = np.polyfit(pred, y, 1)
    return {"slope": _finite(slope), "intercept": _finite(intercept), "mean_error": _finite(np.mean(pred - y))}


def pooled_regression(results: dict, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every fold's test slides together: the regression metrics and the calibration line."""
    y = np.concatenate([np.asarray(results[f][0], np.float64) for f in results])
    pred = np.concatenate([np.asarray(results[f][1], np.float64) for f in results])
    return {**regression_metrics(y, pred, n_boot=n_boot, seed=seed), "calibration": calibration(y, pred)}


# ------------------------------------------------------------------------------ survival
def surv_struct(target: np.ndarray):
    """scikit-survival's structured array (event bool, time float) of a (n, 2) [time, event] target."""
    from sksurv.util import Surv

    return Surv.from_arrays(event=target[:, 1].astype(bool), time=target[:, 0])


@dataclass
class Survival(Task):
    """Cox partial likelihood or discrete-time NLL; the prediction is a risk score."""

    name: str = "survival"
    keys: tuple[str, ...] = ("c_index", "c_index_uno", "td_auc", "ibs")
    columns: tuple[tuple[str, str], ...] = (("events", "events"), ("C-index", "c_index"), ("95% CI", "c_index_ci"),
                                            ("Uno's C", "c_index_uno"), ("td-AUC", "td_auc"), ("IBS", "ibs"))
    loss_name: str = "cox"
    time_bins: int = 4
    batch: int = 16
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.loss_name not in SURVIVAL_LOSSES:
            raise MilError(f"--survival-loss {self.loss_name!r}: choose {', '.join(SURVIVAL_LOSSES)}")
        t = self.labels.target
        self._time = torch.as_tensor(t[:, 0], dtype=torch.float64)
        self._event = torch.as_tensor(t[:, 1], dtype=torch.float64)
        if self.loss_name == "cox":
            self.bags_per_step = self.batch
        else:
            tr = t[self.train]
            ev = tr[tr[:, 1] > 0, 0]
            inner = np.unique(np.quantile(ev, np.linspace(0, 1, self.time_bins + 1)[1:-1])) if len(ev) else []
            self.edges = np.asarray(inner, np.float64)   # bin k: edges[k-1] <= t < edges[k]
            self._bin = torch.as_tensor(np.searchsorted(self.edges, t[:, 0], side="right"), dtype=torch.long)

    def n_outputs(self) -> int:
        return 1 if self.loss_name == "cox" else len(self.edges) + 1

    def loss(self, out: Tensor, rows: np.ndarray) -> Tensor:
        idx = torch.as_tensor(rows)
        if self.loss_name == "cox":
            return cox_loss(out[:, 0], self._time[idx].to(out.device), self._event[idx].to(out.device))
        return nll_loss(out, self._bin[idx].to(out.device), self._event[idx].to(out.device))

    def val_defined(self, rows: np.ndarray) -> bool:
        return len(rows) > 0 and (self.loss_name != "cox" or bool(self._event[torch.as_tensor(rows)].sum() > 0))

    def row(self, i: int, pred) -> dict:
        t = self.labels.target[i]
        return {"time": float(t[0]), "event": int(t[1]), "risk": float(pred)}

    def config(self) -> dict:
        return {"loss": self.loss_name, **({"time_edges": self.edges.tolist()} if self.loss_name == "nll" else {})}

    def predict(self, out: np.ndarray) -> np.ndarray:
        return predictions_of("survival", self.config(), out)

    def survival_at_bins(self, out: np.ndarray) -> np.ndarray:
        """nll: S(t) at the end of each bin (n, K) from the per-bin hazards."""
        return survival_at_bins(out)

    def fold_metrics(self, test: np.ndarray, pred: np.ndarray, *, n_boot: int, seed: int,
                     train_pred: np.ndarray | None = None, test_out: np.ndarray | None = None) -> dict:
        surv_fn = None
        if self.loss_name == "nll" and test_out is not None:
            s = self.survival_at_bins(test_out)
            surv_fn = lambda times: s[:, np.searchsorted(self.edges, times, side="right")]  # noqa: E731
        elif train_pred is not None:
            surv_fn = breslow_survival(self.labels.target[self.train], train_pred, pred)
        return survival_metrics(self.labels.target[self.train], self.labels.target[test], pred,
                                surv_fn=surv_fn, n_boot=n_boot, seed=seed)


def survival_at_bins(out: np.ndarray) -> np.ndarray:
    """Discrete-time heads: S(t) at the end of each bin (n, K) from the per-bin hazard logits."""
    h = 1.0 / (1.0 + np.exp(-np.asarray(out, np.float64)))
    return np.cumprod(1.0 - h, axis=1)


def predictions_of(task: str, config: dict, out: np.ndarray) -> np.ndarray:
    """A survival or regression head's outputs (n, O) -> one number per bag, from the fold's
    ``task_config`` alone (what a run directory keeps), so `mil predict` and `mil evaluate` read
    back what `mil train` scored: the Cox risk; for the discrete-time loss minus the expected
    number of bins survived (higher: earlier event); the regression target on its own scale."""
    out = np.asarray(out, np.float64)
    if task == "regression":
        return out[:, 0] * float(config.get("target_sd", 1.0)) + float(config.get("target_mean", 0.0))
    if task == "survival":
        return out[:, 0] if config.get("loss", "cox") == "cox" else -survival_at_bins(out).sum(1)
    raise MilError(f"task {task!r} has no single-number prediction; choose survival or regression")


def cox_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood (Breslow ties) per event; 0 when the batch has no event."""
    risk = risk.double()
    at_risk = time[None, :] >= time[:, None]                      # (i, j): j is still at risk at t_i
    masked = risk[None, :].expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    lse = torch.logsumexp(masked, dim=1)
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -(((risk - lse) * event).sum() / n_events).float()


def nll_loss(logits: Tensor, k: Tensor, event: Tensor, eps: float = 1e-7) -> Tensor:
    """Discrete-time survival NLL: an event in bin k costs -log S(k-1) - log h(k); censored in bin
    k costs -log S(k) (survived that bin). Per-bin hazards are sigmoid(logits)."""
    h = torch.sigmoid(logits.double()).clamp(eps, 1 - eps)
    log_s = torch.cumsum(torch.log1p(-h), dim=1)                  # log S at the end of each bin
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], 1)
    rows = torch.arange(len(k), device=logits.device)
    ev = -(log_s_prev[rows, k] + torch.log(h[rows, k]))
    cens = -log_s[rows, k]
    return (event * ev + (1 - event) * cens).mean().float()


def breslow_survival(train_target: np.ndarray, train_risk: np.ndarray, risk: np.ndarray
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """S(t | risk) of a Cox model from Breslow's baseline hazard fitted on the training slides."""
    from sksurv.linear_model.coxph import BreslowEstimator

    est = BreslowEstimator().fit(train_risk, train_target[:, 1].astype(bool), train_target[:, 0])
    fns = est.get_survival_function(risk)
    return lambda times: np.stack([f(times) for f in fns])


def _eval_times(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Up to 3 times (quartiles of the test events) inside both follow-ups, for td-AUC and IBS."""
    ev = test[test[:, 1] > 0, 0]
    if len(ev) == 0:
        return np.zeros(0)
    lo, hi = test[:, 0].min(), min(test[:, 0].max(), train[:, 0].max())
    t = np.unique(np.quantile(ev, [0.25, 0.5, 0.75]))
    return t[(t >= lo) & (t < hi)]


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(event.astype(bool), time, risk)[0])


def survival_metrics(train: np.ndarray, test: np.ndarray, risk: np.ndarray, *,
                     surv_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """Harrell's C (bootstrap CI, resampled within events and censored), Uno's C, the mean
    time-dependent AUC at the test events' quartiles and the integrated Brier score (needs
    *surv_fn*: times -> S(t) (n, T)). Undefined values (no event, no comparable pair) are None."""
    from sksurv.metrics import (concordance_index_ipcw, cumulative_dynamic_auc,
                                integrated_brier_score)

    risk = np.asarray(risk, np.float64)
    time, event = test[:, 0], test[:, 1]
    out: dict = {"n": int(len(test)), "events": int(event.sum()), "c_index": None, "c_index_ci": [None, None],
                 "c_index_uno": None, "td_auc": None, "ibs": None}
    if event.sum() == 0 or len(test) < 2:
        return out
    try:
        out["c_index"] = _finite(harrell_c(time, event, risk))
    except ValueError:      # no comparable pair
        return out
    c = lambda e, idx: harrell_c(time[idx.astype(int)], e, risk[idx.astype(int)])  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):   # a resample without a comparable pair is NaN, dropped
        lo, hi = bootstrap_ci(c, event, np.arange(len(test), dtype=np.float64), n_boot=n_boot, seed=seed)
    out["c_index_ci"] = [_finite(lo), _finite(hi)]
    s_tr, s_te = surv_struct(train), surv_struct(test)
    tau = float(train[:, 0].max())
    try:
        out["c_index_uno"] = _finite(concordance_index_ipcw(s_tr, s_te, risk, tau=tau)[0])
    except ValueError as e:
        log.debug("Uno's C undefined: %s", e)
    times = _eval_times(train, test)
    if len(times):
        try:
            out["td_auc"] = _finite(cumulative_dynamic_auc(s_tr, s_te, risk, times)[1])
        except ValueError as e:
            log.debug("time-dependent AUC undefined: %s", e)
        if surv_fn is not None and len(times) >= 2:
            try:
                out["ibs"] = _finite(integrated_brier_score(s_tr, s_te, surv_fn(times), times))
            except ValueError as e:
                log.debug("integrated Brier score undefined: %s", e)
    return out


def logrank(target: np.ndarray, high: np.ndarray) -> float | None:
    """Log-rank p-value between the high- and low-risk groups (None with one group or no event)."""
    from sksurv.compare import compare_survival

    if high.all() or not high.any() or target[:, 1].sum() == 0:
        return None
    _, p = compare_survival(surv_struct(target), np.where(high, "high", "low"))
    return _finite(p)


def risk_groups(results: dict, cutoffs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (target (n, 2), high-risk flag): a slide is high risk when its risk exceeds its
    fold model's median risk on that fold's training slides (a cut fixed before the test slides)."""
    target = np.concatenate([results[f][0] for f in results])
    high = np.concatenate([np.asarray(results[f][1]) > cutoffs[f] for f in results])
    return target, high


def pooled_survival(results: dict, cutoffs: dict) -> dict:
    """Risk groups over every fold's test slides: sizes, events and the log-rank p between them."""
    target, high = risk_groups(results, cutoffs)
    return {"n_high": int(high.sum()), "n_low": int((~high).sum()),
            "events_high": int(target[high, 1].sum()), "events_low": int(target[~high, 1].sum()),
            "logrank_p": logrank(target, high)}


# ------------------------------------------------------------------------------ registry
TASK_TYPES: dict[str, type[Task]] = {"classification": Classification, "survival": Survival,
                                     "regression": Regression}


def make_task(labels: Labels, train: np.ndarray, *, survival_loss: str = "cox", time_bins: int = 4,
              cox_batch: int = 16) -> Task:
    """The task of *labels* (``labels.task``), fitted on the training rows *train*."""
    if labels.task not in TASK_TYPES:
        raise MilError(f"task {labels.task!r}: choose {', '.join(TASK_TYPES)}")
    if labels.task == "survival":
        if labels.target[train, 1].sum() < 1:
            raise LabelsError(f"{labels.path}: a fold's training slides hold no event; use fewer folds")
        return Survival(labels, train, loss_name=survival_loss, time_bins=time_bins, batch=cox_batch)
    return TASK_TYPES[labels.task](labels, train)


def check_options(task: str, model: str, monitor: str) -> None:
    """One line before any work for options a *task* cannot take (max pooling, AUC monitoring)."""
    if task == "classification":
        return
    if model == "max":
        raise MilError("model 'max' picks a bag's instance by its class logits, so it needs classes; for "
                       "survival or regression use abmil, abmil-gated or mean")
    if monitor == "val_auc":
        raise MilError(f"--monitor val_auc is for classification; a {task} run monitors val_loss")


def task_keys(task: str) -> tuple[str, ...]:
    """The metrics a run of *task* summarises over folds."""
    return TASK_TYPES[task].keys if task in TASK_TYPES else ()


def task_columns(task: str) -> tuple[tuple[str, str], ...]:
    """(title, metric key) of the per-fold summary table of a *task* run."""
    return TASK_TYPES[task].columns


__all__ = ["Task", "Classification", "Regression", "Survival", "TASK_TYPES", "SURVIVAL_LOSSES", "make_task",
           "task_keys", "task_columns", "check_options", "cox_loss", "nll_loss", "survival_metrics", "regression_metrics",
           "harrell_c", "logrank", "surv_struct", "breslow_survival", "risk_groups", "pooled_survival",
           "pooled_regression", "calibration", "predictions_of", "survival_at_bins"]
