"""The records table of patch and segmentation runs (seed studies): a table over seeds with
Welch p-values, and the metric-vs-training-fraction figure. `mil patches compare`, `mil seg
compare` and the patch and segmentation studies all table their runs here.

A record is one evaluated classifier: a mapping with ``encoder``, ``weights`` (the init),
``minus`` (level), ``fraction`` (of the training split), ``seed``, optionally ``method``
(``logreg``, ``knn``, ``finetune`` ...) and metric values (``accuracy``, ``balanced_accuracy``,
``macro_f1``, ``ece`` ...). Records are grouped by (encoder, weights, minus, fraction, method);
each group reports n (seeds), mean ± sd (ddof=1) of every metric and, against the baseline init
at the same encoder, level, fraction and method, the difference of means and Welch's two-sided
p (:func:`featstore.core.stats.welch_ttest`, at least two seeds on each side). The baseline is
``weights == "random"`` when present, else the first init of the records. A random-init weights
tag ``random-s<N>`` counts as ``random`` (its seed is the record's seed).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.compare import format_p
from analysis.errors import RecordsError
from featstore.core.stats import welch_ttest

KEYS = ("encoder", "weights", "minus", "fraction", "seed")
DEFAULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "bal. acc.", "macro_f1": "macro F1", "ece": "ECE",
          "auc": "AUC", "nll": "NLL", "macro_precision": "macro precision", "macro_recall": "macro recall"}
_RANDOM = re.compile(r"^random(-s\d+)?$")


@dataclass
class CompareRow:
    """One group (encoder, weights, minus, fraction, method) over its seeds."""

    encoder: str
    weights: str
    minus: int
    fraction: float
    method: str
    seeds: list[int]
    values: dict[str, list[float]]
    mean: dict[str, float]
    sd: dict[str, float]
    delta: dict[str, float | None] = field(default_factory=dict)
    p: dict[str, float | None] = field(default_factory=dict)
    is_baseline: bool = False
    baseline: str | None = None     # the weights this row is tested against

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def cell(self) -> tuple[str, int, float, str]:
        return (self.encoder, self.minus, self.fraction, self.method)


def _init_name(weights) -> str:
    w = str(weights)
    return "random" if _RANDOM.match(w) else w


def _value(rec: Mapping, metric: str, i: int) -> float:
    v = rec.get(metric)
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RecordsError(f"record {i}: {metric}={v!r} is not a number") from None


def _group(records: Sequence[Mapping], metrics: Sequence[str]) -> dict[tuple, list[tuple[int, dict]]]:
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in KEYS if k not in rec]
        if missing:
            raise RecordsError(f"record {i} lacks {', '.join(missing)}; each record needs {', '.join(KEYS)} "
                             "and metric values")
        try:
            key = (str(rec["encoder"]), _init_name(rec["weights"]), int(rec["minus"]), float(rec["fraction"]),
                   str(rec.get("method") or ""))
            seed = int(rec["seed"])
        except (TypeError, ValueError):
            raise RecordsError(f"record {i}: minus, fraction and seed must be numbers, got "
                             f"{rec['minus']!r}, {rec['fraction']!r}, {rec['seed']!r}") from None
        if any(s == seed for s, _ in groups.get(key, [])):
            raise RecordsError(f"two records for {key[0]} {key[1]} minus{key[2]} fraction {key[3]:g}"
                             f"{' ' + key[4] if key[4] else ''} seed {seed}; each seed once per group")
        groups.setdefault(key, []).append((seed, {m: _value(rec, m, i) for m in metrics}))
    return groups


def _stats(vals: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in vals if math.isfinite(x)])
    mean = float(v.mean()) if len(v) else math.nan
    return mean, float(v.std(ddof=1)) if len(v) > 1 else math.nan


def _test(row: CompareRow, base: CompareRow, metrics: Sequence[str]) -> None:
    row.baseline = base.weights
    for m in metrics:
        a = [x for x in row.values[m] if math.isfinite(x)]
        b = [x for x in base.values[m] if math.isfinite(x)]
        row.delta[m] = row.mean[m] - base.mean[m] if a and b else None
        row.p[m] = welch_ttest(a, b)[1] if len(a) >= 2 and len(b) >= 2 else None


def compare_records(records: Iterable[Mapping], *, metrics: Sequence[str] | None = None,
                    baseline: str | None = None) -> list[CompareRow]:
    """Group *records* and test each group against the baseline init (module docstring).

    ``metrics``: the metric keys (default: those of :data:`DEFAULT_METRICS` found in any
    record). Rows are sorted by encoder, level, method, fraction, then the baseline first and
    the other inits in the order they first appear.
    """
    records = list(records)
    if not records:
        raise RecordsError("no records to compare; run at least one configuration")
    metrics = list(metrics) if metrics else [m for m in DEFAULT_METRICS if any(m in r for r in records)]
    if not metrics:
        raise RecordsError(f"the records hold none of the metrics {', '.join(DEFAULT_METRICS)}; pass metrics=")
    groups = _group(records, metrics)
    inits = list(dict.fromkeys(k[1] for k in groups))
    base = _init_name(baseline) if baseline is not None else ("random" if "random" in inits else inits[0])
    if base not in inits:
        raise RecordsError(f"baseline init {baseline!r} is in no record; the inits are {', '.join(inits)}")
    rows = []
    for (enc, w, minus, frac, method), items in groups.items():
        items = sorted(items, key=lambda it: it[0])
        values = {m: [v[m] for _, v in items] for m in metrics}
        st = {m: _stats(values[m]) for m in metrics}
        rows.append(CompareRow(enc, w, minus, frac, method, [s for s, _ in items], values,
                               {m: st[m][0] for m in metrics}, {m: st[m][1] for m in metrics},
                               is_baseline=(w == base)))
    by_cell = {r.cell: r for r in rows if r.is_baseline}
    for r in rows:
        if not r.is_baseline and r.cell in by_cell:
            _test(r, by_cell[r.cell], metrics)
    order = {w: i for i, w in enumerate([base] + [w for w in inits if w != base])}
    rows.sort(key=lambda r: (r.encoder, r.minus, r.method, r.fraction, order[r.weights]))
    return rows


# ------------------------------------------------------------------ outputs
def _metrics_of(rows: Sequence[CompareRow]) -> list[str]:
    if not rows:
        raise RecordsError("no rows to write")
    return list(rows[0].mean)


def _num(v: float | None) -> str | float:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def write_csv(rows: Sequence[CompareRow], path: str | Path) -> Path:
    """One line per group: keys, n, seeds, and mean, sd, delta, p_welch of every metric."""
    metrics = _metrics_of(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = ["encoder", "weights", "minus", "fraction", "method", "n", "seeds", "baseline"]
    head += [f"{m}_{s}" for m in metrics for s in ("mean", "sd", "delta", "p_welch")]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in rows:
            cells = [r.encoder, r.weights, r.minus, r.fraction, r.method, r.n, ";".join(map(str, r.seeds)),
                     "baseline" if r.is_baseline else (r.baseline or "")]
            for m in metrics:
                cells += [_num(r.mean[m]), _num(r.sd[m]), _num(r.delta.get(m)), _num(r.p.get(m))]
            w.writerow(cells)
    return path


def _cell(r: CompareRow, m: str) -> str:
    if math.isnan(r.mean[m]):
        return ""
    s = f"{r.mean[m]:.3f}" + (f" ± {r.sd[m]:.3f}" if not math.isnan(r.sd[m]) else "")
    p = format_p(r.p.get(m))    # "0.012" or "<0.001"
    return s + (f" (p{'' if p.startswith('<') else '='}{p})" if p else "")


def to_markdown(rows: Sequence[CompareRow]) -> str:
    """A markdown table: keys, n, and per metric ``mean ± sd (p vs baseline)``."""
    metrics = _metrics_of(rows)
    with_method = any(r.method for r in rows)
    head = ["encoder", "init", "level"] + (["method"] if with_method else []) + ["fraction", "n"]
    head += [LABELS.get(m, m) for m in metrics] + ["vs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.encoder, r.weights, f"minus{r.minus}"] + ([r.method] if with_method else [])
        cells += [f"{r.fraction:g}", str(r.n)] + [_cell(r, m) for m in metrics]
        cells.append("baseline" if r.is_baseline else (r.baseline or ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[CompareRow], path: str | Path, title: str = "Patch classification") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{len(rows)} groups, {sum(r.n for r in rows)} runs. Mean ± sd over seeds; "
                    "p: Welch's two-sided t-test against the baseline init (column vs) at the same encoder, "
                    "level, method and fraction.\n\n" + to_markdown(rows))
    return path


def _panels(rows: Sequence[CompareRow]) -> dict[tuple, dict[str, list[CompareRow]]]:
    panels: dict[tuple, dict[str, list[CompareRow]]] = {}
    for r in rows:
        panels.setdefault((r.encoder, r.minus, r.method), {}).setdefault(r.weights, []).append(r)
    return panels


def plot_metric_vs_fraction(records: Iterable[Mapping], metric: str, path: str | Path, *,
                            title: str | None = None, baseline: str | None = None) -> Path:
    """Mean *metric* over seeds against the training fraction (log x), one line per init with a
    ± sd band, one panel per encoder / level (/ method)."""
    from featstore.core.plotting import new_figure, save

    rows = compare_records(records, metrics=[metric], baseline=baseline)
    panels = _panels(rows)
    fig = new_figure(5.0 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    fracs = sorted({r.fraction for r in rows})
    for ax, ((enc, minus, method), lines) in zip(axes, panels.items()):
        for weights, rs in lines.items():
            rs = sorted(rs, key=lambda r: r.fraction)
            x = np.array([r.fraction for r in rs])
            m = np.array([r.mean[metric] for r in rs])
            sd = np.nan_to_num(np.array([r.sd[metric] for r in rs]), nan=0.0)
            (line,) = ax.plot(x, m, marker="o", label=f"{weights} (n={max(r.n for r in rs)})")
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(fracs, labels=[f"{f:g}" for f in fracs])
        ax.minorticks_off()
        ax.set_xlabel("training fraction")
        ax.set_title(f"{enc} minus{minus}" + (f" {method}" if method else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel(f"{LABELS.get(metric, metric)} (mean ± sd over seeds)")
    if title:
        fig.suptitle(title)
    return save(fig, path)


__all__ = ["CompareRow", "DEFAULT_METRICS", "compare_records", "plot_metric_vs_fraction", "to_markdown",
           "write_csv", "write_markdown"]
