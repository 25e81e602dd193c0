"""External validation: score a second cohort (another site or scanner) with every fold head of a run.

The external cohort is read like `mil train` reads its own (``read_labels`` + ``match_store``),
its store must hold features of the same provenance as the run's (encoder, weights, level, dim,
preprocessing and tiling: tile size, target mpp, overlap; the slide reader may differ), and the
metrics are the run's own (:func:`mil.metrics.fold_metrics`: AUC, macro one-vs-rest for
multiclass, a seeded stratified bootstrap CI, balanced accuracy and F1 at argmax), so internal and
external numbers can be set side by side. Used by `mil evaluate` and by the study layer.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from featstore.core.runtime import resolve_device
from featstore.core.stats import auc
from featstore.errors import StoreError
from featstore.store import FeatureKey, Store, open_store
from mil.data import load_bags
from mil.errors import LabelsError, MilError
from featstore.core.labels import Labels, match_store, pool_patients, read_labels
from mil.data import PatientBags
from mil.metrics import fold_metrics
from mil.predict import check_store, run_key
from mil.run import Run, load_run, read_predictions, write_json
from mil.scoring import score_bags

log = logging.getLogger(__name__)

#: tiling fields that change what a feature vector sees; min_tissue/mask only select tiles
TILING_MUST_MATCH = ("patch_size", "mpp", "overlap")
EXTERNAL_DIR = "external"
FILES = ("metrics.json", "predictions.csv", "summary.md")


@dataclass
class ExternalResult:
    """Scores and metrics of one run on one external cohort; :meth:`write` saves them."""

    run_path: Path
    name: str
    classes: list[str]
    slide_ids: list[str]
    patients: list[str]
    y: np.ndarray                                  # (n,) index into classes (the run's)
    fold_probs: dict[str, np.ndarray] = field(repr=False)   # fold -> (n, C)
    metrics: dict = field(default_factory=dict)
    members: dict | None = None                    # --level patient runs: patient -> its slides

    @property
    def probs(self) -> np.ndarray:
        """Ensemble probabilities (n, C): the mean over folds, as `mil predict` gives."""
        return np.mean(np.stack(list(self.fold_probs.values())), axis=0)

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def default_dir(self) -> Path:
        return self.run_path / EXTERNAL_DIR / self.name

    def write(self, out: str | Path | None = None) -> Path:
        """metrics.json, predictions.csv, summary.md in *out* (default RUN/external/NAME), each atomically."""
        out = Path(out) if out is not None else self.default_dir()
        if out.exists() and not out.is_dir():
            raise MilError(f"--out {out} is a file; choose a directory path")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", self.metrics)
        _write_text(out / "predictions.csv", self.predictions_csv())
        _write_text(out / "summary.md", summary_markdown(self.metrics))
        return out

    def predictions_csv(self) -> str:
        """slide_id,patient_id,label,prob_<class>...,predicted,<fold>_prob_<class>...
        (patient-level runs: patient_id,slides,label,...)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        folds = list(self.fold_probs)
        w.writerow([*_id_header(self.members), "label", *(f"prob_{c}" for c in self.classes), "predicted",
                    *(f"{f}_prob_{c}" for f in folds for c in self.classes)])
        probs = self.probs
        for i, sid in enumerate(self.slide_ids):
            per_fold = [f"{v:.6f}" for f in folds for v in self.fold_probs[f][i]]
            w.writerow([*_id_cells(sid, self.patients[i], self.members), self.classes[self.y[i]],
                        *(f"{v:.6f}" for v in probs[i]), self.predicted[i], *per_fold])
        return buf.getvalue()


def _id_header(members: dict | None) -> list[str]:
    return ["slide_id", "patient_id"] if members is None else ["patient_id", "slides"]


def _id_cells(unit: str, patient: str, members: dict | None) -> list[str]:
    return [unit, patient] if members is None else [unit, ";".join(members[unit])]


@dataclass
class ExternalValues:
    """A survival or regression run on an external cohort: each fold head's risk or value, their
    mean (the ensemble) and the task's metrics; :meth:`write` saves them as ExternalResult does."""

    run_path: Path
    name: str
    task: str
    ids: list[str]
    patients: list[str]
    target: np.ndarray                              # survival (n, 2) [time, event]; regression (n,)
    fold_values: dict[str, np.ndarray] = field(repr=False)
    metrics: dict = field(default_factory=dict)
    members: dict | None = None

    @property
    def values(self) -> np.ndarray:
        return np.mean(np.stack(list(self.fold_values.values())), axis=0)

    def default_dir(self) -> Path:
        return self.run_path / EXTERNAL_DIR / self.name

    write = ExternalResult.write

    def predictions_csv(self) -> str:
        """<ids>,time,event|target,risk|prediction (the ensemble),<fold>_risk|<fold>_prediction..."""
        from mil.predict import VALUE_COLUMN

        col = VALUE_COLUMN[self.task]
        truth = ("time", "event") if self.task == "survival" else ("target",)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*_id_header(self.members), *truth, col, *(f"{f}_{col}" for f in self.fold_values)])
        values = self.values
        for i, u in enumerate(self.ids):
            t = np.atleast_1d(self.target[i])
            cells = [f"{t[0]:.6g}", str(int(t[1]))] if self.task == "survival" else [f"{t[0]:.6g}"]
            w.writerow([*_id_cells(u, self.patients[i], self.members), *cells, f"{values[i]:.6g}",
                        *(f"{v[i]:.6g}" for v in self.fold_values.values())])
        return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------ checks


def run_tiling(run: Run) -> dict | None:
    """The tiling the run's features were cut with (their provenance; older runs: the training store's)."""
    tiling = run.provenance.get("tiling") or (run.config.get("provenance") or {}).get("tiling")
    if tiling:
        return dict(tiling)
    src = run.config.get("store")
    if src and Path(src).exists():
        try:
            return dict(open_store(src).tiling or {}) or None
        except (StoreError, OSError):
            return None
    return None


def store_tiling(store: Store, slide_id: str, key: FeatureKey) -> dict | None:
    """The tiling of one features array (its provenance), else the store-level tiling."""
    prov = store.provenance(slide_id, key.encoder, key.minus, key.weights)
    return dict(prov.get("tiling") or store.tiling or {}) or None


def check_tiling(run: Run, store: Store, key: FeatureKey, slide_id: str) -> None:
    """MilError naming each tiling field (tile size, mpp, overlap) that differs, with both values."""
    a, b = run_tiling(run), store_tiling(store, slide_id, key)
    if not a or not b:
        log.warning("tiling of %s not recorded for %s; tile size and mpp are not checked",
                    "run " + str(run.path) if not a else "store " + str(store.path), key)
        return
    diff = [f"tiling.{k}: run {a[k]!r} vs store {b[k]!r}" for k in TILING_MUST_MATCH
            if k in a and k in b and not _same(a[k], b[k])]
    if diff:
        raise MilError(f"{store.path}: features {key} were tiled differently from run {run.path}'s "
                       f"({'; '.join(diff)}); re-extract with the run's tiling")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def run_labels(labels: Labels, classes: Sequence[str]) -> np.ndarray:
    """Labels' y re-indexed into the run's classes; MilError naming a class the run lacks."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in labels.classes if c not in index]
    if unknown:
        raise MilError(f"{labels.path}: class(es) {', '.join(map(repr, unknown))} not among the run's classes "
                       f"({', '.join(classes)}); relabel or drop those slides")
    y = np.array([index[labels.classes[i]] for i in labels.y], dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise MilError(f"{labels.path}: only class {classes[int(y[0])]!r} present; AUC needs two classes")
    return y


# ------------------------------------------------------------------------------ metrics


def internal_metrics(run: Run, *, n_boot: int, seed: int) -> dict:
    """The run's own CV numbers (metrics.json) and the pooled out-of-fold AUC with the same bootstrap CI."""
    m = run.metrics
    if m is None:
        raise MilError(f"{run.path} has no metrics.json; rerun `mil train`")
    out = {"folds": {f: {k: v.get(k) for k in ("n", "auc", "auc_ci", "balanced_accuracy")}
                     for f, v in m["folds"].items()},
           "mean": {k: m["mean"].get(k) for k in ("auc", "balanced_accuracy")},
           "std": {k: m["std"].get(k) for k in ("auc", "balanced_accuracy")},
           "pooled": _pooled_oof(run, n_boot=n_boot, seed=seed)}
    return out


def _pooled_oof(run: Run, *, n_boot: int, seed: int) -> dict | None:
    """AUC and CI of every out-of-fold test prediction of the run pooled (None when not recorded)."""
    path = run.path / "predictions.csv"
    if not path.is_file():
        return None
    rows = read_predictions(path)
    classes = list(run.classes)
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in rows if r.get("label") in index]
    if not rows:
        return None
    y = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    if len(classes) == 2:
        p1 = np.array([float(r["probability"]) for r in rows])
        probs = np.stack([1 - p1, p1], 1)
    else:
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    if len(np.unique(y)) < 2:
        return None
    m = fold_metrics(y, probs, n_boot=n_boot, seed=seed)
    return {k: m[k] for k in ("n", "auc", "auc_ci", "balanced_accuracy")}


def per_class(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class of the run: slides, recall at argmax, one-vs-rest AUC (None when undefined)."""
    pred = probs.argmax(1)
    out = {}
    for c, name in enumerate(classes):
        pos = y == c
        n = int(pos.sum())
        ovr = float(auc(pos.astype(np.int64), probs[:, c])) if 0 < n < len(y) else None
        out[name] = {"n": n, "recall": float((pred[pos] == c).mean()) if n else None, "auc_ovr": ovr}
    return out


# ------------------------------------------------------------------------------ the evaluation


def _units(run: Run, store: Store, key: FeatureKey, lab: Labels) -> tuple[Labels, object, dict | None]:
    """(labels, bags, members) of what the run scores: slides, or for a ``--level patient`` run the
    external patients, each one bag of all its slides (members: patient -> slides)."""
    bags = load_bags(store, list(lab.slide_ids), key, expected_dim=int(run.model_config["in_dim"]))
    if run.level != "patient":
        return lab, bags, None
    pooled, members = pool_patients(lab, error=LabelsError)
    return pooled, PatientBags(bags, members), members


def _score_folds(run: Run, bags, ids: list[str], device: str,
                 progress: Callable[[str], None] | None) -> dict[str, np.ndarray]:
    """(n, C) probabilities of every fold head on *ids* (bags read once)."""
    dev = resolve_device(device)
    out = {}
    for fold in run.folds:
        out[fold], _ = score_bags(run.model(fold).to(dev), bags, ids, dev)
        if progress is not None:
            progress(fold)
    return out


def _training_overlap(run: Run, ids: Sequence[str], patients: Sequence[str] = ()) -> list[str]:
    """External slides (patients, for a patient-level run) that the run also saw (any split of any
    fold): a leak worth a warning."""
    seen = {s for sp in (run.config.get("splits") or {}).values() for k in ("train", "val", "test")
            for s in sp.get(k, [])}
    if run.level == "patient":
        return sorted({p for p in patients if p in seen})
    return [s for s in ids if s in seen]


def evaluate_external(run: str | Path | Run, store: str | Store, labels: str | Path | Labels, *,
                      name: str | None = None, allow_missing: bool = False, device: str = "cpu",
                      n_boot: int = 1000, progress: Callable[[str], None] | None = None) -> ExternalResult:
    """Score every labelled slide of *store* with each fold head of *run*; metrics internal vs external.

    ``metrics`` = {"run", "store", "labels", "name", "classes", "n_slides", "n_patients",
    "ci_method", "internal", "external": {"folds", "ensemble", "per_class"}}.
    """
    resolve_device(device)   # a bad device fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    st = store if isinstance(store, Store) else open_store(store)
    lab = labels if isinstance(labels, Labels) else read_labels(labels, error=LabelsError, task=run.task)
    if lab.task != run.task:
        raise MilError(f"{lab.path} holds {lab.task} labels but run {run.path} is a {run.task} run; "
                       "pass labels of the run's endpoint")
    name = name or Path(str(st.path).rstrip("/")).stem
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise MilError(f"--name {name!r} must be a plain folder name")
    classes = list(run.classes)
    if run.task == "classification":
        run_labels(lab, classes)     # unknown classes fail before the store is read
    key = run_key(run)
    try:
        st.resolve_key(key.encoder, key.minus, key.weights)
        have = [s for s in lab.slide_ids if st.has_features(s, key.encoder, key.minus, key.weights)]
    except StoreError as exc:
        raise MilError(f"{st.path} cannot serve run {run.path}: {exc}") from None
    lab = match_store(lab, have, allow_missing=allow_missing, store_name=f"{st.path} ({key})",
                      error=LabelsError)
    slides = list(lab.slide_ids)
    check_tiling(run, st, key, slides[0])
    check_store(run, st, key, slides)
    overlap = _training_overlap(run, slides, lab.patients)
    if overlap:
        log.warning("%d external slide(s) or patient(s) were also used by run %s (e.g. %s): not an independent "
                    "cohort", len(overlap), run.path, overlap[0])
    n_slides = len(slides)
    lab, bags, members = _units(run, st, key, lab)
    ids = list(lab.slide_ids)    # slides, or patients for a --level patient run
    seed = int(run.config.get("seed", 0))
    if run.task != "classification":
        return _evaluate_values(run, st, lab, bags, members, name=name, n_slides=n_slides, overlap=len(overlap),
                                device=device, n_boot=n_boot, seed=seed, progress=progress)
    y = run_labels(lab, classes)
    fold_probs = _score_folds(run, bags, ids, device, progress)
    res = ExternalResult(run.path, name, classes, ids, list(lab.patients), y, fold_probs, members=members)
    ens = fold_metrics(y, res.probs, n_boot=n_boot, seed=seed)
    res.metrics = {
        "run": str(run.path), "store": str(st.path), "labels": str(lab.path), "name": name,
        "classes": classes, "n_slides": n_slides, "n_patients": len(set(lab.patients)), "level": run.level,
        "n_training_overlap": len(overlap),
        "threshold": "argmax of class probabilities (as mil train)",
        "auc": "binary: P(classes[1]); multiclass: macro one-vs-rest over the classes present",
        "ci_method": f"stratified percentile bootstrap, {n_boot} resamples, seed {seed} (as mil train)",
        "internal": internal_metrics(run, n_boot=n_boot, seed=seed),
        "external": {
            "folds": {f: fold_metrics(y, p, n_boot=n_boot, seed=seed) for f, p in fold_probs.items()},
            "ensemble": ens,
            "per_class": per_class(y, res.probs, classes),
        },
    }
    fa = [m["auc"] for m in res.metrics["external"]["folds"].values() if m["auc"] is not None]
    res.metrics["external"]["fold_mean"] = {"auc": float(np.mean(fa)) if fa else None,
                                            "auc_std": float(np.std(fa, ddof=1)) if len(fa) > 1 else 0.0}
    fused = _patient_fusion(lab, classes, res.probs, n_boot=n_boot, seed=seed) if members is None else None
    if fused is not None:
        res.metrics["external"]["patient"] = fused
    return res


def _patient_fusion(lab: Labels, classes: Sequence[str], probs: np.ndarray, *, n_boot: int, seed: int) -> dict | None:
    """A slide-level run on a cohort whose patients have several slides: each patient's ensemble
    probabilities averaged over its slides (late fusion, :func:`mil.data.patient_means`, as `mil
    train` reports internally) and scored per patient. None when every patient has one slide, a
    patient's slides disagree, or one class is left."""
    from mil.data import patient_means, patient_rows

    if len(set(lab.patients)) == len(lab):
        return None
    try:
        pooled, patient_row = patient_rows(lab)
        rows, pp = patient_means(patient_row, range(len(lab)), probs)
    except LabelsError as exc:
        log.warning("no patient-level metrics: %s", exc)
        return None
    py = run_labels(pooled, classes)[rows]
    if len(np.unique(py)) < 2:
        return None
    return {"fusion": "mean of the patient's slide probabilities", "n_patients": len(py),
            **fold_metrics(py, pp, n_boot=n_boot, seed=seed)}


def _value_metrics(task: str, target: np.ndarray, pred: np.ndarray, *, n_boot: int, seed: int) -> dict:
    """The task's metrics of predictions on the external cohort. Survival: Harrell's C with its
    bootstrap CI, and Uno's C and the td-AUC with the censoring distribution estimated on the
    external cohort itself (the training cohort is not read back); no IBS (it needs the training
    slides' baseline hazard)."""
    from mil.tasks import regression_metrics, survival_metrics

    if task == "survival":
        return survival_metrics(target, target, pred, n_boot=n_boot, seed=seed)
    return regression_metrics(target, pred, n_boot=n_boot, seed=seed)


def _evaluate_values(run: Run, st: Store, lab: Labels, bags, members: dict | None, *, name: str, n_slides: int,
                     overlap: int, device: str, n_boot: int, seed: int,
                     progress: Callable[[str], None] | None) -> ExternalValues:
    """:func:`evaluate_external` of a survival or regression run."""
    from mil.metrics import summarize
    from mil.predict import fold_values
    from mil.tasks import calibration, logrank, task_keys

    ids = list(lab.slide_ids)
    values = fold_values(run, bags, ids, resolve_device(device),
                         None if progress is None else (lambda _n: None))
    res = ExternalValues(run.path, name, run.task, ids, list(lab.patients), lab.target, values, members=members)
    ens = _value_metrics(run.task, lab.target, res.values, n_boot=n_boot, seed=seed)
    if run.task == "survival":
        cut = [(run.config.get("task_config") or {}).get(f, {}).get("risk_cutoff") for f in values]
        if None not in cut:   # each fold head's own training-median cut, then a majority of the heads
            high = np.mean([values[f] > c for f, c in zip(values, cut)], 0) > 0.5
            ens["risk_groups"] = {"n_high": int(high.sum()), "n_low": int((~high).sum()),
                                  "logrank_p": logrank(lab.target, high)}
    else:
        ens["calibration"] = calibration(lab.target, res.values)
    internal = run.metrics or {}
    keys = task_keys(run.task)
    res.metrics = {
        "run": str(run.path), "store": str(st.path), "labels": str(lab.path), "name": name, "task": run.task,
        "level": run.level, "classes": [], "n_slides": n_slides, "n_patients": len(set(lab.patients)),
        "n_training_overlap": overlap,
        "ci_method": f"percentile bootstrap, {n_boot} resamples, seed {seed} (as mil train)",
        "internal": {k: internal.get(k) for k in ("folds", "mean", "std")},
        "external": {**summarize({f: _value_metrics(run.task, lab.target, v, n_boot=n_boot, seed=seed)
                                  for f, v in values.items()}, keys), "ensemble": ens},
    }
    return res


# ------------------------------------------------------------------------------ summary


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci) -> str:
    return "-" if not ci or ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


#: per task: (headline metric, its title, second metric, its title) of the internal-vs-external table
SUMMARY_COLUMNS = {"classification": ("auc", "AUC", "balanced_accuracy", "bal. acc."),
                   "survival": ("c_index", "C-index", "c_index_uno", "Uno's C"),
                   "regression": ("pearson", "Pearson r", "r2", "R²")}


def summary_columns(metrics: dict) -> tuple[str, str, str, str]:
    return SUMMARY_COLUMNS[metrics.get("task", "classification")]


def summary_rows(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    """(row, n, headline metric, 95% CI, second metric) for internal vs external (AUC and balanced
    accuracy; C-index and Uno's C; Pearson r and R²); shared by table and markdown."""
    head, _, second, _ = summary_columns(metrics)
    i, e = metrics["internal"], metrics["external"]
    row = lambda name, m: (name, str(m.get("n", "")), _f(m.get(head)), _ci(m.get(f"{head}_ci")),  # noqa: E731
                           _f(m.get(second)))
    rows = [row(f"internal {f}", m) for f, m in (i.get("folds") or {}).items()]
    if len(i.get("folds") or {}) > 1:
        rows.append(("internal mean ± sd", "", f"{_f(i['mean'][head])} ± {_f(i['std'][head])}", "",
                     f"{_f(i['mean'].get(second))} ± {_f(i['std'].get(second))}"))
    if i.get("pooled") and head in i["pooled"]:
        rows.append(row("internal pooled out-of-fold", i["pooled"]))
    rows += [row(f"external {f}", m) for f, m in e["folds"].items()]
    rows.append(row("external ensemble", e["ensemble"]))
    if e.get("patient"):
        rows.append(row("external patients (mean of slides)", e["patient"]))
    return rows


def summary_markdown(metrics: dict) -> str:
    """summary.md: what was evaluated and the internal-vs-external table."""
    _, head, _, second = summary_columns(metrics)
    task = metrics.get("task", "classification")
    lines = [f"# External validation: {metrics['name']}", "",
             f"- run: `{metrics['run']}`", f"- store: `{metrics['store']}`", f"- labels: `{metrics['labels']}`",
             f"- endpoint: {task}" + (f", classes {', '.join(metrics['classes'])}" if metrics.get("classes") else "")
             + f"; one prediction per {metrics.get('level', 'slide')}",
             f"- external cohort: {metrics['n_slides']} slides, {metrics['n_patients']} patients"]
    if task == "classification":
        lines.append(f"- AUC: {metrics['auc']}; threshold: {metrics['threshold']}")
    lines += [f"- 95% CI: {metrics['ci_method']}", "",
              f"| | n | {head} | 95% CI | {second} |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in summary_rows(metrics)]
    ens = metrics["external"]["ensemble"]
    if ens.get("risk_groups"):
        g = ens["risk_groups"]
        lines += ["", f"Risk groups (each fold head's own training-median cut, majority of heads): {g['n_high']} high, "
                      f"{g['n_low']} low; log-rank p {_p(g['logrank_p'])}."]
    if ens.get("calibration"):
        c = ens["calibration"]
        lines += ["", f"Calibration: true = {_f(c['intercept'])} + {_f(c['slope'])} × predicted; mean error "
                      f"{_f(c['mean_error'])}."]
    if task != "classification":
        return "\n".join(lines + _overlap_line(metrics)) + "\n"
    lines += ["", "| class | n | recall | one-vs-rest AUC |", "|---|---|---|---|"]
    lines += [f"| {c} | {m['n']} | {_f(m['recall'])} | {_f(m['auc_ovr'])} |"
              for c, m in metrics["external"]["per_class"].items()]
    return "\n".join(lines + _overlap_line(metrics)) + "\n"


def _overlap_line(metrics: dict) -> list[str]:
    n = metrics.get("n_training_overlap")
    return ["", f"**Warning:** {n} external slide(s) or patient(s) were used by the run."] if n else []


def _p(p) -> str:
    return "n/a" if p is None else ("<0.001" if p < 1e-3 else f"{p:.3f}")


__all__ = ["ExternalResult", "evaluate_external", "check_tiling", "run_tiling", "store_tiling",
           "internal_metrics", "summary_rows", "summary_markdown", "TILING_MUST_MATCH", "FILES"]
