"""The MIL run directory: one writer for it (:class:`RunWriter`), and `load_run` to read it back.

Layout (docs/architecture.md "mil run directory", details in docs/mil.md, docs/finetune.md)::

    runs/NAME/
      config.json       run settings, store/labels paths, classes, store provenance, splits
      model.pt          {"state_dict": {fold: state_dict}, "config", "classes", "provenance", "folds"}
      metrics.json      {"folds": {fold: {auc, balanced_accuracy, f1, auc_ci, n}}, "mean", "std"}
      predictions.csv   slide_id,label,probability,fold[,prob_<class>...]
                        (survival: slide_id,time,event,risk,fold; regression: slide_id,target,prediction,fold;
                        --level patient: patient_id,slides instead of slide_id, slides ';'-joined)
      attention.npz     "<fold>/<slide_id>" -> (N,) float32 raw attention, rows = store coords (per
                        slide at either level: a patient's attention is cut back into its slides)
      history.json      per fold: epoch, train_loss, val_loss, val_auc, best_epoch
      roc.png, curves.png   (survival: km.png instead of roc.png; regression: scatter.png)
      encoder.pt, topk.json, predictions_frozen.csv    fine-tune runs only

config.json is written last: its presence marks a finished run. While a run is being written
the directory also holds ``.mil-run.lock`` (mil.outlock): a second writer of the same ``--out``
is refused instead of interleaving its files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from featstore.core.errors import first_line
from mil.errors import MilError, RunError
from mil.models import model_from_config
from mil.outlock import OutLock

log = logging.getLogger(__name__)

#: every file a run directory may hold; --overwrite removes exactly these before a new run
RUN_FILES = ("config.json", "model.pt", "metrics.json", "predictions.csv", "predictions_frozen.csv",
             "attention.npz", "history.json", "topk.json", "encoder.pt", "roc.png", "curves.png", "km.png",
             "scatter.png")
MODEL_FORMAT = 1


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _clean(float(o))
    if isinstance(o, (np.ndarray, tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(x):
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, data: dict) -> None:
    """Strict JSON (no NaN), written to a temporary name then renamed."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=_json_default, allow_nan=False) + "\n")
    tmp.replace(path)


def save_models(run_dir: Path, states: Mapping[str, dict], model_config: dict, classes: list[str],
                provenance: dict) -> Path:
    """model.pt: plain tensors and builtins only, so it loads with ``weights_only=True``."""
    path = Path(run_dir) / "model.pt"
    payload = {
        "format": MODEL_FORMAT,
        "state_dict": {f: {k: v.detach().cpu().clone() for k, v in sd.items()} for f, sd in states.items()},
        "folds": list(states),
        "config": json.loads(json.dumps(model_config, default=_json_default)),
        "classes": list(classes),
        "provenance": json.loads(json.dumps(_clean(provenance), default=_json_default)),
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


#: the id columns that start a predictions.csv row, per --level
ID_COLUMNS = {"slide": ("slide_id",), "patient": ("patient_id", "slides")}


def save_predictions(run_dir: Path, rows: list[dict], classes: list[str], name: str = "predictions.csv",
                     level: str = "slide") -> Path:
    """predictions.csv (or *name*); ``rows`` hold the id cells (:data:`ID_COLUMNS`), label (class
    name), fold, probs (C,).

    probability: binary P(classes[1]); multiclass P(predicted class) and prob_<class> columns.
    """
    path = Path(run_dir) / name
    multi = len(classes) > 2
    ids = ID_COLUMNS[level]
    header = [*ids, "label", "probability", "fold"] + ([f"prob_{c}" for c in classes] if multi else [])
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            p = np.asarray(r["probs"], dtype=np.float64)
            prob = p[1] if not multi else p.max()
            w.writerow([r[c] for c in ids] + [r.get("label", ""), f"{prob:.6f}", r["fold"]]
                       + ([f"{v:.6f}" for v in p] if multi else []))
    return path


#: predictions.csv columns of the tasks other than classification (after the id columns)
TASK_COLUMNS = {"survival": ("time", "event", "risk", "fold"),
                "regression": ("target", "prediction", "fold")}


def save_task_predictions(run_dir: Path, rows: list[dict], task: str, name: str = "predictions.csv",
                          level: str = "slide") -> Path:
    """predictions.csv of a survival or regression run (:data:`ID_COLUMNS` + :data:`TASK_COLUMNS`)."""
    path = Path(run_dir) / name
    cols = (*ID_COLUMNS[level], *TASK_COLUMNS[task])
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in cols])
    return path


def read_predictions(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def save_attention(run_dir: Path, attention: Mapping[tuple[str, str], np.ndarray]) -> Path | None:
    """attention.npz keyed ``"<fold>/<slide_id>"``; nothing is written for heads without attention."""
    arrays = {f"{fold}/{sid}": np.asarray(a, dtype=np.float32) for (fold, sid), a in attention.items()
              if a is not None}
    if not arrays:
        return None
    path = Path(run_dir) / "attention.npz"
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def plot_roc(run_dir: Path, fold_results: Mapping[str, tuple[np.ndarray, np.ndarray]],
             classes: list[str], metrics: dict) -> Path:
    """roc.png: one ROC per fold (binary) or per class one-vs-rest over all folds (multiclass)."""
    from sklearn.metrics import roc_curve

    from featstore.core.plotting import new_figure, save

    fig = new_figure(5, 5, layout=None)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    if len(classes) == 2:
        for fold, (y, p) in fold_results.items():
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            a = metrics["folds"][fold]["auc"]
            ax.plot(fpr, tpr, lw=1.5, label=f"{fold} (AUC {a:.3f})" if a is not None else fold)
        title = f"ROC, positive = {classes[1]}"
    else:
        y = np.concatenate([v[0] for v in fold_results.values()])
        p = np.concatenate([v[1] for v in fold_results.values()])
        for c, name in enumerate(classes):
            if 0 < (y == c).sum() < len(y):
                fpr, tpr, _ = roc_curve(y == c, p[:, c])
                ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest")
        title = "ROC, one vs rest (all folds)"
    m = metrics["mean"].get("auc")
    ax.set_title(title + (f"\nmean AUC {m:.3f}" if m is not None else ""))
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save(fig, Path(run_dir) / "roc.png", dpi=None)


def plot_km(run_dir: Path, results: Mapping[str, tuple[np.ndarray, np.ndarray]], cutoffs: Mapping[str, float],
            metrics: dict) -> Path:
    """km.png: Kaplan-Meier curves of the predicted high- and low-risk groups (every fold's test
    slides, cut at their fold model's median training risk), with the log-rank p."""
    from sksurv.nonparametric import kaplan_meier_estimator

    from featstore.core.plotting import new_figure, save
    from mil.tasks import risk_groups

    target, high = risk_groups(dict(results), dict(cutoffs))
    fig = new_figure(5.5, 4.5, layout=None)
    ax = fig.subplots()
    for flag, name, colour in ((False, "low risk", "C0"), (True, "high risk", "C3")):
        sel = high == flag
        if sel.any():
            t, s = kaplan_meier_estimator(target[sel, 1].astype(bool), target[sel, 0])
            ax.step(np.r_[0.0, t], np.r_[1.0, s], where="post", c=colour, lw=1.8,
                    label=f"{name} (n={int(sel.sum())}, events {int(target[sel, 1].sum())})")
    p = metrics.get("pooled", {}).get("logrank_p")
    c = metrics["mean"].get("c_index")
    ax.set_title("Kaplan-Meier by predicted risk (test slides of every fold)\n"
                 + (f"log-rank p = {p:.3g}" if p is not None else "log-rank p undefined")
                 + (f", mean C-index {c:.3f}" if c is not None else ""), fontsize=9)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return save(fig, Path(run_dir) / "km.png", dpi=None)


def plot_scatter(run_dir: Path, results: Mapping[str, tuple[np.ndarray, np.ndarray]], metrics: dict) -> Path:
    """scatter.png: predicted against true target, one colour per fold, with the identity line."""
    from featstore.core.plotting import new_figure, save

    fig = new_figure(5, 5, layout=None)
    ax = fig.subplots()
    y = np.concatenate([r[0] for r in results.values()])
    p = np.concatenate([r[1] for r in results.values()])
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", c="0.6", lw=1)
    for i, (fold, (yt, pt)) in enumerate(results.items()):
        ax.scatter(yt, pt, s=14, c=f"C{i % 10}", label=fold)
    cal = (metrics.get("pooled") or {}).get("calibration") or {}
    if cal.get("slope") is not None:   # true = a + b * predicted, drawn in these axes (x true, y predicted)
        b, a = cal["slope"], cal["intercept"]
        ax.plot([a + b * lo, a + b * hi], [lo, hi], c="k", lw=1.2,
                label=f"calibration: slope {b:.2f}, intercept {a:.2f}")
    r = metrics["mean"].get("pearson")
    ax.set_title("predicted vs true (dashed: perfect calibration)" + (f"\nmean Pearson r {r:.3f}" if r is not None else ""),
                 fontsize=9)
    ax.set_xlabel("true target")
    ax.set_ylabel("prediction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, Path(run_dir) / "scatter.png", dpi=None)


def plot_curves(run_dir: Path, histories: Mapping[str, dict]) -> Path:
    """curves.png: train/val loss (left) and val AUC (right; classification) per epoch, one line per fold."""
    from matplotlib.ticker import MaxNLocator

    from featstore.core.plotting import new_figure, save

    has_auc = any(v is not None for h in histories.values() for v in h.get("val_auc", []))
    fig = new_figure(10 if has_auc else 5.5, 4, layout=None)
    ax_l, ax_a = fig.subplots(1, 2) if has_auc else (fig.subplots(), None)
    for i, (fold, h) in enumerate(histories.items()):
        color = f"C{i % 10}"
        ep = h["epoch"]
        ax_l.plot(ep, h["train_loss"], c=color, lw=1.5, label=f"{fold} train")
        val = [np.nan if v is None else v for v in h["val_loss"]]
        ax_l.plot(ep, val, c=color, lw=1.5, ls="--", label=f"{fold} val")
        if ax_a is not None:
            ax_a.plot(ep, [np.nan if v is None else v for v in h["val_auc"]], c=color, lw=1.5, label=fold)
        if h.get("best_epoch"):
            ax_l.axvline(h["best_epoch"], c=color, lw=0.8, ls=":")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("cross-entropy" if has_auc else "loss")
    ax_l.set_title("loss (dotted: best epoch)")
    ax_l.legend(fontsize=7)
    if ax_a is not None:
        ax_a.set_xlabel("epoch")
        ax_a.set_ylabel("validation AUC")
        ax_a.set_ylim(0, 1.02)
        ax_a.set_title("validation AUC")
        ax_a.legend(fontsize=7)
    for ax in (ax_l, ax_a) if ax_a is not None else (ax_l,):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save(fig, Path(run_dir) / "curves.png", dpi=None)


def prepare_out(out: Path, overwrite: bool, parent: Path | None = None) -> OutLock:
    """Create *out* and claim it (:class:`~mil.outlock.OutLock`), then clear the run files of a
    finished run in it with *overwrite*; refuse a file, a directory another live run is writing,
    a finished run without *overwrite*, and the *parent* run a fine-tune reads.

    Returns the held claim; the caller releases it (RunWriter does, when it finishes or closes).
    A directory holding only an unfinished run (no config.json: interrupted, crashed) is reused.
    """
    if parent is not None and out.resolve() == Path(parent).resolve():
        raise MilError(f"--out {out} is the parent run itself; choose a new directory, e.g. {parent}-ft")
    if out.exists() and not out.is_dir():
        raise MilError(f"--out {out} is a file; choose a directory path")
    out.mkdir(parents=True, exist_ok=True)
    lock = OutLock(out).acquire()     # checked under the claim: two runs cannot both pass the test below
    try:
        if (out / "config.json").exists() and not overwrite:
            raise MilError(f"--out {out} already holds a run; pass --overwrite or choose another directory")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
            (out / (name + ".tmp")).unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


class RunWriter:
    """Writes one run directory: claims and prepares ``--out`` on creation, then its files, then
    :meth:`finish` writes config.json last (its presence marks a finished run) and releases the
    claim. While a writer holds ``--out`` (``.mil-run.lock``), another one is refused; use it as a
    context manager (or call :meth:`close`) so a failed run releases it too.

    Only the names in :data:`RUN_FILES` can be written, so the list of what a run may hold (and
    what ``--overwrite`` clears) stays in one place.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, parent: str | Path | None = None):
        self.path = Path(out)
        self._lock = prepare_out(self.path, overwrite, None if parent is None else Path(parent))
        self.finished = False

    def close(self) -> None:
        """Give up the claim on the directory (after :meth:`finish`, or when the run failed or was
        interrupted: what was written stays, without config.json, and a rerun replaces it)."""
        self._lock.release()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file(self, name: str) -> Path:
        """The path of run file *name* (for files written elsewhere, e.g. the encoder checkpoint)."""
        if name not in RUN_FILES:
            raise ValueError(f"{name!r} is not a run file; add it to mil.run.RUN_FILES")
        if self.finished:
            raise RunError(f"{self.path} is finished (config.json written); start a new RunWriter")
        return self.path / name

    def json(self, name: str, data: dict) -> Path:
        """Strict JSON run file (metrics.json, history.json, topk.json)."""
        path = self.file(name)
        write_json(path, data)
        return path

    def models(self, states: Mapping[str, dict], model_config: dict, classes: list[str], provenance: dict) -> Path:
        """model.pt: one head state_dict per fold."""
        self.file("model.pt")
        return save_models(self.path, states, model_config, classes, provenance)

    def predictions(self, rows: list[dict], classes: list[str], name: str = "predictions.csv",
                    task: str = "classification", level: str = "slide") -> Path:
        """predictions.csv (or predictions_frozen.csv)."""
        self.file(name)
        if task != "classification":
            return save_task_predictions(self.path, rows, task, name, level)
        return save_predictions(self.path, rows, classes, name, level)

    def attention(self, attention: Mapping[tuple[str, str], np.ndarray]) -> Path | None:
        """attention.npz (nothing for heads without attention)."""
        self.file("attention.npz")
        return save_attention(self.path, attention)

    def plots(self, fold_results: Mapping[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
              metrics: dict, histories: Mapping[str, dict], *, task: str = "classification",
              cutoffs: Mapping[str, float] | None = None) -> None:
        """curves.png and the task's picture: roc.png, km.png (survival) or scatter.png (regression)."""
        if task == "survival":
            self.file("km.png")
            plot_km(self.path, fold_results, cutoffs or {}, metrics)
        elif task == "regression":
            self.file("scatter.png")
            plot_scatter(self.path, fold_results, metrics)
        else:
            self.file("roc.png")
            plot_roc(self.path, fold_results, classes, metrics)
        plot_curves(self.path, histories)

    def finish(self, config: dict) -> Path:
        """config.json, written last; the writer accepts no file after it."""
        path = self.json("config.json", config)
        self.finished = True
        self.close()
        return path


@dataclass
class Run:
    """A run directory read back: config, classes, one state_dict per fold."""

    path: Path
    config: dict
    classes: list[str]
    model_config: dict
    provenance: dict
    states: dict[str, dict] = field(repr=False)

    @property
    def folds(self) -> list[str]:
        return list(self.states)

    @property
    def task(self) -> str:
        """classification | survival | regression (runs before survival existed: classification)."""
        return str(self.config.get("task", "classification"))

    @property
    def level(self) -> str:
        """slide | patient (the unit the heads were trained and scored on)."""
        return str(self.config.get("level", "slide"))

    def require_slide_level(self, what: str) -> None:
        """One line for the commands not built for patient-level runs yet."""
        if self.level != "slide":
            raise RunError(f"{what} takes slide-level runs for now; {self.path} was trained with --level "
                           f"{self.level} (its metrics.json and predictions.csv hold the results)")

    def require_classification(self, what: str) -> None:
        """One line for the commands that read class probabilities and are not built for other tasks yet."""
        if self.task != "classification":
            raise RunError(f"{what} takes classification runs for now; {self.path} is a {self.task} run "
                           "(its metrics.json, predictions.csv and km.png/scatter.png hold the results)")

    def model(self, fold: str) -> nn.Module:
        """The head of *fold* in eval mode."""
        if fold not in self.states:
            raise RunError(f"{self.path}: no fold {fold!r} (folds: {', '.join(self.states)})")
        m = model_from_config(self.model_config)
        try:
            m.load_state_dict(self.states[fold])
        except RuntimeError as exc:
            raise RunError(f"{self.path / 'model.pt'}: weights of fold {fold!r} do not fit this version's "
                           f"{self.model_config.get('name')} head ({first_line(exc)}); retrain the run") from None
        return m.eval()

    def models(self) -> dict[str, nn.Module]:
        return {f: self.model(f) for f in self.states}

    @property
    def metrics(self) -> dict | None:
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def attention(self, fold: str, slide_id: str) -> np.ndarray | None:
        """Saved raw attention of a test slide, or None."""
        p = self.path / "attention.npz"
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            key = f"{fold}/{slide_id}"
            return z[key] if key in z.files else None


def load_run(run_dir: str | Path) -> Run:
    """Read config.json and model.pt of a run (``weights_only=True``); RunError if incomplete."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist; train one with `mil train --out {run_dir}`")
    for name in ("config.json", "model.pt"):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} has no {name}; it is not a finished run (rerun `mil train`)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{run_dir / 'config.json'} is not valid JSON ({exc}); rerun `mil train`") from None
    try:
        payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as exc:
        raise RunError(f"{run_dir / 'model.pt'} cannot be read ({first_line(exc)}); rerun `mil train`") from None
    if not isinstance(payload, dict) or not {"state_dict", "config", "classes"} <= set(payload):
        raise RunError(f"{run_dir / 'model.pt'} lacks state_dict/config/classes; rerun `mil train`")
    states = payload["state_dict"]
    if states and all(isinstance(v, torch.Tensor) for v in states.values()):
        states = {"test": states}  # a single bare state_dict (e.g. written by another tool)
    return Run(run_dir, config, list(payload["classes"]), dict(payload["config"]),
               dict(payload.get("provenance", {})), dict(states))
