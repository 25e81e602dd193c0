"""Compare many `mil train` / `mil finetune` runs: one table grouped by encoder x weights x level.

Reads each run directory's config.json and metrics.json (docs/architecture.md, "mil run
directory"). Groups by (encoder, weights, minus, kind, train_fraction); within a group every
fold of every run (seed) is one observation (``unit="fold"``) or each run's mean is
(``unit="run"``). A finetune run's "frozen" block (the frozen model scored on the same slides)
becomes its own group of kind "frozen". Reports n, mean +- sd of the task's headline metric (AUC
for classification, Harrell's C-index for survival, Pearson r for regression: :data:`TASK_METRICS`)
and two more, a 95 % CI of the mean, and the difference to a baseline group with Welch's t-test.
Runs of different tasks are not compared in one table.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats as _st

from analysis.errors import AnalysisError
from featstore.core.stats import welch_ttest

log = logging.getLogger(__name__)

#: per task: the headline metric (ranked on, tested against the baseline) and two more shown beside it
TASK_METRICS = {"classification": ("auc", "balanced_accuracy", "f1"),
                "survival": ("c_index", "c_index_uno", "td_auc"),
                "regression": ("pearson", "spearman", "r2")}
METRICS = TASK_METRICS["classification"]
#: column titles of the metrics
TITLES = {"auc": "AUC", "balanced_accuracy": "bal. acc.", "f1": "F1", "c_index": "C-index", "c_index_uno": "Uno's C",
          "td_auc": "td-AUC", "pearson": "Pearson r", "spearman": "Spearman", "r2": "R²"}
#: the value of a metric that knows nothing (the dashed line of compare.png)
CHANCE = {"auc": 0.5, "c_index": 0.5, "pearson": 0.0}
UNITS = ("fold", "run")


@dataclass(frozen=True, order=True)
class GroupKey:
    encoder: str
    weights: str
    minus: int
    kind: str
    train_fraction: float | None = None

    def label(self) -> str:
        s = f"{self.encoder}:{self.weights}:minus{self.minus} {self.kind}"
        if self.train_fraction is not None:
            s += f" frac={self.train_fraction:g}"
        return s


@dataclass
class Observation:
    """The task's metrics (:data:`TASK_METRICS`) of one fold of one run."""

    key: GroupKey
    run: str
    fold: str
    seed: int | None
    values: dict[str, float]
    auc_ci: tuple[float, float] | None = None   # the headline metric's bootstrap CI
    task: str = "classification"


@dataclass
class GroupRow:
    key: GroupKey
    n: int
    n_runs: int
    mean: dict[str, float]
    sd: dict[str, float]
    ci: tuple[float, float]
    delta: float | None = None
    p: float | None = None
    is_baseline: bool = False
    runs: list[str] = field(default_factory=list)
    task: str = "classification"

    @property
    def metrics(self) -> tuple[str, ...]:
        return TASK_METRICS[self.task]

    @property
    def metric(self) -> str:
        """The headline metric's key (auc, c_index, pearson)."""
        return self.metrics[0]

    @property
    def score(self) -> float | None:
        """Mean of the headline metric (None when undefined)."""
        v = self.mean.get(self.metric)
        return None if v is None or math.isnan(v) else v

    @property
    def score_sd(self) -> float | None:
        v = self.sd.get(self.metric)
        return None if v is None or math.isnan(v) else v


# ------------------------------------------------------------------ reading runs
def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories: each path itself if it holds config.json, else its subdirectories that do."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise AnalysisError(f"{p}: not a directory; pass mil run directories (or a folder of them)")
        if (p / "config.json").is_file():
            found.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / "config.json").is_file())
        if not subs:
            raise AnalysisError(f"{p}: no config.json here or in its subfolders; is it a `mil train` run?")
        found.extend(subs)
    return list(dict.fromkeys(found))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); rerun or remove the run") from None


def _fold_obs(key: GroupKey, run: Path, block: dict, seed, unit: str, task: str = "classification"
              ) -> list[Observation]:
    folds = block.get("folds") or {}
    if not folds:
        raise AnalysisError(f"{run}/metrics.json has no 'folds'; was the run finished by this version of mil?")
    metrics = TASK_METRICS[task]
    head = metrics[0]
    obs = []
    for name, m in folds.items():
        if m.get(head) is None:  # mil writes null when a test fold holds a single class / no event
            log.warning("%s: fold %r has no %s (single-class or event-free test fold?); left out", run, name,
                        TITLES[head])
            continue
        ci = tuple(m[f"{head}_ci"]) if m.get(f"{head}_ci") and None not in m[f"{head}_ci"] else None
        obs.append(Observation(key, str(run), str(name), seed,
                               {k: float(m[k]) if m.get(k) is not None else math.nan for k in metrics}, ci, task))
    if unit == "run" and len(obs) > 1:
        with np.errstate(all="ignore"):
            vals = {k: float(np.nanmean([o.values[k] for o in obs])) for k in metrics}
        return [Observation(key, str(run), "mean", seed, vals, task=task)]
    return obs


def read_run(run: Path, unit: str = "fold") -> list[Observation]:
    """Observations of one run directory (plus its "frozen" block for finetune runs)."""
    cfg = _read_json(run / "config.json")
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        log.warning("%s: no metrics.json (unfinished run?); skipped", run)
        return []
    metrics = _read_json(metrics_path)
    task = str(cfg.get("task", "classification"))
    if task not in TASK_METRICS:
        raise AnalysisError(f"{run}/config.json: task {task!r} is not one of {', '.join(TASK_METRICS)}")
    missing = [k for k in ("encoder", "weights", "minus") if k not in cfg]
    if missing:
        raise AnalysisError(f"{run}/config.json lacks {', '.join(missing)}; not a mil run config")
    frac = cfg.get("train_fraction")
    frac = None if frac is None or float(frac) == 1.0 else float(frac)
    kind = str(cfg.get("kind", "train"))
    key = GroupKey(str(cfg["encoder"]), str(cfg["weights"]), int(cfg["minus"]), kind, frac)
    seed = cfg.get("seed")
    obs = _fold_obs(key, run, metrics, seed, unit, task)
    if "frozen" in metrics:
        fkey = GroupKey(key.encoder, key.weights, key.minus, "frozen", frac)
        obs += _fold_obs(fkey, run, metrics["frozen"], seed, unit, task)
    return obs


# ------------------------------------------------------------------ grouping
def parse_baseline(text: str) -> dict:
    """``ENC:WEIGHTS:minusK[:KIND]`` -> fields to match a group."""
    parts = str(text).split(":")
    if len(parts) not in (3, 4) or not parts[2].removeprefix("minus").isdigit():
        raise AnalysisError(f"--baseline {text!r}: expected ENCODER:WEIGHTS:minusK[:KIND], "
                            "e.g. resnet18:imagenet:minus0")
    out = {"encoder": parts[0], "weights": parts[1], "minus": int(parts[2].removeprefix("minus"))}
    if len(parts) == 4:
        out["kind"] = parts[3]
    return out


def _pick_baseline(keys: Sequence[GroupKey], spec: dict) -> GroupKey:
    hits = [k for k in keys if all(getattr(k, f) == v for f, v in spec.items())]
    if len(hits) > 1:
        train = [k for k in hits if k.kind == "train"]
        hits = train if len(train) == 1 else hits
    if len(hits) != 1:
        what = "matches no group" if not hits else f"matches {len(hits)} groups"
        have = "; ".join(k.label() for k in (hits or keys))
        raise AnalysisError(f"baseline {spec} {what} ({have}); add :KIND or pick one of these")
    return hits[0]


def _ci_of_mean(x: np.ndarray, single: tuple[float, float] | None) -> tuple[float, float]:
    if len(x) >= 2:
        half = _st.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        return float(x.mean() - half), float(x.mean() + half)
    if single is not None:  # one fold: its bootstrap CI
        return float(single[0]), float(single[1])
    return float("nan"), float("nan")


def compare_runs(run_dirs: Iterable[str | Path], baseline: str | dict | None = None,
                 unit: str = "fold") -> list[GroupRow]:
    """Group the runs' fold metrics and test each group against the baseline (Welch)."""
    if unit not in UNITS:
        raise AnalysisError(f"unit must be one of {UNITS}, not {unit!r}")
    runs = find_runs(run_dirs)
    obs = [o for r in runs for o in read_run(r, unit)]
    if not obs:
        raise AnalysisError("no finished run among the given directories (none has metrics.json)")
    tasks = sorted({o.task for o in obs})
    if len(tasks) > 1:
        example = {t: next(o.run for o in obs if o.task == t) for t in tasks}
        raise AnalysisError("runs of different tasks cannot share one table (" + ", ".join(
            f"{t}: {r}" for t, r in example.items()) + "); compare each task's runs apart")
    task = tasks[0]
    metrics = TASK_METRICS[task]
    groups: dict[GroupKey, list[Observation]] = {}
    for o in obs:
        groups.setdefault(o.key, []).append(o)
    keys = sorted(groups, key=lambda k: (k.encoder, k.weights, k.minus, k.kind, k.train_fraction or 1.0))
    base = None
    if baseline:
        base = _pick_baseline(keys, parse_baseline(baseline) if isinstance(baseline, str) else baseline)
    rows = []
    base_auc = np.array([o.values[metrics[0]] for o in groups[base]]) if base else None
    for k in keys:
        g = groups[k]
        vals = {m: np.array([o.values[m] for o in g]) for m in metrics}
        auc = vals[metrics[0]]
        with np.errstate(all="ignore"):
            mean = {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in vals.items()}
        row = GroupRow(
            key=k, n=len(g), n_runs=len({o.run for o in g}), mean=mean,
            sd={m: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan")
                for m, v in vals.items()},
            ci=_ci_of_mean(auc, g[0].auc_ci if len(g) == 1 else None),
            is_baseline=(k == base), runs=sorted({o.run for o in g}), task=task,
        )
        if base is not None and k != base:
            row.delta = float(auc.mean() - base_auc.mean())
            if len(auc) >= 2 and len(base_auc) >= 2:
                row.p = welch_ttest(auc, base_auc)[1]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ outputs
def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return ""
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def write_csv(rows: Sequence[GroupRow], path: str | Path) -> Path:
    """compare.csv: one row per group; metric columns named by the task's metrics (auc_mean, ...)."""
    path = Path(path)
    metrics = rows[0].metrics if rows else METRICS
    head, rest = metrics[0], metrics[1:]
    fields = ["encoder", "weights", "minus", "kind", "train_fraction", "n", "n_runs", f"{head}_mean", f"{head}_sd",
              f"{head}_ci_lo", f"{head}_ci_hi", *(f"{m}_{x}" for m in rest for x in ("mean", "sd")),
              f"delta_{head}", "p_welch", "baseline", "runs"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for r in rows:
            k = r.key
            w.writerow([k.encoder, k.weights, k.minus, k.kind, "" if k.train_fraction is None else k.train_fraction,
                        r.n, r.n_runs, r.mean[head], r.sd[head], r.ci[0], r.ci[1],
                        *(v for m in rest for v in (r.mean[m], r.sd[m])),
                        "" if r.delta is None else r.delta, "" if r.p is None else r.p,
                        int(r.is_baseline), ";".join(r.runs)])
    return path


def to_markdown(rows: Sequence[GroupRow]) -> str:
    with_frac = any(r.key.train_fraction is not None for r in rows)
    metrics = rows[0].metrics if rows else METRICS
    head = TITLES[metrics[0]]
    cols = ["encoder", "weights", "level", "kind"] + (["train fraction"] if with_frac else []) + \
        ["n", f"{head} mean ± sd", "95% CI", *(TITLES[m] for m in metrics[1:]), f"Δ {head} vs baseline", "p (Welch)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        k = r.key
        cells = [k.encoder, k.weights, f"minus{k.minus}", k.kind]
        if with_frac:
            cells.append("1" if k.train_fraction is None else f"{k.train_fraction:g}")
        sd = f" ± {_fmt(r.sd[r.metric])}" if not math.isnan(r.sd[r.metric]) else ""
        cells += [str(r.n), f"{_fmt(r.mean[r.metric])}{sd}", f"{_fmt(r.ci[0])}–{_fmt(r.ci[1])}",
                  *(_fmt(r.mean[m]) for m in r.metrics[1:]),
                  "baseline" if r.is_baseline else _fmt(r.delta, "+.3f"), format_p(r.p)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def notes(rows: Sequence[GroupRow]) -> list[str]:
    """What a reader of the table would otherwise wonder about: why Δ or p are blank, and what
    the 'frozen' rows are."""
    out = []
    if not any(r.is_baseline for r in rows):
        out.append("Δ and p are blank: no baseline was given (--baseline ENCODER:WEIGHTS:minusK[:KIND]; "
                   "the study uses its best frozen configuration).")
    elif any(r.delta is not None and r.p is None for r in rows):
        out.append("p is blank where a group or the baseline has fewer than 2 observations (folds x seeds): "
                   "Welch's t-test needs two on each side; add seeds or folds.")
    if any(r.key.kind == "frozen" for r in rows):
        out.append("'frozen' rows are each fine-tune's parent run scored on the fine-tune's own test slides "
                   "(one fold), for a paired look; the parent's 'train' row is the same model over all its folds.")
    return out


def write_markdown(rows: Sequence[GroupRow], path: str | Path) -> Path:
    path = Path(path)
    n_obs = sum(r.n for r in rows)
    path.write_text(f"# Run comparison\n\n{len(rows)} groups, {n_obs} observations. Mean ± sd over "
                    "folds and seeds; 95% CI of the mean (t); p: Welch's t-test vs the baseline.\n\n"
                    + to_markdown(rows) + "".join(f"\n{n}\n" for n in notes(rows)))
    return path


def plot(rows: Sequence[GroupRow], path: str | Path) -> Path:
    from featstore.core.plotting import bars_with_ci

    base = next((i for i, r in enumerate(rows) if r.is_baseline), None)
    notes = [("baseline" if r.is_baseline else
              (f"{r.delta:+.3f}" + (f" p={format_p(r.p)}" if r.p is not None and not math.isnan(r.p) else ""))
              if r.delta is not None else "") for r in rows]
    head = TITLES[rows[0].metric] if rows else "AUC"
    return bars_with_ci([r.key.label() for r in rows], [r.mean[r.metric] for r in rows],
                        [r.ci[0] for r in rows], [r.ci[1] for r in rows], path,
                        title=f"{head} by configuration (mean, 95% CI)", ylabel=f"{head} (dashed: chance)",
                        highlight=base, annotations=notes, chance=CHANCE.get(rows[0].metric if rows else "auc", 0.5))


def write_outputs(rows: Sequence[GroupRow], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {"md": write_markdown(rows, out / "compare.md"), "csv": write_csv(rows, out / "compare.csv"),
            "png": plot(rows, out / "compare.png")}
