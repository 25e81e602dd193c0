"""Training loop for MIL heads: one bag per step, early stopping on a validation split.

Deterministic on CPU for a fixed seed (and thread count): the global torch RNG is forked and
seeded (model init, dropout), the epoch order comes from a seeded numpy generator; on CUDA,
deterministic algorithms are switched on for the duration of the fit. Progress is reported through an optional callback so
commands can draw a progress bar; the library itself only logs.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from mil import run as run_files
from mil.config import _OPTIMIZERS, RunSpec, TrainConfig
from mil.data import Bags
from mil.errors import MilError
from mil.models import create_mil_model
from mil.run import write_json

log = logging.getLogger(__name__)





@dataclass
class EpochLog:
    """What one epoch did; passed to the progress callback and kept in the history."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_auc: float
    improved: bool
    step: str = "epoch"   # "epoch" at the end of an epoch, "bag" after each training bag
    done: int = 0         # bags done in this epoch (step == "bag")
    total: int = 0


@dataclass
class TrainResult:
    """A fitted head (best weights restored) and its per-epoch history."""

    model: nn.Module
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    def history_dict(self) -> dict:
        keys = ("train_loss", "val_loss", "val_auc")
        return {"epoch": [h.epoch for h in self.history], "best_epoch": self.best_epoch,
                **{k: [_nan_none(getattr(h, k)) for h in self.history] for k in keys}}


def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside a forked RNG (the caller's RNG state is left alone).

    On CUDA, deterministic algorithms are switched on for the duration (restored after). The CPU
    kernels a MIL head uses (linear, softmax, Adam) are deterministic already, and switching the
    flag on imports torch's compiler stack (~4 s), so on CPU only the seeding is done.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type != "cuda":
            yield
            return
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (tiny heads train faster on one thread)."""
    prev = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam/AdamW; the fused kernel (one op for all parameters) when this torch has it."""
    cls = _OPTIMIZERS[cfg.optimizer]
    # measured on this 2-core CPU: the plain single-tensor loop beats fused/foreach for heads of
    # ~10^5 parameters (1.7 vs 3.0 ms per step); fused pays on CUDA.
    if next(model.parameters()).is_cuda:
        return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1`` or ``auto``; CUDA only when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MilError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def safe_auc(y: np.ndarray, probs: np.ndarray) -> float:
    from core.stats import auc

    if len(y) == 0 or len(np.unique(y)) < 2:
        return float("nan")
    return auc(y, probs[:, 1] if probs.shape[1] == 2 else probs)


@torch.no_grad()
def score_bags(model: nn.Module, bags: Bags, slide_ids: Sequence[str],
               device: torch.device | str = "cpu") -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """Class probabilities (n, C) float64 and raw attention per slide (None for mean pooling)."""
    device = torch.device(device)
    model.eval()
    probs, attn = [], {}
    for sid, bag in bags.iterate(list(slide_ids)):
        logits, a = model(bag.to(device))
        probs.append(torch.softmax(logits.float(), -1).cpu().double().numpy())
        attn[sid] = None if a is None else a.float().cpu().numpy()
    n_cls = getattr(model, "n_classes", 2)
    return (np.stack(probs) if probs else np.zeros((0, n_cls))), attn


def mean_nll(probs: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean())


def instance_stats(bags: Bags, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over every instance of the given bags (float64 sums)."""
    n, s1, s2 = 0, None, None
    for _, bag in bags.iterate(list(ids)):
        b = bag.double()
        s1 = b.sum(0) if s1 is None else s1 + b.sum(0)
        s2 = (b * b).sum(0) if s2 is None else s2 + (b * b).sum(0)
        n += b.shape[0]
    mean = s1 / max(n, 1)
    var = (s2 / max(n, 1) - mean * mean).clamp(min=0)
    return mean.float(), var.sqrt().float()


def fit(bags: Bags, train_ids: Sequence[str], train_y: np.ndarray, val_ids: Sequence[str],
        val_y: np.ndarray, n_classes: int, cfg: TrainConfig,
        callback: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train a fresh head from *cfg* on the train bags; early-stop on the val bags if any.

    Returns the head with the weights of its best validation epoch (or the last epoch when
    there is no validation set).
    """
    if len(train_ids) == 0:
        raise MilError("no training slides; check the labels and splits")
    device = resolve_device(cfg.device)
    train_y = np.asarray(train_y, dtype=np.int64)
    val_y = np.asarray(val_y, dtype=np.int64)
    has_val = len(val_ids) > 0
    if not has_val:
        log.warning("no validation slides: training %d epochs without early stopping", cfg.epochs)
    with deterministic(cfg.seed, device), cpu_threads(cfg.threads):
        model = create_mil_model(cfg.model, bags.dim, n_classes, **cfg.widths())
        model.set_input_stats(*instance_stats(bags, train_ids))
        model = model.to(device)
        opt = _make_optimizer(cfg, model)
        loss_fn = nn.CrossEntropyLoss()
        rng = np.random.default_rng([cfg.seed, 3])
        targets = torch.as_tensor(train_y, device=device)
        result = TrainResult(model)
        best_key, best_state, since = None, copy.deepcopy(model.state_dict()), 0
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = rng.permutation(len(train_ids))
            total = 0.0
            ids = [train_ids[i] for i in order]
            for step, (_, bag) in enumerate(bags.iterate(ids)):
                logits, _ = model(bag.to(device, non_blocking=device.type == "cuda"))
                loss = loss_fn(logits.unsqueeze(0), targets[order[step]].unsqueeze(0))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                if callback is not None:
                    callback(EpochLog(epoch, cfg.epochs, total / (step + 1), math.nan, math.nan, False,
                                      step="bag", done=step + 1, total=len(ids)))
            train_loss = total / len(ids)
            val_loss = val_auc = math.nan
            if has_val:
                probs, _ = score_bags(model, bags, val_ids, device)
                val_loss, val_auc = mean_nll(probs, val_y), safe_auc(val_y, probs)
            if not math.isfinite(train_loss):
                raise MilError(f"training diverged at epoch {epoch} (loss {train_loss}); lower --lr")
            key = _monitor_key(cfg.monitor, val_loss, val_auc) if has_val else (-float(epoch), 0.0)
            improved = best_key is None or key < best_key
            if improved:
                best_key, best_state, since = key, copy.deepcopy(model.state_dict()), 0
                result.best_epoch = epoch
            else:
                since += 1
            entry = EpochLog(epoch, cfg.epochs, train_loss, val_loss, val_auc, improved)
            result.history.append(entry)
            log.debug("epoch %d: train %.4f val %.4f auc %.4f%s", epoch, train_loss, val_loss,
                      val_auc, " *" if improved else "")
            if callback is not None:
                callback(entry)
            if has_val and cfg.patience and since >= cfg.patience:
                result.stopped_early = True
                log.info("early stop at epoch %d (best %d)", epoch, result.best_epoch)
                break
        if has_val:
            model.load_state_dict(best_state)
    model.eval()
    return result


def _monitor_key(monitor: str, val_loss: float, val_auc: float) -> tuple[float, float]:
    """Sort key, smaller is better: (primary, tie-break)."""
    if monitor == "val_auc" and math.isfinite(val_auc):
        return (-val_auc, val_loss)
    return (val_loss, -val_auc if math.isfinite(val_auc) else 0.0)


# ------------------------------------------------------------------------------ a whole run


@dataclass
class RunSummary:
    """What `train_run` produced (also on disk in the run directory)."""

    path: Path
    metrics: dict
    folds: list[str]
    n_slides: int
    classes: list[str]


def _featstore_version() -> str:
    try:
        from importlib.metadata import version

        return version("featstore")
    except Exception:  # noqa: BLE001 - metadata may be missing in a source checkout
        return "unknown"


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MilError(f"--out {out} is a file; choose a directory path")
    if (out / "config.json").exists() and not overwrite:
        raise MilError(f"--out {out} already holds a run; pass --overwrite or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in (*run_files.FILES, "attention.npz", "history.json"):
        (out / name).unlink(missing_ok=True)


def train_run(spec: RunSpec, cfg: TrainConfig,
              progress: Callable[[str, int, int, EpochLog], None] | None = None,
              on_stage: Callable[[str], None] | None = None) -> RunSummary:
    """Labels + store -> splits -> one head per fold -> run directory (see mil.run).

    ``progress(fold, fold_index, n_folds, log)`` is called after every bag and epoch;
    ``on_stage(text)`` at each stage (reading bags, writing plots).
    """
    from featstore.store import open_store
    from mil.data import load_bags, make_splits, match_store, read_labels
    from mil.metrics import fold_metrics, summarize

    stage = on_stage or (lambda text: log.info(text))
    out = Path(spec.out)
    labels = read_labels(spec.labels)
    store = open_store(spec.store)
    key = store.resolve_key(spec.encoder, spec.minus, spec.weights)
    have = [s for s in labels.slide_ids if store.has_features(s, key.encoder, key.minus, key.weights)]
    labels = match_store(labels, have, allow_missing=spec.allow_missing, store_name=f"{spec.store} ({key})")
    splits = make_splits(labels, folds=spec.folds, seed=cfg.seed, val_fraction=cfg.val_fraction,
                         train_fraction=spec.train_fraction)
    _prepare_out(out, spec.overwrite)
    used = sorted({labels.slide_ids[i] for s in splits for part in (s.train, s.val, s.test) for i in part})
    stage(f"reading {len(used)} bags of {key}")
    bags = load_bags(store, used, key, cache=spec.cache)
    provenance = {k: v for k, v in store.provenance(used[0], key.encoder, key.minus, key.weights).items()
                  if k != "slide"}
    provenance.update({"encoder": key.encoder, "weights": key.weights, "minus": key.minus, "dim": bags.dim})
    ids, y = labels.slide_ids, labels.y
    states, fold_res, histories, fold_m, rows, attention = {}, {}, {}, {}, [], {}
    model_config: dict = {}
    for fi, sp in enumerate(splits):
        cb = None if progress is None else (lambda e, _n=sp.name, _i=fi: progress(_n, _i, len(splits), e))
        res = fit(bags, [ids[i] for i in sp.train], y[sp.train], [ids[i] for i in sp.val], y[sp.val],
                  len(labels.classes), cfg, callback=cb)
        test_ids = [ids[i] for i in sp.test]
        probs, attn = score_bags(res.model, bags, test_ids, resolve_device(cfg.device))
        fold_m[sp.name] = fold_metrics(y[sp.test], probs, n_boot=spec.n_boot, seed=cfg.seed)
        fold_res[sp.name] = (y[sp.test], probs)
        histories[sp.name] = res.history_dict()
        states[sp.name] = res.model.state_dict()
        model_config = res.model.config
        for sid, i, p in zip(test_ids, sp.test, probs):
            rows.append({"slide_id": sid, "label": labels.classes[y[i]], "fold": sp.name, "probs": p})
            attention[(sp.name, sid)] = attn[sid]
        log.debug("fold %s: %s", sp.name, {k: fold_m[sp.name][k] for k in ("auc", "balanced_accuracy", "f1")})
    metrics = summarize(fold_m)
    stage(f"writing {out}")
    classes = list(labels.classes)
    write_json(out / "metrics.json", metrics)
    run_files.save_predictions(out, rows, classes)
    run_files.save_attention(out, attention)
    write_json(out / "history.json", histories)
    run_files.plot_roc(out, fold_res, classes, metrics)
    run_files.plot_curves(out, histories)
    run_files.save_models(out, states, model_config, classes, provenance)
    config = {
        "kind": "train", "encoder": key.encoder, "weights": key.weights, "minus": key.minus,
        **cfg.to_dict(), "folds": spec.folds, "fold_names": [s.name for s in splits],
        "train_fraction": spec.train_fraction, "allow_missing": spec.allow_missing,
        "store": str(spec.store), "labels": str(spec.labels), "classes": classes,
        "n_slides": len(labels), "provenance": provenance, "featstore_version": _featstore_version(),
        "splits": {s.name: s.to_dict(labels) for s in splits},
    }
    write_json(out / "config.json", config)  # written last: its presence marks a finished run
    return RunSummary(out, metrics, [s.name for s in splits], len(labels), classes)
