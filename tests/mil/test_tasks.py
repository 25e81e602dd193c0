"""Survival and regression pieces against oracles: lifelines for the C-index and the Cox fit,
scikit-survival's own functions for Uno's C, the time-dependent AUC and the Brier score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil.tasks import cox_loss, harrell_c, logrank, nll_loss, regression_metrics, survival_metrics


def _survival_data(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    t = rng.exponential(1.0 / np.exp(0.8 * x))
    c = rng.exponential(2.0, n)
    time, event = np.minimum(t, c), (t <= c).astype(float)
    return x, np.stack([time, event], 1)


def test_harrell_c_is_lifelines_concordance_index():
    from lifelines.utils import concordance_index

    x, target = _survival_data()
    risk = x + np.random.default_rng(1).normal(0, 0.5, len(x))
    ours = harrell_c(target[:, 0], target[:, 1], risk)
    # lifelines scores "predicted survival times": higher = longer survival, so it takes -risk
    assert ours == pytest.approx(concordance_index(target[:, 0], -risk, target[:, 1]), abs=1e-9)
    assert 0.6 < ours < 0.9
    assert harrell_c(target[:, 0], target[:, 1], -risk) == pytest.approx(1 - ours, abs=1e-9)


def test_cox_loss_minimum_is_lifelines_cox_coefficient():
    """Minimising our partial likelihood over a linear risk b*x finds lifelines' CoxPH b (no ties:
    Breslow and Efron agree)."""
    import pandas as pd
    from lifelines import CoxPHFitter

    x, target = _survival_data(120, seed=2)
    b = torch.zeros(1, requires_grad=True)
    xt = torch.as_tensor(x, dtype=torch.float32)
    t, e = torch.as_tensor(target[:, 0]), torch.as_tensor(target[:, 1])
    opt = torch.optim.LBFGS([b], lr=0.5, max_iter=200, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = cox_loss(b * xt, t, e)
        loss.backward()
        return loss

    opt.step(closure)
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": target[:, 0], "E": target[:, 1]}), "T", "E")
    assert float(b) == pytest.approx(float(cph.params_["x"]), abs=2e-3)
    assert 0.5 < float(b) < 1.1          # the simulated log hazard ratio is 0.8


def test_cox_loss_of_a_batch_without_events_is_zero_and_ties_share_a_risk_set():
    r = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    assert float(cox_loss(r, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))) == 0.0
    # tied times: each event's risk set holds both tied slides (Breslow)
    t, e = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    lse = torch.logsumexp(r.detach(), 0)
    expected = -((r.detach()[0] - lse) + (r.detach()[1] - lse)) / 2
    assert float(cox_loss(r, t, e)) == pytest.approx(float(expected), rel=1e-6)


def test_nll_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    h = torch.sigmoid(logits.double())
    k, event = torch.tensor([1, 2]), torch.tensor([1.0, 0.0])
    ev = -(torch.log(1 - h[0, 0]) + torch.log(h[0, 1]))            # survived bin 0, event in bin 1
    cens = -(torch.log(1 - h[1]).sum())                            # survived every bin up to 2
    assert float(nll_loss(logits, k, event)) == pytest.approx(float((ev + cens) / 2), rel=1e-5)


def test_survival_metrics_match_scikit_survival_and_a_perfect_risk_scores_high():
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.util import Surv

    x, target = _survival_data(200, seed=3)
    train, test = target[:120], target[120:]
    risk = x[120:]
    m = survival_metrics(train, test, risk, n_boot=200)
    s_tr = Surv.from_arrays(train[:, 1].astype(bool), train[:, 0])
    s_te = Surv.from_arrays(test[:, 1].astype(bool), test[:, 0])
    assert m["c_index_uno"] == pytest.approx(concordance_index_ipcw(s_tr, s_te, risk, tau=train[:, 0].max())[0])
    assert m["events"] == int(test[:, 1].sum()) and m["n"] == 80
    lo, hi = m["c_index_ci"]
    assert lo < m["c_index"] < hi
    assert m["td_auc"] is not None and m["td_auc"] > 0.6
    ev = test[test[:, 1] > 0, 0]
    times = np.unique(np.quantile(ev, [0.25, 0.5, 0.75]))
    assert m["td_auc"] == pytest.approx(cumulative_dynamic_auc(s_tr, s_te, risk, times)[1])
    noise = survival_metrics(train, test, np.random.default_rng(0).standard_normal(80), n_boot=50)
    assert noise["c_index"] < m["c_index"] - 0.1
    # no event among the test slides: every metric undefined, not a crash
    none = survival_metrics(train, np.stack([test[:, 0], np.zeros(80)], 1), risk, n_boot=10)
    assert none["c_index"] is None and none["events"] == 0


def test_logrank_separates_risk_groups_and_is_none_for_one_group():
    x, target = _survival_data(200, seed=4)
    p = logrank(target, x > np.median(x))
    assert p is not None and p < 1e-3
    assert logrank(target, np.ones(len(x), bool)) is None
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    ref = compare_survival(Surv.from_arrays(target[:, 1].astype(bool), target[:, 0]),
                           np.where(x > np.median(x), "high", "low"))[1]
    assert p == pytest.approx(ref)


def test_regression_metrics_are_scipys_and_sklearns():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    rng = np.random.default_rng(5)
    y = rng.uniform(0, 10, 50)
    pred = y + rng.normal(0, 2, 50)
    m = regression_metrics(y, pred, n_boot=200)
    assert m["pearson"] == pytest.approx(pearsonr(y, pred)[0])
    assert m["spearman"] == pytest.approx(spearmanr(y, pred)[0])
    assert m["r2"] == pytest.approx(r2_score(y, pred))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert m["pearson_ci"][0] < m["pearson"] < m["pearson_ci"][1]
    assert regression_metrics(y, np.full(50, 3.0))["pearson"] is None    # constant prediction: undefined
