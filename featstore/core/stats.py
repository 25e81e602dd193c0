"""Statistics for comparing classifiers: AUC, bootstrap CIs, Welch's t-test, DeLong's test.

Used by ``mil`` for the CIs in metrics.json and by ``analysis.compare`` for significance.
AUC is scikit-learn's, Welch's test scipy's; the stratified bootstrap (vectorised over resamples
for AUC) and the fast DeLong test are here because no maintained library has them. Everything is
deterministic for a seed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np
from scipy import stats as _st
from sklearn.metrics import roc_auc_score

from featstore.core.errors import StatsError

log = logging.getLogger(__name__)

Metric = Callable[[np.ndarray, np.ndarray], float]


def _as_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim not in (1, 2) or len(y_true) != len(y_score):
        raise StatsError(
            f"y_true has shape {y_true.shape} and y_score {y_score.shape}: pass (N,) labels with "
            "(N,) scores or (N, C) class probabilities"
        )
    return y_true, y_score


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one binary problem (scikit-learn; ties count 1/2).

    scikit-learn refuses NaN and inf scores; those keep the rank formula's answer (NaN
    propagates, so a diverged model's metrics say "undefined" instead of failing the run).
    """
    if not np.isfinite(score).all():
        return _rank_auc(pos.astype(np.int8), score)
    return float(roc_auc_score(pos, score))


def auc(y_true, y_score) -> float:
    """ROC AUC: binary when ``y_score`` is (N,), macro one-vs-rest when it is (N, C).

    Binary labels may be any two values (the larger one is positive, as in scikit-learn);
    multiclass labels must be integer class indices 0..C-1 matching the score columns, and the
    macro average runs over the classes present in ``y_true`` (an absent class has no AUC).
    """
    y_true, y_score = _as_arrays(y_true, y_score)
    return float(np.mean([_binary_auc(pos, score) for pos, score in _problems(y_true, y_score)]))


def _problems(y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The binary problems (positives, scores) whose AUCs :func:`auc` averages; checks the input."""
    classes = np.unique(y_true)
    if len(classes) < 2:
        raise StatsError(f"AUC needs both classes but y_true has only {classes.tolist()}; "
                         "check the labels of the evaluated slides")
    if y_score.ndim == 1:
        if len(classes) > 2:
            raise StatsError(f"y_true has {len(classes)} classes but y_score is 1-D; "
                             "pass (N, C) class probabilities for multiclass AUC")
        return [(y_true == classes[1], y_score)]
    n_cls = y_score.shape[1]
    if n_cls == 2 and set(classes.tolist()) <= {0, 1}:
        return [(y_true == 1, y_score[:, 1])]
    if not np.issubdtype(y_true.dtype, np.integer) or classes.min() < 0 or classes.max() >= n_cls:
        raise StatsError(f"multiclass y_true must hold class indices 0..{n_cls - 1} "
                         f"matching the {n_cls} score columns; got {classes[:10].tolist()}")
    return [(y_true == c, y_score[:, c]) for c in classes]


def _resampled_aucs(y_true: np.ndarray, y_score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC of every resample (rows of *idx*) at once: Mann-Whitney U from midranks along axis 1.

    Every row must pose the same binary problems as the full data (true for stratified
    resamples, and for binary labels once single-class resamples are dropped). Midranks are
    multiples of 1/2, so their sums are exact and each AUC equals the rank formula on its own
    resample bit for bit.
    """
    total = np.zeros(len(idx))
    problems = _problems(y_true, y_score)
    for pos, score in problems:
        p = pos[idx]
        m = p.sum(axis=1).astype(np.float64)
        n = p.shape[1] - m
        ranks = _st.rankdata(score[idx], axis=1)
        total = total + (np.where(p, ranks, 0.0).sum(axis=1) - m * (m + 1) / 2) / (m * n)
    return total / len(problems) if len(problems) > 1 else total


def _rank_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """:func:`auc` by the midrank formula of :func:`_resampled_aucs` (one resample)."""
    return float(_resampled_aucs(y_true, y_score, np.arange(len(y_true))[None])[0])


def _is_binary(y_true: np.ndarray, y_score: np.ndarray) -> bool:
    try:
        return len(_problems(y_true, y_score)) == 1
    except StatsError:
        return False


def _draw(rng: np.random.Generator, y_true: np.ndarray, n_boot: int, stratified: bool) -> list[np.ndarray]:
    """The resample indices, drawn in the one fixed order (a seed always gives the same CI)."""
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    n = len(y_true)
    out = []
    for _ in range(n_boot):
        if stratified:
            out.append(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]))
        else:
            idx = rng.integers(0, n, n)
            if len(np.unique(y_true[idx])) >= 2:
                out.append(idx)
    return out


def bootstrap_ci(metric: Metric, y_true, y_score, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, stratified: bool = True) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(y_true, y_score)``.

    Stratified resampling draws with replacement within each class, so every resample keeps
    the class counts (and AUC is always defined). Unstratified resamples that contain a single
    class are skipped. Returns (nan, nan) if no resample was usable. With ``metric=auc`` and
    stratified resampling all resamples are scored at once (vectorised ranks).
    """
    y_true, y_score = _as_arrays(y_true, y_score)
    if not 0 < alpha < 1:
        raise StatsError(f"alpha={alpha} must lie in (0, 1), e.g. 0.05 for a 95% CI")
    draws = _draw(np.random.default_rng(seed), y_true, n_boot, stratified)
    values: list[float] | np.ndarray = []
    if metric is auc and draws and (stratified or _is_binary(y_true, y_score)):
        try:
            values = _resampled_aucs(y_true, y_score, np.stack(draws))
        except StatsError:  # AUC undefined on these labels: no usable resample
            values = []
    else:
        score = _rank_auc if metric is auc else metric  # the same rank formula as the fast path
        for idx in draws:
            try:
                values.append(float(score(y_true[idx], y_score[idx])))
            except (ValueError, StatsError):  # metric undefined on this resample
                continue
    if not len(values):
        log.warning("bootstrap_ci: no usable resample out of %d; returning nan", n_boot)
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def welch_ttest(a, b) -> tuple[float, float]:
    """Welch's two-sided t-test (unequal variances), e.g. AUCs of two configs over seeds.

    ``scipy.stats.ttest_ind(a, b, equal_var=False)``; nan when both groups have zero variance.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2 or len(b) < 2:
        raise StatsError(f"Welch's t-test needs at least 2 values per group (got {len(a)} and "
                         f"{len(b)}); run more seeds or folds")
    if a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():  # near-identical AUCs (e.g. all ~1): scipy warns, the result stands
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def delong_components(y_true, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs and structural components of K correlated scores.

    ``scores`` is (K, N). Returns (aucs (K,), V10 (K, m) over positives, V01 (K, n) over
    negatives); the DeLong covariance is cov(V10)/m + cov(V01)/n.
    """
    y = np.asarray(y_true)
    classes = np.unique(y)
    if len(classes) != 2:
        raise StatsError(f"DeLong's test needs binary labels; got classes {classes[:10].tolist()}")
    pos = y == classes[1]
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    x, z = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], z.shape[1]
    tx = _st.rankdata(x, axis=1)  # midranks (ties get the average rank), as in Sun & Xu (2014)
    tz = _st.rankdata(z, axis=1)
    tall = _st.rankdata(np.concatenate([x, z], axis=1), axis=1)
    aucs = tall[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tall[:, :m] - tx) / n
    v01 = 1.0 - (tall[:, m:] - tz) / m
    return aucs, v10, v01


def delong_test(y_true, score_a, score_b) -> tuple[float, float, float, float]:
    """DeLong's test for two correlated AUCs on the same cases: (auc_a, auc_b, z, p two-sided).

    Binary labels (the larger label is positive). z and p are nan if the difference has zero
    variance (e.g. identical scores).
    """
    y = np.asarray(y_true)
    a = np.asarray(score_a, dtype=np.float64).ravel()
    b = np.asarray(score_b, dtype=np.float64).ravel()
    if not (len(y) == len(a) == len(b)):
        raise StatsError(f"DeLong: y_true ({len(y)}), score_a ({len(a)}) and score_b ({len(b)}) "
                            "must be scores of the same cases")
    aucs, v10, v01 = delong_components(y, np.stack([a, b]))
    m, n = v10.shape[1], v01.shape[1]
    s = np.cov(v10) / m + np.cov(v01) / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if not var > 0:
        return float(aucs[0]), float(aucs[1]), float("nan"), float("nan")
    zval = (aucs[0] - aucs[1]) / np.sqrt(var)
    p = 2 * _st.norm.sf(abs(zval))
    return float(aucs[0]), float(aucs[1]), float(zval), float(p)
