"""The training loop on synthetic in-memory bags: learns a planted signal, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.core.stats import auc
from mil.data import Bags
from mil.errors import MilError
from mil.train import TrainConfig, fit, score_bags

from .conftest import planted_bags

FAST = dict(hidden=(64, 32), attn_dim=16, dropout=0.0, lr=1e-3, threads=1)


@pytest.fixture(scope="module")
def rare_signal():
    """160 bags of 100-200 instances; positives hold just 2 shifted instances (rare signal)."""
    bags, y = planted_bags(160, dim=16, n_inst=(100, 200), k=2, shift=5.0, seed=0)
    return Bags.from_arrays(bags), list(bags), y


def _fit_and_test(data, model, epochs=30):
    bags, ids, y = data
    cfg = TrainConfig(model=model, epochs=epochs, patience=10, seed=0, **FAST)
    res = fit(bags, ids[:80], y[:80], ids[80:100], y[80:100], 2, cfg)
    probs, attn = score_bags(res.model, bags, ids[100:])
    return auc(y[100:], probs[:, 1]), res, attn


def test_abmil_finds_a_rare_signal_mean_pooling_does_worse(rare_signal):
    a_auc, res, attn = _fit_and_test(rare_signal, "abmil")
    m_auc, _, m_attn = _fit_and_test(rare_signal, "mean")
    assert a_auc > 0.9
    assert m_auc < a_auc - 0.1
    assert m_attn[next(iter(m_attn))] is None
    # attention points at the planted instances of positive bags
    bags, ids, y = rare_signal
    pos = [s for s, c in zip(ids[100:], y[100:]) if c == 1]
    hits = [bags[s][attn[s].argmax(), 0].item() > 2.5 for s in pos]
    assert np.mean(hits) > 0.8
    assert res.history and res.best_epoch >= 1


def test_same_seed_same_result_different_seed_differs():
    bags, y = planted_bags(30, dim=8, n_inst=(10, 20), seed=4)
    b, ids = Bags.from_arrays(bags), list(bags)
    cfg = TrainConfig(model="abmil-gated", epochs=4, patience=0, seed=7, **{**FAST, "dropout": 0.25})
    runs = [fit(b, ids[:20], y[:20], ids[20:], y[20:], 2, cfg) for _ in range(2)]
    assert runs[0].history_dict() == runs[1].history_dict()
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, runs[1].model.state_dict()[k])
    p = [score_bags(r.model, b, ids[20:])[0] for r in runs]
    np.testing.assert_array_equal(p[0], p[1])
    other = fit(b, ids[:20], y[:20], ids[20:], y[20:], 2, TrainConfig(**{**cfg.to_dict(), "seed": 8}))
    assert other.history_dict() != runs[0].history_dict()
    before = torch.get_rng_state()
    fit(b, ids[:20], y[:20], [], [], 2, cfg)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone


def test_early_stopping_restores_the_best_epoch():
    bags, y = planted_bags(40, dim=8, n_inst=(10, 20), seed=5)
    b, ids = Bags.from_arrays(bags), list(bags)
    # a high learning rate overfits fast: val loss rises, training stops and rewinds
    cfg = TrainConfig(epochs=60, patience=3, seed=0, **{**FAST, "lr": 2e-2})
    res = fit(b, ids[:24], y[:24], ids[24:], y[24:], 2, cfg)
    assert res.stopped_early and len(res.history) == res.best_epoch + 3
    best = res.history[res.best_epoch - 1]
    probs, _ = score_bags(res.model, b, ids[24:])
    loss = -np.log(probs[np.arange(16), y[24:]]).mean()
    assert loss == pytest.approx(best.val_loss, rel=1e-5)
    assert all(h.val_loss >= best.val_loss for h in res.history)


def test_callback_sees_every_bag_and_epoch():
    bags, y = planted_bags(10, dim=4, n_inst=(3, 6), seed=1)
    b, ids = Bags.from_arrays(bags), list(bags)
    seen = []
    fit(b, ids[:6], y[:6], ids[6:], y[6:], 2, TrainConfig(epochs=2, patience=0, **FAST), callback=seen.append)
    assert [e.step for e in seen].count("bag") == 12 and [e.step for e in seen].count("epoch") == 2
    assert seen[-1].epoch == 2 and np.isfinite(seen[-1].val_auc)


def test_bad_config_is_rejected():
    with pytest.raises(MilError, match="optimizer 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(MilError, match="--epochs 0 must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(MilError, match="no training slides"):
        fit(Bags.from_arrays({"a": np.zeros((2, 3))}), [], [], [], [], 2, TrainConfig())
