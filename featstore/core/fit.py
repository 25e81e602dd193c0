"""One training loop for every trainer of the toolkit: epochs, early stopping, best-state restore.

It knows nothing of MIL, bags or tiles: the caller passes a ``train_epoch(epoch) -> mean loss``
function (its own data order, optimiser and per-step progress; :func:`mean_loss` sums the step
losses the same way for everyone) and, when there is a validation set, an
``evaluate(epoch) -> metrics`` function. The loop keeps the weights of the best epoch by a
*monitor* (a sort key over the metrics, smaller is better; ties keep the earlier epoch), stops
after *patience* epochs without improvement, and puts the best weights back at the end.
Without ``evaluate`` every epoch runs and the last one is kept.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from torch import nn

from featstore.core.errors import CoreError

log = logging.getLogger(__name__)

Metrics = Mapping[str, float]
Monitor = Callable[[Metrics], tuple]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if _finite(x) else None


def by_val_loss(m: Metrics) -> tuple[float, float]:
    """Validation loss; equal losses go to the higher validation AUC (when defined)."""
    auc = m.get("val_auc")
    return (m["val_loss"], -auc if _finite(auc) else 0.0)


def by_val_auc(m: Metrics) -> tuple[float, float]:
    """Validation AUC (higher is better), then loss; falls back to :func:`by_val_loss` when the
    AUC is undefined (a validation set of one class)."""
    auc = m.get("val_auc")
    if _finite(auc):
        return (-auc, m["val_loss"])
    return by_val_loss(m)


def by_val_loss_only(m: Metrics) -> tuple[float]:
    """Validation loss alone (equal losses keep the earlier epoch)."""
    return (m["val_loss"],)


MONITORS: dict[str, Monitor] = {"val_loss": by_val_loss, "val_auc": by_val_auc,
                                "val_loss_only": by_val_loss_only}


@dataclass
class EpochRecord:
    """What one epoch did: its mean training loss, the evaluation metrics, whether it is the best so far."""

    epoch: int
    epochs: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    improved: bool = False


@dataclass
class FitResult:
    """The epochs that ran (the model itself holds the best weights afterwards)."""

    best_epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False

    def as_dict(self, metrics: Sequence[str] = ("val_loss", "val_auc")) -> dict:
        """``{"epoch": [...], "train_loss": [...], <metric>: [...], "best_epoch": n}`` for a
        history.json; NaN/inf and metrics an epoch lacks are None."""
        clean = _finite_or_none
        out: dict = {"epoch": [r.epoch for r in self.history],
                     "train_loss": [clean(r.train_loss) for r in self.history]}
        out.update({k: [clean(r.metrics.get(k)) for r in self.history] for k in metrics})
        out["best_epoch"] = self.best_epoch
        return out


def mean_loss(step_losses: Iterable[float], on_step: Callable[[int, float], None] | None = None) -> float:
    """Mean of one epoch's step losses, summed in step order; ``on_step(done, running mean)``
    after each step (a command's progress bar). NaN for an epoch of no steps."""
    total, n = 0.0, 0
    for n, loss in enumerate(step_losses, 1):
        total += float(loss)
        if on_step is not None:
            on_step(n, total / n)
    return total / n if n else math.nan


def _diverged(epoch: int, loss: float) -> Exception:
    return CoreError(f"training diverged at epoch {epoch} (loss {loss}); lower the learning rate")


def _monitor(monitor: str | Monitor) -> Monitor:
    if callable(monitor):
        return monitor
    if monitor not in MONITORS:
        raise CoreError(f"monitor {monitor!r}: choose {', '.join(MONITORS)}")
    return MONITORS[monitor]


def fit(model: nn.Module, train_epoch: Callable[[int], float],
        evaluate: Callable[[int], Metrics] | None = None, *, epochs: int, patience: int = 0,
        monitor: str | Monitor = "val_loss", on_epoch: Callable[[EpochRecord], None] | None = None,
        diverged: Callable[[int, float], Exception] = _diverged) -> FitResult:
    """Train *model* for up to *epochs* epochs; returns the history, the model left in eval mode
    with the weights of its best epoch.

    ``train_epoch(epoch)`` runs one epoch and returns its mean loss; a non-finite loss raises
    ``diverged(epoch, loss)`` (the caller's error type and advice). With ``evaluate``, the best
    epoch is the smallest ``monitor(metrics)`` (strictly smaller replaces it, so ties keep the
    earlier epoch), its ``state_dict`` is deep-copied, training stops once *patience* epochs in a
    row did not improve (0: never), and the best weights are loaded back at the end.
    """
    key_of = _monitor(monitor)
    result = FitResult()
    best_key, best_state, since = None, None, 0
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(epoch)
        if not math.isfinite(train_loss):
            raise diverged(epoch, train_loss)
        metrics = dict(evaluate(epoch)) if evaluate is not None else {}
        key = key_of(metrics) if evaluate is not None else (-float(epoch),)
        improved = best_key is None or key < best_key
        if improved:
            best_key, since, result.best_epoch = key, 0, epoch
            if evaluate is not None:
                best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
        record = EpochRecord(epoch, epochs, train_loss, metrics, improved)
        result.history.append(record)
        log.debug("epoch %d: train %.4f %s%s", epoch, train_loss,
                  " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), " *" if improved else "")
        if on_epoch is not None:
            on_epoch(record)
        if evaluate is not None and patience and since >= patience:
            result.stopped_early = True
            log.info("early stop at epoch %d (best %d)", epoch, result.best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


__all__ = ["fit", "FitResult", "EpochRecord", "Metrics", "Monitor", "MONITORS", "mean_loss",
           "by_val_loss", "by_val_auc", "by_val_loss_only"]
