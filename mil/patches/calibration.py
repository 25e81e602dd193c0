"""Calibration of patch classifiers: confidence, ECE, reliability bins, temperature scaling, plots.

* Confidence is the maximum softmax probability, the prediction its argmax.
* ECE (Guo et al. 2017, "On calibration of modern neural networks"): ``n_bins`` equal-width bins
  over [0, 1]; ECE = sum over bins B of |B| / n * |acc(B) - conf(B)|, empty bins contributing 0.
  Bins are closed on the right: bin m (0-based) holds (m / M, (m + 1) / M], and the first bin
  also holds confidence 0, i.e. [0, 1 / M].
* Temperature scaling (Guo et al. 2017): one scalar T > 0 dividing the logits, fitted by
  minimising the NLL of softmax(logits / T) on the validation split (bounded Brent search over
  log T, scipy.optimize.minimize_scalar). It leaves the argmax, hence accuracy, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from mil.patches.errors import PatchError

log = logging.getLogger(__name__)

T_BOUNDS = (1e-2, 1e2)


def _proba(proba) -> np.ndarray:
    p = np.asarray(proba, np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise PatchError(f"probabilities must be (N, C) with N >= 1 and C >= 2, got shape {p.shape}")
    return p


def max_softmax(proba) -> tuple[np.ndarray, np.ndarray]:
    """(confidence = max class probability, predicted class = its argmax) per row of (N, C) *proba*."""
    p = _proba(proba)
    pred = p.argmax(axis=1)
    return p[np.arange(len(p)), pred], pred.astype(np.int64)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: edges (M + 1,), and per bin the count, the accuracy and the
    mean confidence of its predictions (nan for an empty bin)."""

    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        """sum_B |B| / n * |acc(B) - conf(B)| over the non-empty bins."""
        m = self.count > 0
        gap = np.abs(self.accuracy[m] - self.confidence[m])
        return float((self.count[m] * gap).sum() / self.n)

    def to_dict(self) -> dict:
        nan_none = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {"edges": self.edges.tolist(), "count": self.count.tolist(),
                "accuracy": nan_none(self.accuracy), "confidence": nan_none(self.confidence), "ece": self.ece}


def bin_index(confidence, n_bins: int = 15) -> np.ndarray:
    """The bin (0..n_bins-1) of each confidence: (m / M, (m + 1) / M], 0 in the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability_bins(confidence, correct, n_bins: int = 15) -> ReliabilityBins:
    """Counts, accuracy and mean confidence per equal-width bin (see the module docstring)."""
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct).ravel().astype(np.float64)
    if len(conf) == 0 or len(conf) != len(ok):
        raise PatchError(f"confidence ({len(conf)}) and correct ({len(ok)}) must be non-empty and "
                         "of equal length (one per prediction)")
    if int(n_bins) < 1:
        raise PatchError(f"n_bins={n_bins}: need at least one bin (15 is the usual choice)")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise PatchError("confidences must lie in [0, 1] (max softmax probabilities), got values outside")
    n_bins = int(n_bins)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, ok, minlength=n_bins) / count
        mean_conf = np.bincount(idx, conf, minlength=n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), count, acc, mean_conf)


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE of predictions with these confidences and correctness (Guo et al. 2017; module docstring)."""
    return reliability_bins(confidence, correct, n_bins).ece


def ece_from_proba(y, proba, n_bins: int = 15) -> float:
    """ECE of the max-softmax predictions of (N, C) *proba* against class indices *y*."""
    conf, pred = max_softmax(proba)
    return expected_calibration_error(conf, pred == np.asarray(y), n_bins)


# ------------------------------------------------------------------ temperature scaling
def _logits(logits, y=None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise PatchError(f"logits must be (N, C) with N >= 1 and C >= 2, got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise PatchError("logits contain nan or +inf; the model diverged or the inputs are broken")
    if y is None:
        return z, None
    t = np.asarray(y).astype(np.int64).ravel()
    if len(t) != len(z) or t.min() < 0 or t.max() >= z.shape[1]:
        raise PatchError(f"labels must be {len(z)} class indices in 0..{z.shape[1] - 1}")
    return z, t


def negative_log_likelihood(logits, y, temperature: float = 1.0) -> float:
    """Mean NLL of the true classes under softmax(logits / temperature)."""
    z, t = _logits(logits, y)
    return float(-log_softmax(z / float(temperature), axis=1)[np.arange(len(t)), t].mean())


def fit_temperature(logits, y) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (validation) *logits* and labels *y*.

    Bounded Brent search over log T in [log 0.01, log 100]; a T on a bound is logged (e.g. a
    perfectly separated validation set pushes T towards 0).
    """
    z, t = _logits(logits, y)
    rows = np.arange(len(t))
    nll = lambda log_t: float(-log_softmax(z / np.exp(log_t), axis=1)[rows, t].mean())  # noqa: E731
    if not np.isfinite(nll(0.0)):
        raise PatchError("a true class has probability 0 under these logits (-inf); temperature scaling "
                         "needs finite log-probabilities (floor them, e.g. log(max(p, 1e-4)))")
    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    temp = float(np.exp(res.x))
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning("fitted temperature %.3g is at the search bound %s; the validation split may be "
                    "separable or too small", temp, T_BOUNDS)
    return temp


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature): calibrated probabilities (N, C)."""
    if not float(temperature) > 0:
        raise PatchError(f"temperature must be > 0, got {temperature}")
    z, _ = _logits(logits)
    return softmax(z / float(temperature), axis=1)


# ------------------------------------------------------------------ plots
def _reliability_panel(ax, bins: ReliabilityBins, label: str) -> None:
    width = np.diff(bins.edges)
    centres = bins.edges[:-1] + width / 2
    full = bins.count > 0                     # empty bins get no bars
    acc = np.where(full, bins.accuracy, 0.0)
    conf = np.where(full, bins.confidence, 0.0)
    ax.bar(centres, acc, width=width, edgecolor="tab:blue", color="tab:blue", alpha=0.75, label="accuracy")
    ax.bar(centres[full], (conf - acc)[full], bottom=acc[full], width=width[full], color="tab:red", alpha=0.25,
           edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{label}ECE {bins.ece:.3f} (n={bins.n})")
    ax.legend(loc="upper left", fontsize=8, frameon=False)


def plot_reliability(bins: ReliabilityBins, path: str | Path, title: str = "Reliability", *,
                     after: ReliabilityBins | None = None, temperature: float | None = None) -> Path:
    """Reliability diagram (accuracy per confidence bin, gap to the diagonal, ECE in the title);
    with *after* (the bins after temperature scaling) a second panel beside it."""
    from featstore.core.plotting import new_figure, save

    fig = new_figure(10.0 if after is not None else 5.2, 4.8)
    axes = fig.subplots(1, 2 if after is not None else 1, squeeze=False)[0]
    _reliability_panel(axes[0], bins, "before temperature: " if after is not None else "")
    if after is not None:
        t = f" T={temperature:.2f}" if temperature is not None else ""
        _reliability_panel(axes[1], after, f"after temperature{t}: ")
    fig.suptitle(title)
    return save(fig, path)


def plot_confidence_hist(confidence, correct, path: str | Path, title: str = "Confidence",
                         n_bins: int = 20) -> Path:
    """Histograms of the confidence of correct and of wrong predictions (over- vs under-confidence)."""
    from featstore.core.plotting import new_figure, save

    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct).ravel().astype(bool)
    if len(conf) != len(ok):
        raise PatchError(f"confidence ({len(conf)}) and correct ({len(ok)}) must have equal lengths")
    fig = new_figure(5.5, 4.0)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, n_bins + 1)
    ax.hist(conf[ok], bins=edges, alpha=0.6, color="tab:green", label=f"correct (n={int(ok.sum())})")
    ax.hist(conf[~ok], bins=edges, alpha=0.6, color="tab:red", label=f"wrong (n={int((~ok).sum())})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("predictions")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return save(fig, path)


__all__ = ["ReliabilityBins", "apply_temperature", "bin_index", "ece_from_proba", "expected_calibration_error",
           "fit_temperature", "max_softmax", "negative_log_likelihood", "plot_confidence_hist",
           "plot_reliability", "reliability_bins"]
