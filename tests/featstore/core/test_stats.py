"""featstore.core.stats against independent computations (scipy, an O(N^2) DeLong, hand values)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from featstore.core.errors import StatsError
from featstore.core.stats import auc, bootstrap_ci, delong_test, welch_ttest


def _slow_delong(y, a, b):
    """DeLong et al. (1988) covariance from the Mann-Whitney kernel, O(m*n), no ranks."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        x, z = s[pos], s[neg]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (t_a, v10a, v01a), (t_b, v10b, v01b) = comps
    m, n = pos.sum(), neg.sum()
    s10 = np.cov(np.stack([v10a, v10b]))
    s01 = np.cov(np.stack([v01a, v01b]))
    s = s10 / m + s01 / n
    z = (t_a - t_b) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return t_a, t_b, z, 2 * st.norm.sf(abs(z))


def test_auc_matches_mann_whitney_and_hand_value():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(size=200)
    u = st.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))


def test_auc_multiclass_is_macro_ovr():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 20)
    p = rng.dirichlet([1, 1, 1], size=60) + np.eye(3)[y] * 0.5
    expect = np.mean([auc((y == c).astype(int), p[:, c]) for c in range(3)])
    assert auc(y, p) == pytest.approx(expect)


def test_auc_one_class_is_a_clear_error():
    with pytest.raises(StatsError, match="both classes"):
        auc([1, 1, 1], [0.2, 0.3, 0.4])


def test_bootstrap_ci_brackets_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(40), np.ones(10)].astype(int)
    s = y * 0.8 + rng.normal(size=50)
    lo, hi = bootstrap_ci(auc, y, s, n_boot=300, seed=3)
    assert lo < auc(y, s) < hi
    assert (lo, hi) == bootstrap_ci(auc, y, s, n_boot=300, seed=3)
    assert (lo, hi) != bootstrap_ci(auc, y, s, n_boot=300, seed=4)


def test_bootstrap_unstratified_skips_single_class_resamples():
    # 1 positive in 6: many plain resamples miss it; they must be skipped, not crash.
    y = np.array([0, 0, 0, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    lo, hi = bootstrap_ci(auc, y, s, n_boot=200, stratified=False)
    assert lo == hi == 1.0


def test_welch_matches_scipy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.8, 0.02, 5), rng.normal(0.78, 0.05, 7)
    t, p = welch_ttest(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)


def test_welch_needs_two_values():
    with pytest.raises(StatsError, match="at least 2"):
        welch_ttest([0.8], [0.7, 0.75])


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_slow_implementation(ties):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    a = y + rng.normal(size=120)
    b = 0.6 * a + 0.5 * y + rng.normal(size=120)
    if ties:
        a, b = np.round(a, 0), np.round(b, 1)
    got = delong_test(y, a, b)
    ref = _slow_delong(y, a, b)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_delong_hand_example():
    # 2 positives, 2 negatives; hand-computed: AUC_a = 1, AUC_b = 0.5,
    # V10_a = [1, 1], V01_a = [1, 1]; V10_b = [1, 0], V01_b = [0.5, 0.5]
    # var = (0 + 0.5 - 0)/2 + (0 + 0 - 0)/2 = 0.25 -> z = 0.5 / 0.5 = 1.0
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.8, 0.2, 0.1])
    b = np.array([0.9, 0.1, 0.5, 0.5])
    auc_a, auc_b, z, p = delong_test(y, a, b)
    assert (auc_a, auc_b) == (1.0, 0.5)
    assert z == pytest.approx(1.0)
    assert p == pytest.approx(2 * st.norm.sf(1.0))


def test_delong_identical_scores_give_nan():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.7, 0.4, 0.9, 0.3])
    auc_a, auc_b, z, p = delong_test(y, s, s)
    assert auc_a == auc_b and np.isnan(z) and np.isnan(p)


def _reference_ci(y, s, n_boot, seed, alpha=0.05):
    """The bootstrap spelled out: the same draws, one Mann-Whitney AUC (scipy) per resample."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        yy, ss = y[idx], s[idx]
        pos = yy == yy.max()
        vals.append(st.mannwhitneyu(ss[pos], ss[~pos]).statistic / (pos.sum() * (~pos).sum()))
    return tuple(float(v) for v in np.quantile(vals, [alpha / 2, 1 - alpha / 2]))


@pytest.mark.parametrize("n, ties", [(6, False), (37, True), (120, False)])
def test_vectorised_bootstrap_equals_the_per_resample_loop_exactly(n, ties):
    rng = np.random.default_rng(n)
    y = np.r_[np.zeros(n - n // 3), np.ones(n // 3)].astype(int)
    s = y * 0.7 + rng.normal(size=n)
    if ties:
        s = np.round(s, 1)
    assert bootstrap_ci(auc, y, s, n_boot=400, seed=9) == _reference_ci(y, s, 400, 9)


def test_auc_is_scikit_learns_for_any_two_labels_and_nan_scores_give_nan():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    y = np.array(["normal", "tumor"])[rng.integers(0, 2, 80)]
    s = (y == "tumor") + rng.normal(size=80)
    assert auc(y, s) == roc_auc_score(y == "tumor", s)
    assert np.isnan(auc([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.9]))


def test_welch_zero_variance_is_nan():
    t, p = welch_ttest([0.75, 0.75, 0.75], [0.5, 0.5])
    assert np.isnan(t) and np.isnan(p)
