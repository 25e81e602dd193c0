"""ECE, reliability bins, temperature scaling and the calibration plots on real computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from featstore.core.errors import CoreError
from mil.patches.calibration import (apply_temperature, bin_index, ece_from_proba, expected_calibration_error,
                                 fit_temperature, max_softmax, negative_log_likelihood, plot_confidence_hist,
                                 plot_reliability, reliability_bins)
from mil.patches.errors import PatchError

PNG = b"\x89PNG\r\n\x1a\n"


def _loop_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Guo et al. (2017) written out: bins (m/M, (m+1)/M], 0 goes to the first bin."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi or (m == 0 and conf[i] == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def _calibrated_logits(n: int, seed: int, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, n_classes))
    p = softmax(z, axis=1)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 23])
def test_ece_equals_a_plain_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    proba = rng.dirichlet(np.full(4, 0.5), 500)
    y = rng.integers(0, 4, 500)
    conf, pred = max_softmax(proba)
    correct = pred == y
    ece = expected_calibration_error(conf, correct, n_bins)
    assert ece == pytest.approx(_loop_ece(conf, correct, n_bins), abs=1e-12)
    assert ece_from_proba(y, proba, n_bins) == pytest.approx(ece, abs=1e-15)
    assert ece > 0.05  # random labels: badly calibrated, so the check above is not 0 == 0


def test_ece_is_zero_for_a_perfectly_calibrated_construction():
    conf, correct = [], []
    for c in (0.55, 0.65, 0.75, 0.85, 0.95):   # 20 predictions per bin, c * 20 of them right
        conf += [c] * 20
        correct += [True] * round(c * 20) + [False] * (20 - round(c * 20))
    assert expected_calibration_error(np.array(conf), np.array(correct), 10) == pytest.approx(0, abs=1e-12)
    # the same predictions all right: ECE = 1 - mean confidence
    assert expected_calibration_error(np.array(conf), np.ones(100, bool), 10) == pytest.approx(1 - 0.75)


def test_bins_are_closed_on_the_right_and_count_everything():
    assert bin_index(np.array([0.0, 0.2, 0.2000001, 0.5, 1.0]), 5).tolist() == [0, 0, 1, 2, 4]
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 321)
    bins = reliability_bins(conf, rng.random(321) < conf, n_bins=15)
    assert bins.n == 321 and bins.count.sum() == 321 and len(bins.count) == 15
    assert bins.count[:4].sum() == 0 and np.isnan(bins.accuracy[:4]).all()   # nothing below 0.3
    full = bins.count > 0
    lo, hi = bins.edges[:-1][full], bins.edges[1:][full]
    assert np.all((bins.confidence[full] > lo) & (bins.confidence[full] <= hi))
    d = bins.to_dict()
    assert d["accuracy"][0] is None and d["ece"] == pytest.approx(bins.ece)


def test_temperature_undoes_overconfidence():
    z, y = _calibrated_logits(4000, seed=1)
    val, test = slice(0, 2000), slice(2000, None)
    hot = 3.0 * z                                   # an over-confident classifier
    t = fit_temperature(hot[val], y[val])
    assert 2.4 < t < 3.6
    assert negative_log_likelihood(hot[val], y[val], t) < negative_log_likelihood(hot[val], y[val]) - 0.1
    before = ece_from_proba(y[test], softmax(hot[test], axis=1))
    after = ece_from_proba(y[test], apply_temperature(hot[test], t))
    assert after < before / 2
    # argmax (hence accuracy) is unchanged by a temperature
    assert np.array_equal(apply_temperature(hot, t).argmax(1), hot.argmax(1))


def test_temperature_is_about_one_when_calibrated():
    z, y = _calibrated_logits(4000, seed=2)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.12)


def test_temperature_fits_the_nll_minimum():
    z, y = _calibrated_logits(1000, seed=3)
    t = fit_temperature(2 * z, y)
    grid = np.exp(np.linspace(np.log(t) - 0.2, np.log(t) + 0.2, 41))
    nll = [negative_log_likelihood(2 * z, y, g) for g in grid]
    assert abs(np.log(grid[int(np.argmin(nll))]) - np.log(t)) <= 0.011


def test_bad_inputs_are_patch_errors():
    with pytest.raises(PatchError, match="equal length"):
        reliability_bins(np.array([0.5, 0.6]), np.array([True]))
    with pytest.raises(PatchError, match=r"\[0, 1\]"):
        reliability_bins(np.array([1.5]), np.array([True]))
    with pytest.raises(PatchError, match="temperature must be > 0"):
        apply_temperature(np.zeros((2, 3)), 0.0)
    with pytest.raises(PatchError, match="probability 0"):
        fit_temperature(np.array([[0.0, -np.inf], [0.0, 1.0]]), np.array([1, 0]))
    with pytest.raises(PatchError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    assert issubclass(PatchError, CoreError) and issubclass(PatchError, ValueError)


def test_plots_are_pngs(tmp_path):
    z, y = _calibrated_logits(600, seed=4)
    conf, pred = max_softmax(softmax(3 * z, axis=1))
    before = reliability_bins(conf, pred == y)
    conf2, pred2 = max_softmax(apply_temperature(3 * z, 3.0))
    after = reliability_bins(conf2, pred2 == y)
    for p in (plot_reliability(before, tmp_path / "one.png", "probe"),
              plot_reliability(before, tmp_path / "two.png", "probe", after=after, temperature=3.0),
              plot_confidence_hist(conf, pred == y, tmp_path / "hist.png")):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
