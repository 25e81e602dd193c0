"""featstore.core.fit: the one training loop (early stopping, best-state restore, no-val rule, divergence)
on a real tiny model trained by real SGD steps; the validation curve is scripted so the expected
best and stopping epochs are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from featstore.core.errors import CoreError
from featstore.core.fit import by_val_auc, by_val_loss, fit, mean_loss


class Diverged(Exception):
    pass


def _trainer(lr: float = 0.1, losses: list[float] | None = None):
    """(model, train_epoch, snapshots): one SGD step per epoch on a fixed regression batch;
    ``snapshots[epoch]`` holds the weights after that epoch. *losses* overrides the returned loss."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    snapshots: dict[int, dict] = {}

    def train_epoch(epoch: int) -> float:
        model.train()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return losses[epoch - 1] if losses else float(loss.detach())

    return model, train_epoch, snapshots


def _scripted(val_losses: list[float], val_aucs: list[float] | None = None):
    return lambda epoch: {"val_loss": val_losses[epoch - 1],
                          "val_auc": (val_aucs or [math.nan] * len(val_losses))[epoch - 1]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_at_the_right_epoch_and_best_weights_restored():
    model, train_epoch, snaps = _trainer()
    curve = [3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 0.5]      # best at 2, then 3 epochs without improvement
    res = fit(model, train_epoch, _scripted(curve), epochs=7, patience=3)
    assert res.stopped_early and res.best_epoch == 2
    assert [r.epoch for r in res.history] == [1, 2, 3, 4, 5]
    assert [r.improved for r in res.history] == [True, True, False, False, False]
    assert _same(model.state_dict(), snaps[2]) and not _same(snaps[2], snaps[5])
    assert not model.training


def test_no_patience_runs_every_epoch_and_ties_keep_the_earlier_epoch():
    model, train_epoch, snaps = _trainer()
    res = fit(model, train_epoch, _scripted([2.0, 1.0, 1.0, 1.5]), epochs=4, patience=0)
    assert not res.stopped_early and len(res.history) == 4 and res.best_epoch == 2
    assert _same(model.state_dict(), snaps[2])


def test_without_validation_every_epoch_runs_and_the_last_is_kept():
    model, train_epoch, snaps = _trainer()
    res = fit(model, train_epoch, None, epochs=5, patience=1)
    assert not res.stopped_early and res.best_epoch == 5 and len(res.history) == 5
    assert all(r.improved and r.metrics == {} for r in res.history)
    assert _same(model.state_dict(), snaps[5])
    hist = res.as_dict()
    assert hist["epoch"] == [1, 2, 3, 4, 5] and hist["val_loss"] == [None] * 5 and hist["best_epoch"] == 5


def test_divergence_raises_the_callers_error():
    model, train_epoch, _ = _trainer(losses=[1.0, math.nan, 0.5])
    seen = []
    with pytest.raises(Diverged, match="epoch 2"):
        fit(model, train_epoch, _scripted([1.0, 1.0, 1.0]), epochs=3, on_epoch=seen.append,
            diverged=lambda e, loss: Diverged(f"diverged at epoch {e} (loss {loss})"))
    assert [r.epoch for r in seen] == [1]
    model, train_epoch, _ = _trainer(losses=[math.inf])
    with pytest.raises(CoreError, match="diverged at epoch 1"):
        fit(model, train_epoch, None, epochs=1)


def test_monitors_and_unknown_monitor():
    # val_auc: higher AUC wins even at a higher loss; an undefined AUC falls back to the loss
    assert by_val_auc({"val_loss": 0.9, "val_auc": 0.8}) < by_val_auc({"val_loss": 0.1, "val_auc": 0.7})
    assert by_val_auc({"val_loss": 0.5, "val_auc": math.nan}) == by_val_loss({"val_loss": 0.5, "val_auc": math.nan})
    # val_loss: equal losses go to the higher AUC
    assert by_val_loss({"val_loss": 0.5, "val_auc": 0.9}) < by_val_loss({"val_loss": 0.5, "val_auc": 0.6})
    model, train_epoch, snaps = _trainer()
    res = fit(model, train_epoch, _scripted([0.2, 0.9, 0.8], [0.6, 0.9, 0.7]), epochs=3, monitor="val_auc")
    assert res.best_epoch == 2 and _same(model.state_dict(), snaps[2])
    with pytest.raises(CoreError, match="monitor 'f1'"):
        fit(model, train_epoch, None, epochs=1, monitor="f1")


def test_mean_loss_reports_running_means():
    seen = []
    assert mean_loss([1.0, 2.0, 6.0], lambda done, mean: seen.append((done, mean))) == 3.0
    assert seen == [(1, 1.0), (2, 1.5), (3, 3.0)]
    assert math.isnan(mean_loss([]))
