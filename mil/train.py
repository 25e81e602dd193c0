"""Training MIL heads (one bag per step, early stopping on a validation split) and a whole `mil train` run.

The epochs, early stopping and best-state restore are :func:`featstore.core.fit.fit`; this module
supplies the MIL epoch (bags in a seeded order, one optimiser step per bag) and the validation
metrics. Deterministic on CPU for a fixed seed (and thread count): the global torch RNG is
forked and seeded (model init, dropout), the epoch order comes from a seeded numpy generator;
on CUDA, deterministic algorithms are switched on for the duration of the fit. Progress is
reported through an optional callback so commands can draw a progress bar; the library itself
only logs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from featstore.tags import WeightsTag
import torch
from torch import nn

from featstore.core import fit as core_fit
from featstore.core.runtime import cpu_threads, deterministic, resolve_device
from mil.config import _OPTIMIZERS, RunSpec, TrainConfig
from mil.data import Bags, PatientBags, Split
from mil.errors import LabelsError, MilError
from featstore.core.labels import Labels
from mil.models import create_mil_model
from mil.run import RunWriter
from mil.scoring import bag_outputs, score_bags, val_metrics
from mil.tasks import Classification, Survival, Task, check_options, make_task

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

    @classmethod
    def of(cls, record: core_fit.EpochRecord) -> "EpochLog":
        m = record.metrics
        return cls(record.epoch, record.epochs, record.train_loss, m.get("val_loss", math.nan),
                   m.get("val_auc", math.nan), record.improved)


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


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam/AdamW; the fused kernel (one op for all parameters) when this torch has it."""
    cls = _OPTIMIZERS[cfg.optimizer]
    # measured on this 2-core CPU: the plain single-tensor loop beats fused/foreach for heads of
    # ~10^5 parameters (1.7 vs 3.0 ms per step); fused pays on CUDA.
    if next(model.parameters()).is_cuda:
        return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


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


def _bag_epoch(model: nn.Module, opt: torch.optim.Optimizer, bags: Bags, train_ids: Sequence[str],
               rows: np.ndarray, task: Task, rng: np.random.Generator, device: torch.device, epochs: int,
               callback: Callable[[EpochLog], None] | None) -> Callable[[int], float]:
    """The epoch function for featstore.core.fit: the training bags in a fresh seeded order, one
    optimiser step per ``task.bags_per_step`` bags (1 for classification and regression; a batch
    for the Cox loss, whose risk sets need several slides)."""
    per_step = max(1, task.bags_per_step)

    def train_epoch(epoch: int) -> float:
        model.train()
        order = rng.permutation(len(train_ids))
        ids = [train_ids[i] for i in order]

        def steps():
            outs: list[torch.Tensor] = []
            for step, (_, bag) in enumerate(bags.iterate(ids)):
                out, _ = model(bag.to(device, non_blocking=device.type == "cuda"))
                outs.append(out)
                if len(outs) < per_step and step + 1 < len(ids):
                    continue
                loss = task.loss(torch.stack(outs), rows[order[step + 1 - len(outs):step + 1]])
                outs = []
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    opt.step()
                yield float(loss.detach())

        on_step = None if callback is None else (lambda done, mean: callback(EpochLog(
            epoch, epochs, mean, math.nan, math.nan, False, step="bag", done=min(done * per_step, len(ids)),
            total=len(ids))))
        return core_fit.mean_loss(steps(), on_step)

    return train_epoch


def _task_val(model: nn.Module, bags: Bags, val_ids: Sequence[str], val_rows: np.ndarray, task: Task,
              device: torch.device) -> dict[str, float]:
    """Validation numbers the loop monitors: classification as always (NLL, AUC), other tasks their loss."""
    if isinstance(task, Classification):
        return val_metrics(model, bags, val_ids, task.labels.y[val_rows], device)
    out, _ = bag_outputs(model, bags, val_ids, device)
    return {"val_loss": task.val_loss(torch.as_tensor(out, dtype=torch.float32), val_rows), "val_auc": math.nan}


def fit_task(bags: Bags, task: Task, train_rows: np.ndarray, val_rows: np.ndarray, cfg: TrainConfig,
             callback: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train a fresh head for *task* on the bags of label rows *train_rows*; early-stop on *val_rows*.

    Returns the head with the weights of its best validation epoch (or the last epoch when
    there is no validation set, or when the validation loss is undefined, e.g. no event)."""
    ids = task.labels.slide_ids
    train_ids, val_ids = [ids[i] for i in train_rows], [ids[i] for i in val_rows]
    if len(train_ids) == 0:
        raise MilError("no training slides; check the labels and splits")
    device = resolve_device(cfg.device)
    has_val = len(val_ids) > 0
    if has_val and not task.val_defined(np.asarray(val_rows)):
        log.warning("the %d validation slides cannot score the %s loss (no event among them): training %d "
                    "epochs without early stopping", len(val_ids), task.name, cfg.epochs)
        has_val = False
    elif not has_val:
        log.warning("no validation slides: training %d epochs without early stopping", cfg.epochs)
    check_options(task.name, cfg.model, cfg.monitor)
    with deterministic(cfg.seed, device), cpu_threads(cfg.threads or 1):   # 0: auto = 1 thread (see TrainConfig)
        model = create_mil_model(cfg.model, bags.dim, task.n_outputs(), **cfg.widths())
        model.set_input_stats(*instance_stats(bags, train_ids))
        model = model.to(device)
        opt = _make_optimizer(cfg, model)
        rng = np.random.default_rng([cfg.seed, 3])
        train_epoch = _bag_epoch(model, opt, bags, train_ids, np.asarray(train_rows), task, rng, device,
                                 cfg.epochs, callback)
        evaluate = (lambda epoch: _task_val(model, bags, val_ids, np.asarray(val_rows), task, device)) \
            if has_val else None
        res = core_fit.fit(model, train_epoch, evaluate, epochs=cfg.epochs, patience=cfg.patience,
                           monitor=cfg.monitor,
                           on_epoch=None if callback is None else (lambda r: callback(EpochLog.of(r))),
                           diverged=lambda e, loss: MilError(f"training diverged at epoch {e} (loss {loss}); "
                                                             "lower --lr"))
    return TrainResult(model, [EpochLog.of(r) for r in res.history], res.best_epoch, res.stopped_early)


def fit(bags: Bags, train_ids: Sequence[str], train_y: np.ndarray, val_ids: Sequence[str],
        val_y: np.ndarray, n_classes: int, cfg: TrainConfig,
        callback: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train a fresh classification head from *cfg* on the train bags; early-stop on the val bags if any.

    Returns the head with the weights of its best validation epoch (or the last epoch when
    there is no validation set).
    """
    ids = tuple(train_ids) + tuple(val_ids)
    y = np.concatenate([np.asarray(train_y, np.int64), np.asarray(val_y, np.int64)])
    labels = Labels("", ids, y, tuple(str(c) for c in range(n_classes)), ids)
    n = len(train_ids)
    return fit_task(bags, Classification(labels, np.arange(n)), np.arange(n), np.arange(n, len(ids)), cfg, callback)


# ------------------------------------------------------------------------------ a whole run


@dataclass
class RunSummary:
    """What `train_run` produced (also on disk in the run directory)."""

    path: Path
    metrics: dict
    folds: list[str]
    n_slides: int
    classes: list[str]
    task: str = "classification"
    level: str = "slide"
    n_units: int = 0          # slides, or patients at --level patient


@dataclass
class _Folds:
    """Every fold's fitted head, test probabilities and history."""

    states: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)       # fold -> (y_test, probs)
    histories: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)          # predictions.csv rows
    attention: dict = field(default_factory=dict)     # (fold, slide_id) -> raw attention
    model_config: dict = field(default_factory=dict)
    cutoffs: dict = field(default_factory=dict)       # survival: fold -> median training risk (risk groups)
    task_config: dict = field(default_factory=dict)   # fold -> what a reader needs besides the head (bins, scaling)


def _train_folds(bags: Bags, labels: Labels, splits: Sequence[Split], cfg: TrainConfig, n_boot: int,
                 device: torch.device, progress: Callable[[str, int, int, EpochLog], None] | None) -> _Folds:
    """One head per fold (the labels' task, fitted on the fold's training slides), scored on its test slides."""
    ids, y = labels.slide_ids, labels.y
    out = _Folds()
    for fi, sp in enumerate(splits):
        cb = None if progress is None else (lambda e, _n=sp.name, _i=fi: progress(_n, _i, len(splits), e))
        task = make_task(labels, sp.train, survival_loss=cfg.survival_loss, time_bins=cfg.time_bins,
                         cox_batch=cfg.cox_batch)
        res = fit_task(bags, task, sp.train, sp.val, cfg, cb)
        test_ids = [ids[i] for i in sp.test]
        if isinstance(task, Classification):
            pred, attn = score_bags(res.model, bags, test_ids, device)
            out.metrics[sp.name] = task.fold_metrics(sp.test, pred, n_boot=n_boot, seed=cfg.seed)
            if len(set(y[sp.test].tolist())) < 2:
                log.warning("fold %s: every test slide is of one class (%s); its AUC is undefined (null) and "
                            "left out of the mean", sp.name, labels.classes[int(y[sp.test][0])])
            out.results[sp.name] = (y[sp.test], pred)
        else:
            raw, attn = bag_outputs(res.model, bags, test_ids, device)
            pred = task.predict(raw)
            extra = {}
            if isinstance(task, Survival):
                train_raw, _ = bag_outputs(res.model, bags, [ids[i] for i in sp.train], device)
                extra = {"train_pred": task.predict(train_raw), "test_out": raw}
                out.cutoffs[sp.name] = float(np.median(extra["train_pred"]))
            out.metrics[sp.name] = task.fold_metrics(sp.test, pred, n_boot=n_boot, seed=cfg.seed, **extra)
            out.results[sp.name] = (labels.target[sp.test], pred)
            out.task_config[sp.name] = task.config()
            if sp.name in out.cutoffs:   # what `mil evaluate` splits an external cohort's risk groups at
                out.task_config[sp.name]["risk_cutoff"] = out.cutoffs[sp.name]
        out.histories[sp.name] = res.history_dict()
        out.states[sp.name] = res.model.state_dict()
        out.model_config = res.model.config
        for sid, i, p in zip(test_ids, sp.test, pred):
            out.rows.append({**_unit_cells(bags, sid), "fold": sp.name, **task.row(i, p)})
            for slide, a in _slide_attention(bags, sid, attn[sid]).items():
                out.attention[(sp.name, slide)] = a
        log.debug("fold %s: %s", sp.name, {k: out.metrics[sp.name].get(k) for k in task.keys})
    return out


def _unit_cells(bags, unit: str) -> dict:
    """predictions.csv id cells of a unit: its slide, or a patient and its slides (';'-joined)."""
    if isinstance(bags, PatientBags):
        return {"patient_id": unit, "slides": ";".join(bags.members[unit])}
    return {"slide_id": unit}


def _slide_attention(bags, unit: str, attention) -> dict:
    """A unit's raw attention by slide (a patient's is cut back into its slides)."""
    return bags.split_attention(unit, attention) if isinstance(bags, PatientBags) else {unit: attention}


def late_fusion(labels: Labels, splits: Sequence[Split], results: dict, cfg: TrainConfig, n_boot: int) -> dict | None:
    """Patient metrics of a slide-level run: each test patient's slide predictions averaged (late
    fusion, :func:`mil.data.patient_means`), scored per fold as the slides are. None when every
    patient has one slide, or when a patient's slides disagree on the label."""
    from mil.data import patient_means, patient_rows
    from mil.metrics import summarize
    from mil.tasks import task_keys

    if len(set(labels.patients)) == len(labels):
        return None
    try:
        pooled, patient_row = patient_rows(labels)
    except LabelsError as exc:
        log.warning("no patient-level metrics: %s", exc)
        return None
    per_fold = {}
    for sp in splits:
        rows, pred = patient_means(patient_row, sp.test, results[sp.name][1])
        task = make_task(pooled, np.unique(patient_row[sp.train]), survival_loss=cfg.survival_loss,
                         time_bins=cfg.time_bins, cox_batch=cfg.cox_batch)
        per_fold[sp.name] = task.fold_metrics(rows, pred, n_boot=n_boot, seed=cfg.seed)
    return {"fusion": "mean of the patient's slide predictions", "n_patients": len(pooled),
            **summarize(per_fold, task_keys(labels.task))}


def train_run(spec: RunSpec, cfg: TrainConfig,
              progress: Callable[[str, int, int, EpochLog], None] | None = None,
              on_stage: Callable[[str], None] | None = None) -> RunSummary:
    """Labels + store -> splits -> one head per fold -> run directory (see mil.run).

    ``progress(fold, fold_index, n_folds, log)`` is called after every bag and epoch;
    ``on_stage(text)`` at each stage (reading bags, writing plots).
    """
    from featstore import __version__ as featstore_version
    from featstore.store import open_store
    from mil.data import load_bags, make_splits
    from featstore.core.labels import match_store, pool_patients, read_labels
    from mil.metrics import summarize
    from mil.tasks import pooled_regression, pooled_survival, task_keys

    stage = on_stage or (lambda text: log.info(text))
    device = resolve_device(cfg.device)   # a bad --device fails before any work
    labels = read_labels(spec.labels, error=LabelsError, task=spec.task, column=spec.target,
                         others=spec.targets or ())
    check_options(labels.task, cfg.model, cfg.monitor)   # before any work
    store = open_store(spec.store)
    key = store.resolve_key(spec.encoder, spec.minus, spec.weights)
    have = [s for s in labels.slide_ids if store.has_features(s, key.encoder, key.minus, key.weights)]
    labels = match_store(labels, have, allow_missing=spec.allow_missing, store_name=f"{spec.store} ({key})",
                         error=LabelsError)
    slide_labels, members = labels, None
    if spec.level == "patient":
        labels, members = pool_patients(labels, error=LabelsError)
        log.info("--level patient: %d slides pooled into %d patient bags", len(slide_labels), len(labels))
    splits = make_splits(labels, folds=spec.folds, seed=cfg.seed, val_fraction=cfg.val_fraction,
                         train_fraction=spec.train_fraction, split=spec.split)
    with RunWriter(spec.out, overwrite=spec.overwrite) as writer:   # claims --out until finished or failed
        used = sorted({labels.slide_ids[i] for s in splits for part in (s.train, s.val, s.test) for i in part})
        if members is not None:
            used = sorted(s for p in used for s in members[p])
        stage(f"reading {len(used)} bags of {key}")
        bags = load_bags(store, used, key, cache=spec.cache)
        units = bags if members is None else PatientBags(bags, members)
        provenance = {k: v for k, v in store.provenance(used[0], key.encoder, key.minus, key.weights).items()
                      if k != "slide"}
        # "weights": the encoder's weights (a stain-normalised key's -stain- part lives in "stain"), so
        # the run's encoder can be rebuilt and another store's provenance compared field by field
        provenance.update({"encoder": key.encoder, "weights": WeightsTag.parse(key.weights).weights, "minus": key.minus,
                           "dim": bags.dim})
        folds = _train_folds(units, labels, splits, cfg, spec.n_boot, device, progress)
        metrics = summarize(folds.metrics, task_keys(labels.task))
        metrics["level"] = spec.level
        if labels.task == "survival":
            metrics["pooled"] = pooled_survival(folds.results, folds.cutoffs)
        elif labels.task == "regression":
            metrics["pooled"] = pooled_regression(folds.results, n_boot=spec.n_boot, seed=cfg.seed)
        if members is None:
            fused = late_fusion(labels, splits, folds.results, cfg, spec.n_boot)
            if fused is not None:
                metrics["patient"] = fused
        stage(f"writing {writer.path}")
        classes = list(labels.classes) if labels.task == "classification" else []
        writer.json("metrics.json", metrics)
        writer.predictions(folds.rows, classes, task=labels.task, level=spec.level)
        writer.attention(folds.attention)
        writer.json("history.json", folds.histories)
        writer.plots(folds.results, classes, metrics, folds.histories, task=labels.task, cutoffs=folds.cutoffs)
        writer.models(folds.states, folds.model_config, classes, provenance)
        writer.finish({
            "kind": "train", "task": labels.task, "level": spec.level, "target": spec.target,
            "other_targets": list(spec.targets or ()),
            **({"patients": {p: list(m) for p, m in members.items()}} if members is not None else {}), "task_config": folds.task_config, "encoder": key.encoder, "weights": key.weights, "minus": key.minus,
            **cfg.to_dict(), "folds": spec.folds, "fold_names": [s.name for s in splits],
            "split": spec.split, "train_fraction": spec.train_fraction, "allow_missing": spec.allow_missing,
            "store": str(spec.store), "labels": str(spec.labels), "classes": classes,
            "n_slides": len(slide_labels), "n_units": len(labels), "provenance": provenance, "featstore_version": featstore_version,
            "splits": {s.name: s.to_dict(labels) for s in splits},
        })
    return RunSummary(writer.path, metrics, [s.name for s in splits], len(slide_labels), classes, labels.task,
                      spec.level, len(labels))


def train_targets(spec: RunSpec, cfg: TrainConfig,
                  progress: Callable[[str, int, int, EpochLog], None] | None = None,
                  on_stage: Callable[[str], None] | None = None) -> dict[str, RunSummary]:
    """``--targets a,b``: one :func:`train_run` per label column into ``OUT/<column>/`` (each its own
    task, folds and heads, reported apart), then ``OUT/targets.json``: every target's task, slides
    and mean metrics side by side. A target that fails is one line in targets.json; the others
    still run; if every target fails, the first error is raised."""
    from dataclasses import replace

    from mil.run import write_json

    targets = list(dict.fromkeys(spec.targets or ()))
    if not targets:
        raise MilError("--targets names no column; pass label columns, e.g. --targets msi,braf")
    root = Path(spec.out)
    if root.exists() and not root.is_dir():
        raise MilError(f"--out {root} is a file; choose a directory path")
    bad = [t for t in targets if not t or t in (".", "..") or "/" in t or "\\" in t]
    if bad:
        raise MilError(f"--targets {', '.join(map(repr, bad))}: a target column names its run folder; rename it")
    from featstore.core.labels import read_labels

    for t in targets:   # every column read and checked before any training: a typo costs no run
        read_labels(spec.labels, error=LabelsError, task=spec.task, column=t, others=targets)
    done: dict[str, RunSummary] = {}
    failed: dict[str, str] = {}
    first: Exception | None = None
    for t in targets:
        (on_stage or log.info)(f"target {t}")
        sub = replace(spec, out=str(root / t), target=t, targets=[x for x in targets if x != t])
        try:
            tagged = None if progress is None else (lambda f, i, n, e, _t=t: progress(f"{_t} {f}", i, n, e))
            done[t] = train_run(sub, cfg, tagged, on_stage)
        except MilError as exc:
            log.warning("target %s: %s", t, exc)
            failed[t] = str(exc)
            first = first or exc
    if not done:
        raise first
    summary = {t: {"task": r.task, "n_slides": r.n_slides, "run": t, "mean": r.metrics["mean"],
                   "std": r.metrics["std"]} for t, r in done.items()}
    summary.update({t: {"error": e} for t, e in failed.items()})
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "targets.json", {"targets": targets, "runs": summary})
    return done


__all__ = ["EpochLog", "TrainResult", "RunSummary", "RunSpec", "TrainConfig", "fit", "train_run", "train_targets",
           "instance_stats", "score_bags"]
